"""The fake ContainerRuntime and LogFollower keep the real ones' contract (as
their callers rely on it), so that unit tests on them mean something."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from fluster_worker.containers.runtime import ContainerError, ContainerSpec, ExitStatus
from fluster_worker.logs import LogQuery, LogStore, LogTailError
from fluster_worker.testing.containers import SIGKILL_EXIT, SIGTERM_EXIT, FakeContainerRuntime
from fluster_worker.testing.follower import FakeLogFollowers
from fluster_worker.testing.logs import InlinePool


def spec(name: str = "fluster-test-job-0-abc", **labels: str) -> ContainerSpec:
    return ContainerSpec(name=name, image="fluster-job:fake", command=["python"], labels=labels)


def outcome(d: Deferred[Any]) -> Any:
    """The result (or Failure) ``d`` fired with; fail the test if it has not."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


@pytest.fixture
def runtime() -> FakeContainerRuntime:
    rt = FakeContainerRuntime(Clock())
    rt.startService()
    return rt


def started(rt: FakeContainerRuntime, name: str = "fluster-test-job-0-abc") -> str:
    cid = outcome(rt.create(spec(name)))
    assert outcome(rt.start(cid)) is None
    return str(cid)


def test_wait_fires_once_the_test_ends_the_container(runtime: FakeContainerRuntime) -> None:
    cid = started(runtime)
    first, second = runtime.wait(cid), runtime.wait(cid)
    assert first is not second and not first.called
    runtime.container(cid).exit(3, oom_killed=True)
    status = outcome(first)
    assert status == outcome(second) == ExitStatus(3, True, int(runtime.clock.seconds() * 1000))
    assert outcome(runtime.wait(cid)) == status  # after the exit: at once
    assert outcome(runtime.is_running(cid)) is False


def test_a_cancelled_waiter_is_dropped_alone(runtime: FakeContainerRuntime) -> None:
    cid = started(runtime)
    dropped, kept = runtime.wait(cid), runtime.wait(cid)
    dropped.cancel()
    assert isinstance(outcome(dropped), Failure)
    runtime.container(cid).exit(0)
    assert outcome(kept).exit_code == 0


def test_terminate_sigterm_then_sigkill_after_the_grace(runtime: FakeContainerRuntime) -> None:
    polite, stubborn = started(runtime, "polite"), started(runtime, "stubborn")
    runtime.container(stubborn).on_sigterm = "ignore"
    assert outcome(runtime.terminate(polite, 10)).exit_code == SIGTERM_EXIT
    d = runtime.terminate(stubborn, 10)
    runtime.clock.advance(9.9)
    assert not d.called and runtime.container(stubborn).signals == ["SIGTERM"]
    runtime.clock.advance(0.1)
    assert outcome(d).exit_code == SIGKILL_EXIT
    assert runtime.container(stubborn).signals == ["SIGTERM", "SIGKILL"]
    assert not runtime.clock.getDelayedCalls()


def test_a_second_terminate_only_brings_the_sigkill_forward(runtime: FakeContainerRuntime) -> None:
    cid = started(runtime)
    container = runtime.container(cid)
    container.on_sigterm = "ignore"
    first = runtime.terminate(cid, 60)
    runtime.clock.advance(10)
    later = runtime.terminate(cid, 120)  # longer: changes nothing
    sooner = runtime.terminate(cid, 5)
    runtime.clock.advance(4.9)
    assert container.signals == ["SIGTERM"]
    runtime.clock.advance(0.1)
    assert container.signals == ["SIGTERM", "SIGKILL"]
    assert outcome(first).exit_code == outcome(later).exit_code == outcome(sooner).exit_code == SIGKILL_EXIT
    assert ("signal", cid, "SIGKILL") in runtime.calls
    assert not runtime.clock.getDelayedCalls()


def test_terminate_of_a_container_never_started_fails(runtime: FakeContainerRuntime) -> None:
    cid = outcome(runtime.create(spec()))
    failure = outcome(runtime.terminate(cid, 1))
    assert isinstance(failure, Failure) and failure.check(ContainerError)
    assert "never started" in failure.getErrorMessage()


def test_remove_kills_a_running_container_and_fails_waiters_of_one_never_started(
    runtime: FakeContainerRuntime,
) -> None:
    running = started(runtime, "running")
    created = outcome(runtime.create(spec("created")))
    on_running, on_created = runtime.wait(running), runtime.wait(created)
    outcome(runtime.remove(running))
    outcome(runtime.remove(created))
    outcome(runtime.remove(created))  # twice is fine
    assert outcome(on_running).exit_code == SIGKILL_EXIT
    failure = outcome(on_created)
    assert isinstance(failure, Failure) and "removed before it started" in failure.getErrorMessage()
    assert runtime.live() == []


def test_hold_and_fail_next_play_races(runtime: FakeContainerRuntime) -> None:
    hold = runtime.hold("create")
    d = runtime.create(spec())
    assert hold.reached.called and not d.called and runtime.live() == []
    hold.release()
    cid = outcome(d)
    assert [c.id for c in runtime.live()] == [cid]
    runtime.fail_next("start", "container start failed: no space left on device")
    failure = outcome(runtime.start(cid))
    assert isinstance(failure, Failure) and failure.check(ContainerError)
    assert outcome(runtime.start(cid)) is None  # only the next one failed
    assert [c[0] for c in runtime.calls] == ["create", "start", "start"]


def test_an_engine_outage_fails_every_call(runtime: FakeContainerRuntime) -> None:
    cid = started(runtime)
    runtime.engine_error = "Cannot connect to the Docker daemon"
    for d in (runtime.create(spec("other")), runtime.remove(cid), runtime.wait(cid), runtime.list_ours()):
        failure = outcome(d)
        assert isinstance(failure, Failure) and "Cannot connect" in failure.getErrorMessage()
    assert outcome(runtime.is_running(cid)) is False  # unknown counts as not running


def test_the_worker_id_label_is_enforced(runtime: FakeContainerRuntime) -> None:
    failure = outcome(runtime.create(spec(**{"fluster.worker_id": "someone-else"})))
    assert isinstance(failure, Failure) and failure.check(ContainerError)
    cid = outcome(runtime.create(spec()))
    assert runtime.container(cid).labels["fluster.worker_id"] == runtime.worker_id


def test_stopping_fails_waiters_and_leaves_containers(runtime: FakeContainerRuntime) -> None:
    cid = started(runtime)
    d = runtime.wait(cid)
    outcome(runtime.stopService())
    assert isinstance(outcome(d), Failure)
    assert runtime.container(cid).state == "running"
    assert isinstance(outcome(runtime.wait(cid)), Failure)  # needs the service running


def test_remove_orphans_removes_what_a_previous_process_left(runtime: FakeContainerRuntime) -> None:
    left = runtime.add_container(spec("left-running"))
    runtime.add_container(spec("left-exited"), state="exited")
    assert outcome(runtime.remove_orphans()) == 2
    assert runtime.live() == [] and left.status is not None


def test_the_fake_follower_stores_the_output_then_fires(tmp_path: Path, runtime: FakeContainerRuntime) -> None:
    clock = runtime.clock
    logs = LogStore(tmp_path, InlinePool(), clock, batch_delay_s=0)  # type: ignore[arg-type]
    followers = FakeLogFollowers(runtime)
    cid = started(runtime)
    container = runtime.container(cid)
    container.print("stdout", "before")
    job_log = logs.open("job")
    done = followers(job_log, cid).follow()
    container.print("stderr", "during")
    clock.advance(0)
    assert not done.called
    container.exit(0)
    for _ in range(10):
        clock.advance(0)
    assert outcome(done) is None
    query = logs.query("job", LogQuery())
    clock.advance(0)
    assert [(x.source, x.data) for x in outcome(query)] == [("stdout", "before"), ("stderr", "during")]
    entries = outcome(runtime.last_log_entries(cid, 16))
    assert entries[1].endswith(b" before\n") and entries[2].endswith(b" during\n")

    followers.fail_with = "docker logs failed 9 times"
    other = started(runtime, "other")
    failing = followers(logs.open("other"), other).follow()
    runtime.container(other).exit(0)
    for _ in range(10):
        clock.advance(0)
    failure = outcome(failing)
    assert isinstance(failure, Failure) and failure.check(LogTailError)
