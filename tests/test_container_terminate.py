"""ContainerRuntime.terminate's grace, to the tick: the runtime's timers run on a
``task.Clock`` while its docker calls go to a fake engine on a real pool. (On the
real engine, test_docker_runtime.py checks the outcome; how soon after the grace
a kill lands is a speed goal, bench/kill.py.)"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import docker.errors
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater

from fluster_worker.common.threads import BlockingPool
from fluster_worker.containers.runtime import ContainerRuntime

CID = "7" * 64
RUNNING = {"Status": "running", "Running": True, "StartedAt": "2024-05-01T10:00:00Z"}


def exited(code: int) -> dict[str, Any]:
    return {
        "Status": "exited",
        "Running": False,
        "ExitCode": code,
        "OOMKilled": False,
        "StartedAt": "2024-05-01T10:00:00Z",
        "FinishedAt": "2024-05-01T10:00:09Z",
    }


class ClockedReactor:
    """The real reactor (threads, callFromThread), but timers and time from a Clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(delay, f, *args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


class Engine:
    """What terminate uses of docker-py's APIClient: events, inspect, kill. A
    container dies as the test says (``die``); a signal only records itself."""

    def __init__(self) -> None:
        self.api = self
        self.lock = threading.Lock()
        self.state = dict(RUNNING)
        self.signals: list[str] = []
        self.events_queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.subscribed = threading.Event()

    def events(self, decode: bool, filters: dict[str, Any]) -> Any:
        self.subscribed.set()
        return self

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> dict[str, Any]:
        event = self.events_queue.get()
        if event is None:
            raise StopIteration
        return event

    def close(self) -> None:
        self.events_queue.put(None)

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        if container_id != CID:
            raise docker.errors.NotFound("gone")
        with self.lock:
            return {"Id": CID, "State": dict(self.state)}

    def kill(self, container_id: str, signal: str) -> None:
        with self.lock:
            self.signals.append(signal)

    def die(self, code: int) -> None:
        with self.lock:
            self.state = exited(code)
        self.events_queue.put({"Type": "container", "Action": "die", "Actor": {"ID": CID, "Attributes": {}}})


async def until(what: str, check: Callable[[], bool]) -> None:
    """Poll (on the real reactor) until ``check()``; fail after 20 s."""
    for _ in range(2000):
        if check():
            return
        await deferLater(reactor, 0.01, lambda: None)  # type: ignore[arg-type]
    raise AssertionError(f"timed out waiting for {what}")


@pytest_twisted.async_yield_fixture
async def rig(blocking_pool: BlockingPool) -> AsyncIterator[tuple[ContainerRuntime, Engine, Clock]]:
    clock = Clock()
    engine = Engine()
    rt = ContainerRuntime(ClockedReactor(clock), blocking_pool, lambda: engine, "w-grace")  # type: ignore[arg-type]
    rt.startService()
    await until("the events stream", engine.subscribed.is_set)
    try:
        yield rt, engine, clock
    finally:
        await rt.stopService()


def grace_timer_set(clock: Clock) -> bool:
    return any(c.active() for c in clock.getDelayedCalls())


@pytest_twisted.ensureDeferred
async def test_sigkill_comes_at_the_grace_not_a_tick_before(rig: tuple[ContainerRuntime, Engine, Clock]) -> None:
    rt, engine, clock = rig
    terminated: Deferred[Any] = rt.terminate(CID, 10.0)
    await until("the grace timer", lambda: grace_timer_set(clock))
    assert engine.signals == ["SIGTERM"]
    clock.advance(9.999)
    assert grace_timer_set(clock) and not terminated.called
    clock.advance(0.001)
    await until("the SIGKILL", lambda: engine.signals == ["SIGTERM", "SIGKILL"])
    engine.die(137)
    await until("terminate to answer", lambda: terminated.called)
    assert (await terminated).exit_code == 137


@pytest_twisted.ensureDeferred
async def test_an_exit_during_the_grace_answers_at_once_and_sends_no_sigkill(
    rig: tuple[ContainerRuntime, Engine, Clock],
) -> None:
    rt, engine, clock = rig
    terminated: Deferred[Any] = rt.terminate(CID, 10.0)
    await until("the grace timer", lambda: grace_timer_set(clock))
    clock.advance(3.0)
    engine.die(143)
    await until("terminate to answer", lambda: terminated.called)
    assert (await terminated).exit_code == 143
    assert not grace_timer_set(clock)  # cancelled: nothing left to send a SIGKILL
    clock.advance(60)
    assert engine.signals == ["SIGTERM"]
