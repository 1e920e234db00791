"""JobManager on the fakes of ``fluster_worker.testing`` and a ``task.Clock``:
RunJob (idempotence, replaced attempts, refusals), arrival order, shutdown,
recovery of records, retention. No Docker, no sleeps."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, fail

from fluster_worker.containers.runtime import ContainerSpec
from fluster_worker.jobs.model import (
    InvalidJobRequest,
    JobAlreadyExists,
    JobNotFound,
    JobRequest,
    JobState,
    PreconditionFailed,
    ResourcesExhausted,
    WorkerUnavailable,
)
from fluster_worker.testing.containers import SIGKILL_EXIT
from fluster_worker.testing.jobs import ENTRYPOINT, JobRig, result

MakeRig = Callable[..., JobRig]


@pytest.fixture
def rig(make_job_rig: MakeRig) -> JobRig:
    rig = make_job_rig()
    rig.start()
    return rig


def finish(rig: JobRig, job_id: str, code: int = 0) -> None:
    rig.container(job_id).exit(code)
    rig.settle()


def saved_state(rig: JobRig, job_id: str) -> str:
    record = json.loads((rig.store.job_dir(job_id) / "record.json").read_text())
    return str(record["state"])


# -- RunJob --------------------------------------------------------------------------


def test_run_job_answers_pending_at_once_and_saves_the_record(make_job_rig: MakeRig) -> None:
    rig = make_job_rig()
    rig.start()
    rig.pool.paused = True  # the disk is slow
    record = rig.manager.submit(JobRequest(job_id="job-1", entrypoint=ENTRYPOINT))
    assert record.state is JobState.PENDING and record.worker_id == "fake-worker"
    rig.settle()
    assert rig.pool.queued and record.state is JobState.PENDING
    rig.pool.resume()
    rig.settle()
    assert record.state is JobState.RUNNING and saved_state(rig, "job-1") == "RUNNING"
    assert (rig.store.entrypoint_path("job-1")).read_bytes() == ENTRYPOINT
    finish(rig, "job-1")
    assert saved_state(rig, "job-1") == "SUCCEEDED"


def test_a_job_without_an_id_gets_one(rig: JobRig) -> None:
    record = rig.manager.submit(JobRequest(entrypoint=ENTRYPOINT))
    assert record.job_id.startswith("job-") and rig.manager.get(record.job_id) is record


def test_run_job_is_idempotent_per_attempt(rig: JobRig) -> None:
    first = rig.submit("job-1", attempt_id=2)
    again = rig.submit("job-1", attempt_id=2, env_vars={"X": "ignored"})
    assert again is first
    assert len(rig.runtime.containers) == 1
    finish(rig, "job-1")
    assert rig.submit("job-1", attempt_id=2) is first  # also once it finished
    assert first.state is JobState.SUCCEEDED and len(rig.runtime.containers) == 1


def test_another_attempt_of_a_live_job_or_an_older_one_is_refused(rig: JobRig) -> None:
    rig.submit("job-1", attempt_id=1)
    with pytest.raises(JobAlreadyExists, match="already RUNNING as attempt 1"):
        rig.submit("job-1", attempt_id=2)
    finish(rig, "job-1")
    with pytest.raises(JobAlreadyExists, match="already ran as attempt 1"):
        rig.submit("job-1", attempt_id=0)


def test_a_new_attempt_replaces_a_finished_one_and_its_files(rig: JobRig) -> None:
    old = rig.submit("job-1", attempt_id=1)
    rig.container("job-1").print("stdout", "attempt 1 output")
    finish(rig, "job-1", code=1)
    assert old.state is JobState.FAILED
    (rig.store.out_dir("job-1") / "left-over").write_text("x")  # (its workdir went when it ended)
    new = rig.submit("job-1", attempt_id=2)
    assert new is not old and rig.manager.get("job-1") is new
    assert new.state is JobState.RUNNING and new.attempt_id == 2
    assert not (rig.store.out_dir("job-1") / "left-over").exists()
    assert "attempt 1 output" not in rig.lines()
    assert rig.container("job-1").spec.labels["fluster.attempt_id"] == "2"
    assert rig.container("job-1").spec.env["FLUSTER_ATTEMPT_ID"] == "2"
    finish(rig, "job-1")
    assert new.state is JobState.SUCCEEDED and saved_state(rig, "job-1") == "SUCCEEDED"


@pytest.mark.parametrize(
    ("request_fields", "error", "message"),
    [
        ({"job_id": "../etc"}, InvalidJobRequest, "invalid job_id"),
        ({"entrypoint": b""}, InvalidJobRequest, "serialized_entrypoint is empty"),
        ({"cpu": 5}, InvalidJobRequest, "exceeds this worker's 4 cores"),
        ({"timeout_seconds": -1}, InvalidJobRequest, "invalid timeout_seconds"),
        ({"bundle_url": "ftp://x/b.zip"}, InvalidJobRequest, "unsupported bundle_gcs_path"),
        ({"port_names": ("http", "http")}, InvalidJobRequest, "http"),
    ],
)
def test_a_bad_request_is_refused_before_any_work(
    rig: JobRig, request_fields: dict[str, object], error: type[Exception], message: str
) -> None:
    fields: dict[str, object] = {"job_id": "job-1", "entrypoint": ENTRYPOINT, **request_fields}
    with pytest.raises(error, match=message):
        rig.manager.submit(JobRequest(**fields))  # type: ignore[arg-type]
    assert rig.manager.records() == [] and rig.runtime.calls[2:] == []
    assert rig.ports.held == frozenset()


def test_runjob_past_max_pending_jobs_is_resources_exhausted(make_job_rig: MakeRig) -> None:
    rig = make_job_rig(slots=1, max_pending_jobs=2)
    rig.start()
    assert rig.submit("job-1").state is JobState.RUNNING
    waiting = [rig.submit(f"job-{i}", port_names=("http",)) for i in (2, 3)]
    assert [r.state for r in waiting] == [JobState.PENDING, JobState.PENDING]
    held = set(rig.ports.held)
    with pytest.raises(ResourcesExhausted, match=r"^2 jobs are already waiting to start \(--max-pending-jobs 2\)"):
        rig.submit("job-4", port_names=("http",))
    assert rig.manager.find("job-4") is None
    assert rig.ports.held == held  # refused before any port is taken
    # A retried RunJob of a waiting job is still answered (idempotent).
    assert rig.manager.submit(JobRequest(job_id="job-2", entrypoint=ENTRYPOINT)) is waiting[0]
    finish(rig, "job-1")
    assert rig.record("job-2").state is JobState.RUNNING
    assert rig.submit("job-4").state is JobState.PENDING


def test_no_ports_left_is_resources_exhausted_and_holds_none(make_job_rig: MakeRig) -> None:
    rig = make_job_rig(port_range=(31000, 31002))
    rig.start()
    first = rig.submit("job-1", port_names=("a", "b"))
    with pytest.raises(ResourcesExhausted, match="not enough free ports"):
        rig.submit("job-2", port_names=("c", "d"))
    assert rig.manager.find("job-2") is None
    assert rig.ports.held == set(first.ports.values())
    finish(rig, "job-1")
    assert rig.submit("job-2", port_names=("c", "d")).state is JobState.RUNNING


def test_unknown_jobs_and_finished_jobs(rig: JobRig) -> None:
    with pytest.raises(JobNotFound, match="job nope not found"):
        rig.manager.get("nope")
    with pytest.raises(JobNotFound):
        result(rig, Deferred.fromCoroutine(rig.manager.kill("nope", 0)))
    with pytest.raises(InvalidJobRequest):
        rig.manager.get("../x")
    assert rig.manager.find("../x") is None
    rig.submit("job-1")
    with pytest.raises(InvalidJobRequest, match="invalid term_timeout_ms"):
        result(rig, Deferred.fromCoroutine(rig.manager.kill("job-1", -1)))
    finish(rig, "job-1")
    with pytest.raises(PreconditionFailed, match="already finished as SUCCEEDED"):
        result(rig, Deferred.fromCoroutine(rig.manager.kill("job-1", 0)))
    assert result(rig, Deferred.fromCoroutine(rig.manager.result("job-1"))) == b""  # it left none


def test_the_result_of_a_succeeded_job(rig: JobRig) -> None:
    rig.submit("job-1")
    (rig.store.out_dir("job-1") / "result.pkl").write_bytes(b"pickled")
    running = Deferred.fromCoroutine(rig.manager.result("job-1"))
    assert result(rig, running) == b""  # not before it succeeded
    finish(rig, "job-1")
    assert rig.record("job-1").has_result
    assert result(rig, Deferred.fromCoroutine(rig.manager.result("job-1"))) == b"pickled"


# -- arrival order -------------------------------------------------------------------


def test_jobs_take_free_slots_in_arrival_order(make_job_rig: MakeRig) -> None:
    rig = make_job_rig(slots=2)
    rig.start()
    for name in ("a", "b", "c", "d", "e"):
        rig.submit(name)
    states = {r.job_id: r.state for r in rig.manager.records()}
    assert states == {
        "a": JobState.RUNNING,
        "b": JobState.RUNNING,
        "c": JobState.PENDING,
        "d": JobState.PENDING,
        "e": JobState.PENDING,
    }
    assert rig.manager.running_count() == 2
    finish(rig, "b")
    assert rig.record("c").state is JobState.RUNNING and rig.record("d").state is JobState.PENDING
    finish(rig, "a")
    assert rig.record("d").state is JobState.RUNNING and rig.record("e").state is JobState.PENDING
    assert rig.manager.running_count() == 2
    started = [c.spec.labels["fluster.job_id"] for c in rig.runtime.containers.values()]
    assert started == ["a", "b", "c", "d"]
    for name in ("c", "d", "e"):
        finish(rig, name)
    assert rig.manager.running_count() == 0


def test_the_line_is_the_order_of_arrival_not_of_the_disk(make_job_rig: MakeRig) -> None:
    rig = make_job_rig(slots=1)
    rig.start()
    rig.pool.paused = True
    first, second = rig.submit("first"), rig.submit("second")
    rig.pool.resume(newest_first=True)  # the second job's files are ready first
    rig.settle()
    assert (first.state, second.state) == (JobState.RUNNING, JobState.PENDING)
    finish(rig, "first")
    assert second.state is JobState.RUNNING


def test_a_job_whose_files_cannot_be_written_is_refused_and_leaves_the_line(make_job_rig: MakeRig) -> None:
    rig = make_job_rig(slots=1)
    rig.start()
    rig.submit("first")
    prepare = rig.store.prepare
    rig.store.prepare = lambda job_id, entrypoint: fail(OSError(28, "No space left on device"))  # type: ignore[method-assign]
    rig.manager.submit(JobRequest(job_id="broken", entrypoint=ENTRYPOINT))
    accepted = rig.manager.accepted("broken")  # what RunJob awaits before answering
    rig.store.prepare = prepare  # type: ignore[method-assign]
    # RunJob answers only once the job is on disk: this one never was, so it is
    # refused (resource_exhausted) and forgotten, never run.
    with pytest.raises(ResourcesExhausted, match="cannot save job broken to disk: .*No space left on device"):
        result(rig, accepted)
    assert rig.manager.find("broken") is None
    later = rig.submit("later")
    finish(rig, "first")
    assert later.state is JobState.RUNNING  # the broken job did not keep a place in line


def test_a_job_failing_before_its_container_frees_its_slot(make_job_rig: MakeRig) -> None:
    rig = make_job_rig(slots=1)
    rig.start()
    rig.builder.fail_next = "image build failed: no space left on device"
    broken = rig.submit("broken")
    waiting = rig.submit("next")
    assert broken.state is JobState.FAILED and waiting.state is JobState.RUNNING


# -- shutdown ------------------------------------------------------------------------


def test_shutdown_ends_every_live_job_as_worker_failed(make_job_rig: MakeRig) -> None:
    # --stop-jobs-on-exit: the drain (by default a stop leaves the jobs running).
    rig = make_job_rig(slots=1, shutdown_grace_seconds=2.0, stop_jobs_on_exit=True)
    rig.start()
    running = rig.submit("running")
    pending = rig.submit("pending")
    rig.container("running").on_sigterm = "ignore"
    stopped = rig.stop()
    rig.advance(1.9)
    assert not stopped.called and running.state is JobState.RUNNING
    rig.advance(0.1)
    result(rig, stopped)
    for record in (running, pending):
        assert (record.state, record.error) == (JobState.WORKER_FAILED, "worker shut down")
        assert saved_state(rig, record.job_id) == "WORKER_FAILED"
    assert running.exit_code == SIGKILL_EXIT
    assert rig.container("running").signals == ["SIGTERM", "SIGKILL"]
    assert rig.runtime.live() == [] and len(rig.runtime.containers) == 1  # "pending" never got one
    assert not rig.timers()


def test_shutdown_with_nothing_running_is_at_once(rig: JobRig) -> None:
    rig.submit("done")
    finish(rig, "done")
    result(rig, rig.stop())
    assert rig.record("done").state is JobState.SUCCEEDED


def test_a_listener_that_raises_does_not_stop_the_job(rig: JobRig) -> None:
    def broken(record: object) -> None:
        raise RuntimeError("listener bug")

    rig.manager.add_listener(broken)
    record = rig.submit("job-1")
    finish(rig, "job-1")
    assert record.state is JobState.SUCCEEDED


# -- restart: records of a previous run ----------------------------------------------


def test_before_recovery_run_job_is_unavailable(make_job_rig: MakeRig) -> None:
    rig = make_job_rig()
    with pytest.raises(WorkerUnavailable, match="the worker is starting"):
        rig.manager.submit(JobRequest(job_id="job-1", entrypoint=ENTRYPOINT))


def test_a_restarted_manager_answers_for_the_jobs_of_the_previous_one(tmp_path: Path, make_job_rig: MakeRig) -> None:
    before = make_job_rig(tmp_path)
    before.start()
    before.submit("finished")
    finish(before, "finished")
    before.submit("unfinished")
    assert before.manager.running_count() == 1
    # The process dies: no stopService.
    after = make_job_rig(tmp_path)
    after.start()
    assert after.manager.running_count() == 0  # its one RUNNING record was lost
    assert after.record("finished").state is JobState.SUCCEEDED
    unfinished = after.record("unfinished")
    # Its container is gone with the old engine (a new fake runtime): lost.
    assert unfinished.state is JobState.WORKER_FAILED
    assert unfinished.error.startswith("the worker lost the job: its container")
    assert saved_state(after, "unfinished") == "WORKER_FAILED"
    with pytest.raises(JobAlreadyExists):
        after.submit("finished", attempt_id=-1)


def test_recovery_removes_containers_a_previous_process_left(make_job_rig: MakeRig) -> None:
    rig = make_job_rig()
    left = rig.runtime.add_container(ContainerSpec(name="fluster-fake-worker-old-0-abc", image="x", command=["x"]))
    rig.start()
    assert left.state == "removed"


# -- retention -----------------------------------------------------------------------


def test_finished_jobs_past_the_retention_count_are_forgotten_oldest_first(make_job_rig: MakeRig) -> None:
    rig = make_job_rig(retention_count=2)
    rig.start()
    for name in ("a", "b", "c"):
        rig.submit(name)
        rig.container(name).print("stdout", f"{name} output")
        rig.advance(1)
        finish(rig, name)
    assert sorted(r.job_id for r in rig.manager.records()) == ["b", "c"]
    assert not rig.store.job_dir("a").exists() and rig.lines("a") == []
    assert rig.lines("b", source="stdout") == ["b output"]
    with pytest.raises(JobNotFound):
        rig.manager.get("a")


def test_live_jobs_are_never_pruned(make_job_rig: MakeRig) -> None:
    rig = make_job_rig(retention_count=1, slots=3)
    rig.start()
    for name in ("a", "b", "c"):
        rig.submit(name)
    rig.manager.prune()
    assert rig.manager.job_count() == 3
    finish(rig, "b")
    assert sorted(r.job_id for r in rig.manager.records()) == ["a", "c"]


def test_finished_jobs_past_the_retention_age_are_forgotten(make_job_rig: MakeRig) -> None:
    rig = make_job_rig(retention_seconds=3600)
    rig.start()
    rig.submit("old")
    finish(rig, "old")
    rig.advance(1800)
    rig.submit("young")
    finish(rig, "young")
    rig.advance(1800)  # "old" is now 3600 s old: the next periodic prune (every 60 s) drops it
    rig.advance(60)
    assert [r.job_id for r in rig.manager.records()] == ["young"]
    assert not rig.store.job_dir("old").exists()
    assert rig.builder.gc_calls >= 60  # the image gc runs with every prune
