"""KillJob's grace: a later kill with a shorter grace shortens the wait, the grace
is capped by --max-kill-grace, and a stopping worker does not wait out a long
grace. Unit tests of the SIGKILL deadline on a Clock, then the real engine."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from fluster_worker.containers.grace import GraceDeadline
from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import Harness, entrypoint, make_bundle, start_worker, until, worker_config
from tests.test_jobs_e2e import job


def trap_sigterm_and_report() -> None:
    """Ignores SIGTERM, saying so on stdout each time."""
    import signal
    import time

    signal.signal(signal.SIGTERM, lambda *_: print("got SIGTERM", flush=True))
    print("ready", flush=True)
    time.sleep(600)

# -- the SIGKILL deadline ---------------------------------------------------------


def test_grace_fires_once_at_its_deadline() -> None:
    clock, fired = Clock(), []
    grace = GraceDeadline(clock, 10.0, lambda: fired.append(clock.seconds()))
    clock.advance(3)
    grace.arm()  # the SIGTERM went out 3 s late: the deadline stays where it was
    clock.advance(6.9)
    assert fired == []
    clock.advance(0.2)
    assert len(fired) == 1
    grace.shorten(0)  # too late to matter
    clock.advance(100)
    assert len(fired) == 1


def test_a_shorter_grace_brings_the_sigkill_forward_and_a_longer_one_does_not() -> None:
    clock, fired = Clock(), []
    grace = GraceDeadline(clock, 600.0, lambda: fired.append(clock.seconds()))
    grace.arm()
    clock.advance(5)
    grace.shorten(1000.0)  # later: ignored
    grace.shorten(0.1)
    assert fired == []
    clock.advance(0.2)
    assert len(fired) == 1


def test_shortened_before_the_sigterm_is_delivered() -> None:
    clock, fired = Clock(), []
    grace = GraceDeadline(clock, 600.0, lambda: fired.append(clock.seconds()))
    grace.shorten(2.0)
    clock.advance(1)
    grace.arm()
    clock.advance(0.9)
    assert fired == []
    clock.advance(0.2)
    assert len(fired) == 1


def test_a_cancelled_grace_never_fires() -> None:
    clock, fired = Clock(), []
    grace = GraceDeadline(clock, 1.0, lambda: fired.append(1))
    grace.arm()
    grace.cancel()
    grace.shorten(0)
    grace.arm()
    clock.advance(10)
    assert fired == []


# -- on the real engine ------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_worker(worker_config(tmp_path, max_kill_grace=3.0))
    yield h
    if h.worker.running:
        await h.worker.stopService()


async def stubborn_job(h: Harness, tmp_path: Path) -> str:
    """A running job that ignores SIGTERM; its id."""
    request = job(make_bundle(tmp_path), entrypoint(trap_sigterm_and_report))
    await h.client.run_job(request)
    await h.wait_state(request.job_id, {pb.JOB_STATE_RUNNING})

    async def ready() -> bool:
        return any(e.data == "ready" for e in await h.client.fetch_logs(request.job_id))

    await until(ready, 60, "the job to install its SIGTERM handler")
    return request.job_id


async def got_sigterm(h: Harness, job_id: str) -> None:
    async def seen() -> bool:
        return any(e.data == "got SIGTERM" for e in await h.client.fetch_logs(job_id))

    await until(seen, 30, "the job to get its SIGTERM")


async def when_done(d: Deferred[Any], timeout: float, what: str) -> float:
    """Seconds until ``d`` fires; fails past ``timeout``."""
    started = time.monotonic()

    async def done() -> bool:
        return d.called

    await until(done, timeout, what)
    await d
    return time.monotonic() - started


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_a_later_kill_with_a_shorter_grace_shortens_the_wait(tmp_path: Path) -> None:
    # No cap here that could hide the bug: the first kill alone would take 600 s.
    h = await start_worker(worker_config(tmp_path))
    try:
        job_id = await stubborn_job(h, tmp_path)
        first = ensureDeferred(h.client.call("KillJob", pb.KillJobRequest(job_id=job_id, term_timeout_ms=600_000),
                                             pb.Empty))
        await got_sigterm(h, job_id)
        assert not first.called
        second = ensureDeferred(h.client.kill(job_id, term_timeout_ms=100))
        # Both callers get their answer once the job is dead: well before 600 s.
        await when_done(second, 60, "the second kill to return")
        await when_done(first, 10, "the first kill to return")
        status = await h.client.status(job_id)
        assert status.state == pb.JOB_STATE_KILLED
        assert status.exit_code == 137  # SIGKILL: the grace was cut short
    finally:
        await h.worker.stopService()


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_the_grace_is_capped_by_max_kill_grace(harness: Harness, tmp_path: Path) -> None:
    job_id = await stubborn_job(harness, tmp_path)
    kill = ensureDeferred(harness.client.kill(job_id, term_timeout_ms=2**31 - 1))  # about 24.8 days
    elapsed = await when_done(kill, 60, "the capped kill to return")
    assert elapsed >= 2.5  # the capped grace (3 s) was given...
    status = await harness.client.status(job_id)
    assert status.state == pb.JOB_STATE_KILLED and status.exit_code == 137  # ...then SIGKILL


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_a_worker_stop_does_not_wait_for_a_pending_long_grace(tmp_path: Path) -> None:
    h = await start_worker(worker_config(tmp_path))
    job_id = await stubborn_job(h, tmp_path)
    kill = ensureDeferred(h.client.kill(job_id, term_timeout_ms=90_000))
    kill.addErrback(lambda _: None)  # the worker goes away under it
    await got_sigterm(h, job_id)
    stopping = ensureDeferred(_stop(h))
    # The stop's own grace is 5 s; 90 s would be the bug.
    await when_done(stopping, 60, "the worker to stop")
    record = h.worker.manager.find(job_id)
    assert record is not None and record.state.terminal


async def _stop(h: Harness) -> None:
    await h.worker.stopService()
