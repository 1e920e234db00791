"""Exits the engine caused, told apart from the job's own, against a fake engine
(no dockerd): a stopping engine signals its containers (a kill we did not send),
reports their die, then closes the stream; a crashed one kills them when it
starts again. Also the engine's health as the events stream sees it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import succeed

from fluster_worker.common.threads import BlockingPool
from fluster_worker.containers.runtime import ContainerRuntime
from tests.test_docker_runtime import (
    _die,
    _exited,
    _FakeEngine,
    _FakeEngineApi,
    _waiting_on_running,
    poll,
    within,
)


def _kill(container_id: str, signal: int) -> dict[str, Any]:
    return {
        "Type": "container",
        "Action": "kill",
        "Actor": {"ID": container_id, "Attributes": {"signal": str(signal)}},
    }


def _oom(container_id: str) -> dict[str, Any]:
    return {"Type": "container", "Action": "oom", "Actor": {"ID": container_id, "Attributes": {}}}


def _now_exited(code: int) -> dict[str, Any]:
    """Exited just now (FinishedAt far in the future: after any outage start)."""
    return {**_exited(code), "FinishedAt": "2099-01-01T00:00:00Z"}


@pytest_twisted.async_yield_fixture
async def runtime(blocking_pool: BlockingPool) -> AsyncIterator[tuple[ContainerRuntime, _FakeEngineApi]]:
    engine = _FakeEngine()
    rt = ContainerRuntime(reactor, blocking_pool, lambda: engine, "w-fake", exit_settle_s=0.5)  # type: ignore[arg-type]
    rt.startService()
    try:
        yield rt, engine.api
    finally:
        await within(rt.stopService())


@pytest_twisted.ensureDeferred
async def test_an_exit_after_a_foreign_kill_and_a_lost_stream_is_the_engine_s(
    runtime: tuple[ContainerRuntime, _FakeEngineApi],
) -> None:
    rt, api = runtime
    cid = "f" * 64
    waiting = await _waiting_on_running(rt, api, cid)
    stream = api.streams[-1]
    stream.push(_kill(cid, 15))  # the engine, shutting down, signals it
    with api.lock:
        api.states[cid] = _now_exited(143)
    stream.push(_die(cid, 143))
    stream.end()  # then the engine goes away
    status = await within(waiting)
    assert status.engine_stopped and status.exit_code == 143


@pytest_twisted.ensureDeferred
async def test_an_exit_after_a_foreign_kill_with_the_engine_staying_is_the_job_s(
    runtime: tuple[ContainerRuntime, _FakeEngineApi],
) -> None:
    rt, api = runtime
    cid = "e" * 64
    waiting = await _waiting_on_running(rt, api, cid)
    api.streams[-1].push(_kill(cid, 15))  # someone ran `docker stop`
    with api.lock:
        api.states[cid] = _now_exited(143)
    api.streams[-1].push(_die(cid, 143))
    status = await within(waiting)
    assert not status.engine_stopped and status.exit_code == 143


@pytest_twisted.ensureDeferred
async def test_our_own_kill_is_not_foreign(runtime: tuple[ContainerRuntime, _FakeEngineApi]) -> None:
    rt, api = runtime
    cid = "d" * 64
    waiting = await _waiting_on_running(rt, api, cid)
    rt._exits.expect_kill(cid, "SIGTERM")  # what signal()/terminate() do before the call
    stream = api.streams[-1]
    stream.push(_kill(cid, 15))
    with api.lock:
        api.states[cid] = _now_exited(143)
    stream.push(_die(cid, 143))
    status = await within(waiting)
    stream.end()
    assert not status.engine_stopped


@pytest_twisted.ensureDeferred
async def test_an_exit_found_after_the_stream_came_back_is_the_engine_s(
    runtime: tuple[ContainerRuntime, _FakeEngineApi],
) -> None:
    rt, api = runtime
    cid = "c" * 64
    waiting = await _waiting_on_running(rt, api, cid)
    with api.lock:
        api.states[cid] = _now_exited(137)  # killed by a restarted engine, no events
    api.streams[-1].end()
    status = await within(waiting)
    assert status.engine_stopped


@pytest_twisted.ensureDeferred
async def test_an_oom_event_after_the_die_still_makes_an_oom_kill(
    runtime: tuple[ContainerRuntime, _FakeEngineApi],
) -> None:
    rt, api = runtime
    cid = "b" * 64
    waiting = await _waiting_on_running(rt, api, cid)
    with api.lock:
        api.states[cid] = _now_exited(137)  # OOMKilled not set yet: the oom event comes second
    api.streams[-1].push(_die(cid, 137))
    api.streams[-1].push(_oom(cid))
    status = await within(waiting)
    assert status.oom_killed and status.exit_code == 137


@pytest_twisted.ensureDeferred
async def test_an_oom_event_before_the_die_makes_an_oom_kill(
    runtime: tuple[ContainerRuntime, _FakeEngineApi],
) -> None:
    rt, api = runtime
    cid = "a" * 64
    waiting = await _waiting_on_running(rt, api, cid)
    api.streams[-1].push(_oom(cid))
    with api.lock:
        api.states[cid] = _now_exited(137)
    api.streams[-1].push(_die(cid, 137))
    status = await within(waiting)
    assert status.oom_killed


@pytest_twisted.ensureDeferred
async def test_a_sigkill_exit_without_an_oom_event_is_a_plain_exit(
    runtime: tuple[ContainerRuntime, _FakeEngineApi],
) -> None:
    rt, api = runtime
    cid = "9" * 64
    waiting = await _waiting_on_running(rt, api, cid)
    with api.lock:
        api.states[cid] = _now_exited(137)  # the job killed itself with SIGKILL
    api.streams[-1].push(_die(cid, 137))
    status = await within(waiting)
    assert not status.oom_killed and status.exit_code == 137


@pytest_twisted.ensureDeferred
async def test_health_follows_connects_and_failures(blocking_pool: BlockingPool) -> None:
    class Flaky(_FakeEngineApi):
        def __init__(self) -> None:
            super().__init__()
            self.down = True

        def events(self, decode: bool, filters: dict[str, Any]) -> Any:
            if self.down:
                raise ConnectionError("connection refused")
            return super().events(decode, filters)

    engine = _FakeEngine()
    engine.api = Flaky()
    rt = ContainerRuntime(reactor, blocking_pool, lambda: engine, "w-flaky")  # type: ignore[arg-type]
    rt.startService()
    try:
        await poll("the engine to be down", lambda: succeed(rt.health.state == "down"))
        assert "connection refused" in rt.health.reason
        ready = rt.health.ready()
        assert not ready.called
        engine.api.down = False
        await within(ready)
        assert rt.health.up
    finally:
        await within(rt.stopService())
