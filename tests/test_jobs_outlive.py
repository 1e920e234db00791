"""The job core on fakes and a task.Clock (fluster_worker.testing.jobs.JobRig):
kills decide once and correctly, error paths end jobs, jobs outlive the worker
(re-adoption, restarts, lost jobs, orphans), engine outages and failed saves."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from fluster_worker.containers.runtime import ContainerSpec
from fluster_worker.jobs import store as store_module
from fluster_worker.jobs.model import JobRequest, JobState, ResourcesExhausted, WorkerUnavailable
from fluster_worker.logs import LogStore
from fluster_worker.node import NodeConditions
from fluster_worker.node.conditions import EXHAUSTED, UNAVAILABLE
from fluster_worker.testing.containers import SIGTERM_EXIT
from fluster_worker.testing.jobs import JobRig, result


def running(rig: JobRig, job_id: str = "job-1", **fields: Any) -> None:
    rig.submit(job_id, **fields)
    assert rig.record(job_id).state is JobState.RUNNING, rig.record(job_id)


def kill(rig: JobRig, job_id: str, term_timeout_ms: int) -> Deferred[None]:
    return Deferred.fromCoroutine(rig.manager.kill(job_id, term_timeout_ms))


def write_result(rig: JobRig, job_id: str = "job-1") -> None:
    (rig.store.out_dir(job_id) / "result.pkl").write_bytes(b"\x80\x05result")


def on_disk(rig: JobRig, job_id: str = "job-1") -> dict[str, Any]:
    return json.loads((rig.store.job_dir(job_id) / "record.json").read_text())  # type: ignore[no-any-return]


def restarted(rig: JobRig, **kw: Any) -> JobRig:
    """The worker stops (leaving its jobs) and a new process starts on the same
    state dir and engine."""
    result(rig, rig.stop())
    again = JobRig(rig.root, runtime=rig.runtime, **kw)
    again.start()
    return again


def states(rig: JobRig, job_id: str = "job-1") -> list[str]:
    """The states announced for the job (each change once, in order)."""
    out: list[str] = []
    for jid, state, _ in rig.changes:
        if jid == job_id and (not out or out[-1] != state):
            out.append(state)
    return out


# -- kills decide once, at the exit ---------------------------------------------------


def test_a_kill_after_the_exit_changes_nothing(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig)
    container = rig.container()
    container.print("stdout", "the last line")
    write_result(rig)
    removal = rig.runtime.hold("remove")  # the job is still cleaning up when the kill comes
    container.exit(0)
    rig.settle()
    assert removal.reached.called
    killing = kill(rig, "job-1", 100)
    removal.release()
    result(rig, killing)
    record = rig.record()
    assert (record.state, record.exit_code, record.error, record.has_result) == (JobState.SUCCEEDED, 0, "", True)
    assert container.signals == []


def test_a_kill_racing_the_exit_stands_only_if_its_signal_landed(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig)
    container = rig.container()
    sigterm = rig.runtime.hold("terminate")
    killing = kill(rig, "job-1", 100)
    rig.settle()
    assert sigterm.reached.called
    container.exit(0)  # it ends on its own while the SIGTERM call is in flight
    rig.settle()
    assert rig.record().state is JobState.RUNNING  # undecided until the call answers
    sigterm.release()
    result(rig, killing)
    assert (rig.record().state, rig.record().exit_code) == (JobState.SUCCEEDED, 0)


def test_a_kill_that_lands_kills(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig)
    result(rig, kill(rig, "job-1", 100))
    record = rig.record()
    assert (record.state, record.exit_code, record.error) == (JobState.KILLED, SIGTERM_EXIT, "Killed by request")
    assert record.stop is not None and record.stop.signalled_ms > 0
    assert rig.runtime.live() == []


def test_a_kill_during_the_build_ends_killed_and_cancels_the_build(tmp_path: Path) -> None:
    rig = JobRig(tmp_path, auto_build=False)
    rig.start()
    rig.submit()
    assert rig.record().state is JobState.BUILDING
    result(rig, kill(rig, "job-1", 100))
    record = rig.record()
    assert (record.state, record.error) == (JobState.KILLED, "Killed by request")
    assert rig.builder.builds[0].cancelled
    assert rig.runtime.operations("create") == []


def test_a_build_failing_because_of_the_cancel_still_ends_killed(tmp_path: Path) -> None:
    rig = JobRig(tmp_path, auto_build=False)
    rig.start()
    rig.submit()
    build = rig.builder.builds[0]
    # A builder whose cancel surfaces as its own error (as ImageBuilder's used to).
    build.deferred._canceller = lambda d: d.errback(Exception("image build failed: CancelledError"))
    result(rig, kill(rig, "job-1", 100))
    assert (rig.record().state, rig.record().error) == (JobState.KILLED, "Killed by request")


def test_a_timeout_that_loses_the_race_with_the_exit_changes_nothing(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig, timeout_seconds=10)
    container = rig.container()
    sigterm = rig.runtime.hold("terminate")
    rig.advance(10)
    assert sigterm.reached.called
    container.exit(0)
    sigterm.release()
    rig.settle()
    assert (rig.record().state, rig.record().error) == (JobState.SUCCEEDED, "")


# -- error paths end jobs ------------------------------------------------------------


def test_an_exception_starting_the_pipeline_fails_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: LogStore, job_id: str) -> Any:
        raise ValueError(f"invalid job id {job_id!r}")

    monkeypatch.setattr(LogStore, "open", refuse)
    rig = JobRig(tmp_path)
    rig.start()
    rig.submit()
    record = rig.record()
    assert record.state is JobState.FAILED
    assert record.error == "worker error: ValueError: invalid job id 'job-1'"
    assert on_disk(rig)["state"] == "FAILED"


def test_a_job_that_cannot_be_saved_is_refused_and_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = JobRig(tmp_path)
    rig.start()

    def full(path: Path, data: bytes, *args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "write_atomically", full)
    record = rig.manager.submit(JobRequest(job_id="job-1", entrypoint=b"x"))
    accepted = rig.manager.accepted(record.job_id)
    with pytest.raises(ResourcesExhausted, match="cannot save job job-1 to disk: .*No space left"):
        result(rig, accepted)
    assert rig.manager.find("job-1") is None
    assert rig.runtime.operations("create") == []
    assert ("job-1", "FAILED", "failed") not in rig.changes


# -- the worker stops: jobs run on, or drain ----------------------------------------------


def test_stopping_leaves_jobs_running_and_their_records_as_they_are(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig)
    result(rig, rig.stop())
    assert rig.container().state == "running"
    assert rig.container().signals == []
    assert on_disk(rig)["state"] == "RUNNING"
    assert rig.followers.followers[0].stopped  # its `docker logs` is gone


def test_stop_jobs_on_exit_drains(tmp_path: Path) -> None:
    rig = JobRig(tmp_path, stop_jobs_on_exit=True)
    rig.start()
    running(rig)
    result(rig, rig.stop())
    assert (rig.record().state, rig.record().error) == (JobState.WORKER_FAILED, "worker shut down")
    assert rig.runtime.live() == []


# -- a restarted worker re-adopts its containers ------------------------------------------


def test_a_re_adopted_job_ends_with_its_real_outcome_and_every_line_once(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig)
    container = rig.container()
    for i in range(3):
        container.print("stdout", f"line {i}")
    rig.settle()
    result(rig, rig.stop())
    container.print("stdout", "line 3")  # while no worker watches
    again = restarted(rig)
    assert again.record().state is JobState.RUNNING
    assert again.manager.running_count() == 1  # HealthCheck's running_jobs
    container.print("stdout", "line 4")
    write_result(again)
    container.exit(0)
    again.settle()
    record = again.record()
    assert (record.state, record.exit_code, record.has_result) == (JobState.SUCCEEDED, 0, True)
    assert again.manager.running_count() == 0
    assert again.lines(source="stdout") == [f"line {i}" for i in range(5)]
    assert states(again) == ["SUCCEEDED"]  # announced (reported) once
    assert again.runtime.live() == []


def test_a_job_that_exited_while_the_worker_was_away_gets_its_true_outcome(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig)
    container = rig.container()
    result(rig, rig.stop())
    container.print("stderr", "Traceback: boom")
    container.exit(3)
    again = restarted(rig)
    record = again.record()
    assert (record.state, record.exit_code, record.error) == (JobState.FAILED, 3, "Exit code: 3")
    assert again.lines(source="stderr") == ["Traceback: boom"]
    assert states(again) == ["FAILED"]


def test_an_oom_while_away_says_so(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig, memory="512m")
    container = rig.container()
    result(rig, rig.stop())
    container.exit(137, oom_killed=True)
    again = restarted(rig)
    assert again.record().state is JobState.FAILED
    assert "Out of memory" in again.record().error and "512m" in again.record().error


def test_kill_and_timeout_work_on_a_re_adopted_job(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig, "killed")
    running(rig, "timed", timeout_seconds=60)
    deadline = rig.record("timed").deadline_ms
    assert deadline == rig.record("timed").started_at_ms + 60_000
    rig.advance(20)
    again = restarted(rig)
    assert again.record("timed").deadline_ms == deadline  # kept across the restart
    result(again, kill(again, "killed", 100))
    assert (again.record("killed").state, again.record("killed").exit_code) == (JobState.KILLED, SIGTERM_EXIT)
    again.advance(39)
    assert again.record("timed").state is JobState.RUNNING
    again.advance(1)
    record = again.record("timed")
    assert (record.state, record.error) == (JobState.FAILED, "Timeout exceeded")


def test_a_kill_asked_before_the_restart_is_carried_out(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig)
    container = rig.container()
    container.on_sigterm = "ignore"
    kill(rig, "job-1", 60_000)
    rig.settle()
    assert on_disk(rig)["stop"]["state"] == "KILLED"
    again = restarted(rig)
    again.advance(60)
    assert again.record().state is JobState.KILLED


def test_a_job_whose_container_vanished_is_lost_without_an_invented_exit_code(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig)
    result(rig, rig.stop())
    rig.container().state = "removed"  # someone removed it while the worker was away
    again = restarted(rig)
    record = again.record()
    assert record.state is JobState.WORKER_FAILED
    assert "lost" in record.error and "exit status is unknown" in record.error
    assert record.exit_code == 0  # the wire's "no exit code"


def test_waiting_jobs_start_again_in_arrival_order_once_each(tmp_path: Path) -> None:
    rig = JobRig(tmp_path, slots=1, auto_build=False)
    rig.start()
    for job_id in ("a", "b", "c"):
        rig.submit(job_id)
    assert [rig.record(j).state for j in "abc"] == [JobState.BUILDING, JobState.PENDING, JobState.PENDING]
    again = restarted(rig, slots=1, auto_build=False)
    assert [again.record(j).state for j in "abc"] == [JobState.BUILDING, JobState.PENDING, JobState.PENDING]
    for build in again.builder.builds:
        build.finish()
    again.settle()
    while any(c.state == "running" for c in again.runtime.live()):
        next(c for c in again.runtime.live() if c.state == "running").exit(0)
        again.settle()
        for build in again.builder.builds:
            if not build.done:
                build.finish()
        again.settle()
    created = [c.labels["fluster.job_id"] for c in again.runtime.containers.values()]
    assert created == ["a", "b", "c"]
    assert [again.record(j).state for j in "abc"] == [JobState.SUCCEEDED] * 3


def test_a_container_started_by_a_worker_that_died_before_saying_so_is_adopted(tmp_path: Path) -> None:
    rig = JobRig(tmp_path, auto_build=False)
    rig.start()
    record = rig.submit()
    assert record.state is JobState.BUILDING
    result(rig, rig.stop())
    # The previous process had created and started the container, then died.
    labels = {"fluster.worker_id": "fake-worker", "fluster.job_id": "job-1", "fluster.attempt_id": "0"}
    spec = ContainerSpec(name="fake-job-1", image="fluster-job:x", command=["python3"], labels=labels)
    container = rig.runtime.add_container(spec, "running")
    again = JobRig(tmp_path, runtime=rig.runtime, auto_build=False)
    again.start()
    assert again.record().state is JobState.RUNNING
    assert again.builder.builds == []  # not built, not run a second time
    container.exit(0)
    again.settle()
    assert again.record().state is JobState.SUCCEEDED


def test_stray_containers_are_removed_with_the_normal_grace(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig)
    result(rig, rig.stop())
    labels = {"fluster.worker_id": "fake-worker", "fluster.job_id": "nobody", "fluster.attempt_id": "0"}
    stray = rig.runtime.add_container(ContainerSpec(name="stray", image="x", command=["x"], labels=labels))
    stray.on_sigterm = "ignore"
    again = restarted(rig)
    assert ("terminate", stray.id, 5.0) in again.runtime.calls
    assert stray.state == "running"  # the grace runs
    again.advance(5)
    assert stray.state == "removed"
    assert stray.signals == ["SIGTERM", "SIGKILL"]
    assert again.record().state is JobState.RUNNING  # its own job is untouched


# -- the engine goes away ------------------------------------------------------------------


def test_a_job_whose_container_died_with_the_engine_is_the_worker_s_failure(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig)
    rig.container().exit(SIGTERM_EXIT, engine_stopped=True)
    rig.settle()
    record = rig.record()
    assert record.state is JobState.WORKER_FAILED
    assert "Docker engine" in record.error and f"exit status {SIGTERM_EXIT}" in record.error


def test_a_waiting_job_waits_for_the_engine(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    rig.runtime.engine_down()
    rig.submit()
    rig.advance(30)
    assert rig.record().state is JobState.PENDING
    rig.runtime.engine_up()
    rig.settle()
    assert rig.record().state is JobState.RUNNING


def test_leftovers_are_removed_when_the_engine_is_back(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig)
    rig.runtime.engine_down()
    container = rig.container()
    container.exit(SIGTERM_EXIT, engine_stopped=True)  # its removal fails: the engine is away
    rig.settle()
    assert rig.record().state is JobState.WORKER_FAILED
    assert container.state == "exited"
    rig.runtime.engine_up()
    rig.settle()
    assert container.state == "removed"


def test_node_conditions_refuse_new_jobs_saying_why(tmp_path: Path) -> None:
    conditions = NodeConditions(JobRig(tmp_path / "x").clock)
    rig = JobRig(tmp_path, conditions=conditions)
    rig.start()
    conditions.set("engine", UNAVAILABLE, "Docker engine unreachable: connection refused")
    with pytest.raises(WorkerUnavailable, match="Docker engine unreachable"):
        rig.submit()
    conditions.clear("engine")
    conditions.set("disk", EXHAUSTED, "disk nearly full: 10 MiB free")
    with pytest.raises(ResourcesExhausted, match="disk nearly full"):
        rig.submit()
    conditions.clear("disk")
    running(rig)


# -- records that cannot be saved ----------------------------------------------------------


def test_a_terminal_record_that_cannot_be_saved_is_retried_and_keeps_the_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig)
    container = rig.container()
    real = store_module.write_atomically
    full = {"on": True}

    def write(path: Path, data: bytes) -> None:
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(store_module, "write_atomically", write)
    container.exit(0)
    rig.settle()
    assert rig.record().state is JobState.SUCCEEDED  # shown and reported
    assert on_disk(rig)["state"] == "RUNNING"
    assert container.state == "exited"  # kept: a restart would find the same exit
    assert "No space left" in rig.store.save_error
    full["on"] = False
    rig.advance(1)
    assert on_disk(rig)["state"] == "SUCCEEDED"
    assert container.state == "removed"
    assert rig.store.save_error == ""


def test_no_lock_per_job_outlives_its_writes(tmp_path: Path) -> None:
    rig = JobRig(tmp_path, retention_count=3)
    rig.start()
    for i in range(10):
        running(rig, f"j{i}")
        rig.container(f"j{i}").exit(0)
        rig.settle()
    rig.manager.prune()
    rig.settle()
    assert rig.manager.job_count() == 3
    assert rig.store._locks == {}


def test_a_kill_before_the_jobs_are_taken_over_is_kept_and_carried_out(tmp_path: Path) -> None:
    rig = JobRig(tmp_path, slots=1, auto_build=False)
    rig.start()
    rig.submit("a")
    rig.submit("b")
    result(rig, rig.stop())
    rig.runtime.engine_down()  # the new process cannot take its jobs over yet
    again = JobRig(tmp_path, runtime=rig.runtime, slots=1, auto_build=False)
    again.start()
    killing = kill(again, "b", 1000)
    again.settle()
    assert on_disk(again, "b")["stop"]["state"] == "KILLED"
    assert not killing.called
    again.runtime.engine_up()
    result(again, killing)
    assert again.record("b").state is JobState.KILLED
    assert [b.project_dir.parent.name for b in again.builder.builds] == ["a"]


def test_a_job_that_ended_before_its_deadline_while_away_is_no_timeout(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)
    rig.start()
    running(rig, timeout_seconds=30)
    container = rig.container()
    result(rig, rig.stop())
    rig.clock.advance(10)
    container.exit(0)
    rig.clock.advance(60)  # the worker comes back after the deadline
    again = JobRig(tmp_path, runtime=rig.runtime)
    again.start()
    record = again.record()
    assert (record.state, record.error) == (JobState.SUCCEEDED, "")
    assert "timeout" not in " ".join(again.lines(source="error"))


def test_a_stopping_worker_starts_nothing_with_the_slots_it_lets_go(tmp_path: Path) -> None:
    rig = JobRig(tmp_path, slots=1)
    rig.start()
    running(rig, "a")
    rig.submit("b")
    assert rig.record("b").state is JobState.PENDING
    result(rig, rig.stop())
    assert rig.record("b").state is JobState.PENDING
    assert [c.labels["fluster.job_id"] for c in rig.runtime.containers.values()] == ["a"]
