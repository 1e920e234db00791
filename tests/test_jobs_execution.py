"""One job's run (JobExecution, through the JobManager) on the fakes of
``fluster_worker.testing`` and a ``task.Clock``: no Docker, no sleeps. State
transitions, each way a job fails, kill in every phase, and timeout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred

from fluster_worker.containers.runtime import UsageSample
from fluster_worker.jobs.model import JobRecord, JobState, PreconditionFailed
from fluster_worker.testing.containers import SIGKILL_EXIT, SIGTERM_EXIT
from fluster_worker.testing.jobs import JobRig, result

BUILDING_PHASES = ["downloading bundle", "building image", "preparing container"]


MakeRig = Callable[..., JobRig]


@pytest.fixture
def rig(make_job_rig: MakeRig) -> JobRig:
    rig = make_job_rig()
    rig.start()
    return rig


def watch_terminal(rig: JobRig) -> list[tuple[str, int, bool]]:
    """On each terminal change: (state, live containers, log still open)."""
    seen: list[tuple[str, int, bool]] = []

    def listener(record: JobRecord) -> None:
        if record.state.terminal:
            open_log = record.job_id in rig.logs._logs  # the store's registry of open logs
            seen.append((record.state.name, len(rig.runtime.live()), open_log))

    rig.manager.add_listener(listener)
    return seen


def kill(rig: JobRig, job_id: str = "job-1", term_timeout_ms: int = 0) -> Deferred[None]:
    return Deferred.fromCoroutine(rig.manager.kill(job_id, term_timeout_ms))


def test_a_job_runs_through_every_state_and_leaves_nothing_behind(rig: JobRig) -> None:
    terminal = watch_terminal(rig)
    record = rig.submit("job-1", port_names=("http",))
    assert [(s, m) for _, s, m in rig.changes] == [
        ("PENDING", "queued"),
        *[("BUILDING", m) for m in BUILDING_PHASES],
        ("RUNNING", "running"),
    ]
    container = rig.container()
    assert container.state == "running"
    assert container.spec.env["FLUSTER_JOB_ID"] == "job-1"
    assert container.spec.env["FLUSTER_PORT_HTTP"] == str(record.ports["http"])
    assert container.spec.ports == {record.ports["http"]: record.ports["http"]}
    assert rig.ports.held == {record.ports["http"]}
    assert rig.builder.leases[record.build.image_tag] == 1  # the image is in use

    container.print("stdout", "hello")
    container.exit(0)
    rig.settle()
    assert record.state is JobState.SUCCEEDED and record.exit_code == 0 and record.error == ""
    # The terminal state shows only once the container is gone and the log closed.
    assert terminal == [("SUCCEEDED", 0, False)]
    assert "hello" in rig.lines(source="stdout")
    assert rig.ports.held == frozenset()
    assert not rig.builder.leases
    assert rig.slots.tokens == rig.slots.limit
    assert [c[0] for c in rig.runtime.calls if c[0] in ("create", "start", "remove")] == [
        "create",
        "start",
        "remove",
    ]


@pytest.mark.parametrize(
    ("code", "oom", "error"),
    [
        (3, False, "Exit code: 3"),
        (137, True, "Out of memory: the job exceeded its memory limit (its limit) and was OOM-killed (exit code 137)"),
    ],
)
def test_a_failing_container_fails_the_job(rig: JobRig, code: int, oom: bool, error: str) -> None:
    record = rig.submit()
    rig.container().exit(code, oom_killed=oom)
    rig.settle()
    assert (record.state, record.exit_code, record.error) == (JobState.FAILED, code, error)
    assert error in rig.lines(source="error")
    assert rig.runtime.live() == []


def test_a_bundle_that_cannot_be_fetched_fails_the_job_before_any_container(make_job_rig: MakeRig) -> None:
    rig = make_job_rig()
    rig.start()
    record = rig.submit(bundle_url="https://bundles.test/missing.zip")
    assert record.status_message == "downloading bundle"
    rig.bundles.acquires[0].fail("bundle not found: https://bundles.test/missing.zip (HTTP 404)")
    rig.settle()
    assert record.state is JobState.FAILED
    assert record.error == "bundle not found: https://bundles.test/missing.zip (HTTP 404)"
    assert rig.runtime.containers == {} and rig.builder.builds == []


def test_a_bundle_is_leased_for_the_run_and_mounted_read_only(tmp_path: Path, make_job_rig: MakeRig) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "main.py").write_text("print('hi')\n")
    rig = make_job_rig(bundle_dir=bundle)
    rig.start()
    record = rig.submit(bundle_url="file:///bundles/b.zip")
    assert record.state is JobState.RUNNING
    # The cached bundle itself at /app, read-only: no copy per job.
    (app,) = [m for m in rig.container().spec.mounts if m.target == "/app"]
    assert (app.source, app.read_only) == (bundle, True)
    assert list(rig.store.app_dir("job-1").iterdir()) == []
    assert rig.bundles.leases_held == 1
    assert rig.builder.builds[0].project_dir == bundle
    rig.container().exit(0)
    rig.settle()
    assert rig.bundles.leases_held == 0


def test_a_failed_build_fails_the_job_before_any_container(rig: JobRig) -> None:
    rig.builder.fail_next = "image build failed: uv sync: No solution found for torch==0.0.1"
    record = rig.submit(pip_packages=("torch==0.0.1",))
    assert record.state is JobState.FAILED
    assert record.error == "image build failed: uv sync: No solution found for torch==0.0.1"
    assert "Step 1/1 : FROM fake-base" in rig.lines(source="build")
    assert rig.runtime.containers == {}


@pytest.mark.parametrize("operation", ["create", "start"])
def test_a_container_that_cannot_be_made_fails_the_job(rig: JobRig, operation: str) -> None:
    rig.runtime.fail_next(operation, f"container {operation} failed: no space left on device")
    record = rig.submit()
    assert record.state is JobState.FAILED
    assert record.error == f"container {operation} failed: no space left on device"
    assert rig.runtime.live() == []  # a created container is removed
    assert rig.slots.tokens == rig.slots.limit


def test_logs_that_could_not_be_collected_do_not_change_the_outcome(rig: JobRig) -> None:
    rig.followers.fail_with = "docker logs for container 0123 failed 9 times: EOF"
    record = rig.submit()
    rig.container().exit(0)
    rig.settle()
    assert record.state is JobState.SUCCEEDED
    # ...but never silently: the job says its logs are incomplete.
    assert record.error == "logs incomplete: LogTailError: docker logs for container 0123 failed 9 times: EOF"
    assert any("logs incomplete" in line for line in rig.lines(source="error"))


def test_usage_is_sampled_while_the_job_runs(rig: JobRig) -> None:
    record = rig.submit()
    rig.container().usage = UsageSample(300 * 2**20, 400 * 2**20, 150.0, 1500, 7)
    rig.advance(4.9)
    assert record.usage.memory_mb == 0
    rig.advance(0.1)
    assert (record.usage.memory_mb, record.usage.memory_peak_mb) == (300, 400)
    assert (record.usage.cpu_percent, record.usage.cpu_millicores, record.usage.process_count) == (150, 1500, 7)
    rig.container().exit(0)
    rig.settle()
    assert not rig.timers()  # the sampler stopped with the job


# -- kill, in every phase ------------------------------------------------------------


def assert_killed_without_container(rig: JobRig, record: JobRecord) -> None:
    assert record.state is JobState.KILLED and record.error == "Killed by request"
    assert rig.runtime.containers == {}
    assert rig.slots.tokens == rig.slots.limit
    assert rig.ports.held == frozenset()


def test_kill_while_waiting_for_a_slot_leaves_the_line(make_job_rig: MakeRig) -> None:
    rig = make_job_rig(slots=1)
    rig.start()
    rig.submit("first")
    waiting = rig.submit("waiting")
    assert waiting.state is JobState.PENDING
    result(rig, kill(rig, "waiting"))
    assert waiting.state is JobState.KILLED and rig.builder.builds[1:] == []
    later = rig.submit("later")
    rig.container("first").exit(0)
    rig.settle()
    assert later.state is JobState.RUNNING  # the killed job's place in line is gone
    assert [c.spec.labels["fluster.job_id"] for c in rig.runtime.containers.values()] == ["first", "later"]


def test_kill_while_downloading_the_bundle_cancels_the_download(rig: JobRig) -> None:
    record = rig.submit(bundle_url="https://bundles.test/b.zip")
    assert record.status_message == "downloading bundle"
    result(rig, kill(rig))
    assert rig.bundles.acquires[0].cancelled
    assert rig.builder.builds == []
    assert_killed_without_container(rig, record)


def test_kill_while_building_the_image_cancels_the_build(make_job_rig: MakeRig) -> None:
    rig = make_job_rig(auto_build=False)
    rig.start()
    record = rig.submit()
    assert record.status_message == "building image"
    result(rig, kill(rig))
    assert rig.builder.builds[0].cancelled
    assert_killed_without_container(rig, record)
    assert not rig.builder.leases


def test_kill_while_the_job_files_are_written_frees_the_slot(rig: JobRig) -> None:
    rig.pool.paused = True
    record = rig.submit()
    killed = kill(rig)
    rig.pool.resume()
    result(rig, killed)
    assert rig.builder.builds == []
    assert_killed_without_container(rig, record)


def test_kill_while_the_container_is_being_created_removes_it_unstarted(rig: JobRig) -> None:
    hold = rig.runtime.hold("create")
    record = rig.submit()
    assert hold.reached.called and record.status_message == "preparing container"
    killed = kill(rig)
    rig.settle()
    assert not killed.called  # the create is not abandoned midway: it would leak
    hold.release()
    result(rig, killed)
    assert record.state is JobState.KILLED
    (container,) = rig.runtime.containers.values()
    assert container.state == "removed" and not container.started
    assert rig.runtime.operations("start") == []


def test_kill_while_the_container_is_being_started_terminates_it(rig: JobRig) -> None:
    hold = rig.runtime.hold("start")
    record = rig.submit()
    killed = kill(rig, term_timeout_ms=2000)
    rig.settle()
    hold.release()
    result(rig, killed)
    assert record.state is JobState.KILLED and record.exit_code == SIGTERM_EXIT
    assert rig.runtime.operations("terminate") == [("terminate", rig.container().id, 2.0)]
    assert rig.runtime.live() == []


def test_kill_while_running_terminates_with_the_grace_asked_for(rig: JobRig) -> None:
    terminal = watch_terminal(rig)
    record = rig.submit()
    container = rig.container()
    container.on_sigterm = "ignore"
    killed = kill(rig, term_timeout_ms=3000)
    rig.advance(2.9)
    assert container.signals == ["SIGTERM"] and not killed.called and record.state is JobState.RUNNING
    rig.advance(0.1)
    assert container.signals == ["SIGTERM", "SIGKILL"]
    result(rig, killed)  # fires once the job is KILLED
    assert (record.state, record.exit_code, record.error) == (JobState.KILLED, SIGKILL_EXIT, "Killed by request")
    assert terminal == [("KILLED", 0, False)]


def test_kill_without_a_grace_uses_five_seconds(rig: JobRig) -> None:
    rig.submit()
    rig.container().on_sigterm = "ignore"
    kill(rig, term_timeout_ms=0)
    rig.advance(4.9)
    assert rig.container().signals == ["SIGTERM"]
    rig.advance(0.1)
    assert rig.container().signals == ["SIGTERM", "SIGKILL"]


def test_a_second_kill_waits_for_the_first_and_a_late_one_is_refused(rig: JobRig) -> None:
    record = rig.submit()
    rig.container().term_delay_s = 1.0
    first, second = kill(rig), kill(rig)
    rig.settle()
    assert not first.called and not second.called
    rig.advance(1.0)
    result(rig, first)
    result(rig, second)
    assert len(rig.runtime.operations("terminate")) == 1
    with pytest.raises(PreconditionFailed, match="already finished as KILLED"):
        result(rig, kill(rig))
    assert record.state is JobState.KILLED


def test_a_later_kill_with_a_shorter_grace_brings_the_sigkill_forward(rig: JobRig) -> None:
    record = rig.submit()
    container = rig.container()
    container.on_sigterm = "ignore"
    first = kill(rig, term_timeout_ms=60_000)
    rig.advance(10)
    second = kill(rig, term_timeout_ms=1000)
    rig.advance(0.9)
    assert container.signals == ["SIGTERM"] and not first.called and not second.called
    rig.advance(0.1)
    assert container.signals == ["SIGTERM", "SIGKILL"]  # one SIGTERM: the second kill only hurried it
    result(rig, first)
    result(rig, second)
    assert (record.state, record.error) == (JobState.KILLED, "Killed by request")


def test_a_job_that_ends_while_being_killed_is_killed(rig: JobRig) -> None:
    record = rig.submit()
    container = rig.container()
    container.on_sigterm = "ignore"
    killed = kill(rig)
    container.exit(0)  # it finished on its own during the grace
    result(rig, killed)
    assert record.state is JobState.KILLED and record.exit_code == 0


# -- timeout -------------------------------------------------------------------------


def test_a_job_past_its_timeout_is_terminated_and_fails(rig: JobRig) -> None:
    record = rig.submit(timeout_seconds=10)
    container = rig.container()
    container.on_sigterm = "ignore"
    rig.advance(9.9)
    assert container.signals == [] and record.state is JobState.RUNNING
    rig.advance(0.1)
    assert container.signals == ["SIGTERM"]
    rig.advance(5.0)  # the default grace
    assert container.signals == ["SIGTERM", "SIGKILL"]
    assert (record.state, record.error, record.exit_code) == (JobState.FAILED, "Timeout exceeded", SIGKILL_EXIT)
    assert any("timeout of 10 s exceeded" in line for line in rig.lines(source="error"))


def test_a_job_that_ends_in_time_cancels_its_timeout(rig: JobRig) -> None:
    record = rig.submit(timeout_seconds=10)
    rig.advance(9.0)
    rig.container().exit(0)
    rig.settle()
    assert record.state is JobState.SUCCEEDED
    assert not rig.timers()
    assert rig.container().signals == []


def test_the_build_does_not_count_against_the_timeout(make_job_rig: MakeRig) -> None:
    rig = make_job_rig(auto_build=False)
    rig.start()
    record = rig.submit(timeout_seconds=10)
    rig.advance(60)
    rig.builder.builds[0].finish()
    rig.settle()
    assert record.state is JobState.RUNNING
    rig.advance(9.9)
    assert record.state is JobState.RUNNING and rig.container().signals == []
