"""ReportQueue on a task.Clock: durable, in order, backoff while the controller is down."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, capturedLogs

from fluster_worker.common.backoff import Backoff
from fluster_worker.controller.client import ControllerError, ControllerUnavailable
from fluster_worker.controller.report_files import report_path
from fluster_worker.controller.reports import ReportQueue
from fluster_worker.testing.controller import (
    FakeController,
    InlinePool,
    ScriptedCall,
    ScriptedControllerClient,
    stub_client,
)
from fluster_worker.web.rpc import cluster_pb2 as pb

NAMESPACE = "fluster_worker.controller.reports"
RUNNING, SUCCEEDED, FAILED = pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED


def _report(job: str, state: int, attempt: int = 0) -> pb.ReportJobStateRequest:
    return pb.ReportJobStateRequest(job_id=job, state=state, attempt_id=attempt)  # type: ignore[arg-type]


def _queue(
    state_dir: Path, client: ScriptedControllerClient | None = None, clock: Clock | None = None
) -> tuple[ReportQueue, ScriptedControllerClient, Clock]:
    clock = clock or Clock()
    client = client or ScriptedControllerClient()
    queue = ReportQueue(
        client,
        clock,
        InlinePool(),
        state_dir,
        "w1",
        backoff=Backoff(initial_s=0.5, max_s=8.0, factor=2.0, jitter=0.5),
        random=lambda: 0.0,
    )
    return queue, client, clock


def _files(state_dir: Path) -> list[str]:
    directory = state_dir / "reports"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _sent(client: ScriptedControllerClient) -> list[tuple[str, int]]:
    return [(c.request.job_id, c.request.state) for c in client.calls]  # type: ignore[attr-defined]


@pytest.fixture
def logs() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


def _ours(events: Sequence[LogEvent], level: LogLevel) -> list[LogEvent]:
    return [e for e in events if e.get("log_namespace") == NAMESPACE and e["log_level"] == level]


def test_persisted_before_sending_and_removed_after_the_answer(tmp_path: Path) -> None:
    queue, client, _ = _queue(tmp_path)
    queue.startService()
    queue.report(_report("job-a", RUNNING, attempt=3))
    [call] = client.calls
    assert call.method == "ReportJobState"
    assert call.request == pb.ReportJobStateRequest(
        worker_id="w1", job_id="job-a", state=RUNNING, attempt_id=3
    )
    [name] = _files(tmp_path)
    assert pb.ReportJobStateRequest.FromString((tmp_path / "reports" / name).read_bytes()) == call.request
    assert queue.pending == 1
    call.succeed()
    assert _files(tmp_path) == []
    assert queue.pending == 0 and queue.delivered == 1


def test_worker_id_is_kept_when_set(tmp_path: Path) -> None:
    queue, client, _ = _queue(tmp_path)
    queue.startService()
    queue.report(pb.ReportJobStateRequest(worker_id="other", job_id="j"))
    assert client.last().request.worker_id == "other"  # type: ignore[attr-defined]


def test_one_call_at_a_time_in_order(tmp_path: Path) -> None:
    queue, client, _ = _queue(tmp_path)
    queue.startService()
    reports = [
        ("a", RUNNING),
        ("b", RUNNING),
        ("a", SUCCEEDED),
        ("b", FAILED),
        ("c", RUNNING),
    ]
    for job, state in reports:
        queue.report(_report(job, state))
    assert len(client.calls) == 1  # the rest wait for the head
    while client.pending:
        assert len(client.pending) == 1
        client.last().succeed()
    assert _sent(client) == reports
    assert _files(tmp_path) == []


def test_backoff_while_the_controller_is_down(tmp_path: Path, logs: Sequence[LogEvent]) -> None:
    queue, client, clock = _queue(tmp_path)
    queue.startService()
    queue.report(_report("a", RUNNING))
    queue.report(_report("a", SUCCEEDED))
    delays = []
    for _ in range(7):
        client.last().fail(ControllerUnavailable("connection refused"))
        [timer] = clock.getDelayedCalls()
        delays.append(_due(timer) - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [0.5, 1, 2, 4, 8, 8, 8]
    # Never the later report while the earlier one is not acknowledged.
    assert _sent(client) == [("a", RUNNING)] * 8
    assert len(_files(tmp_path)) == 2
    client.last().succeed()
    client.last().succeed()
    assert _sent(client)[-2:] == [("a", RUNNING), ("a", SUCCEEDED)]
    assert queue.pending == 0
    assert len(_ours(logs, LogLevel.warn)) == 1  # the outage, once
    assert len(_ours(logs, LogLevel.info)) == 1  # and its end, once


@pytest.mark.parametrize(
    ("code", "status", "dropped"),
    [
        ("unavailable", 503, False),
        ("deadline_exceeded", 504, False),
        ("internal", 500, False),
        ("unknown", 500, False),
        ("resource_exhausted", 429, False),
        ("aborted", 409, False),
        ("unimplemented", 501, True),
        ("invalid_argument", 400, True),
        ("not_found", 404, True),
        ("failed_precondition", 400, True),
        ("permission_denied", 403, True),
    ],
)
def test_retry_or_drop_per_code(tmp_path: Path, code: str, status: int, dropped: bool) -> None:
    queue, client, clock = _queue(tmp_path)
    queue.startService()
    queue.report(_report("a", RUNNING))
    queue.report(_report("a", SUCCEEDED))
    client.last().fail(ControllerError(code, "no", status))
    if dropped:
        # dropped at once; the next report goes out without waiting
        assert _sent(client) == [("a", RUNNING), ("a", SUCCEEDED)]
        assert queue.dropped == 1
        assert len(_files(tmp_path)) == 1
    else:
        assert len(client.calls) == 1
        clock.advance(0.5)
        assert _sent(client) == [("a", RUNNING), ("a", RUNNING)]
        assert len(_files(tmp_path)) == 2


def test_an_older_controller_does_not_grow_the_queue(tmp_path: Path, logs: Sequence[LogEvent]) -> None:
    queue, client, _ = _queue(tmp_path)
    client.autorespond = lambda call: call.fail(ControllerError("unimplemented", "no ReportJobState", 501))
    queue.startService()
    for i in range(200):
        queue.report(_report(f"job-{i}", SUCCEEDED))
    assert len(client.calls) == 200
    assert queue.pending == 0 and queue.dropped == 200
    assert _files(tmp_path) == []
    assert len(_ours(logs, LogLevel.warn)) == 1  # logged once, not per report


def test_pending_reports_survive_a_restart(tmp_path: Path) -> None:
    queue, client, clock = _queue(tmp_path)
    queue.startService()
    expected = [("a", RUNNING), ("b", RUNNING), ("a", SUCCEEDED), ("b", FAILED)]
    for job, state in expected:
        queue.report(_report(job, state))
    client.last().fail(ControllerUnavailable("down"))
    stopped = queue.stopService()
    assert stopped.called
    assert clock.getDelayedCalls() == []
    assert len(_files(tmp_path)) == 4
    # A new process: a new queue on the same state directory.
    again, client2, _ = _queue(tmp_path)
    again.startService()
    again.report(_report("c", RUNNING))
    while client2.pending:
        client2.last().succeed()
    assert _sent(client2) == [*expected, ("c", RUNNING)]
    assert all(c.request.worker_id == "w1" for c in client2.calls)  # type: ignore[attr-defined]
    assert _files(tmp_path) == []


def test_sequence_continues_after_a_restart(tmp_path: Path) -> None:
    queue, client, _ = _queue(tmp_path)
    queue.startService()
    queue.report(_report("a", RUNNING))
    queue.report(_report("a", SUCCEEDED))
    queue.stopService()
    before = _files(tmp_path)
    again, _, _ = _queue(tmp_path)
    again.startService()
    again.report(_report("b", RUNNING))
    after = _files(tmp_path)
    assert after[:2] == before and after[2] > before[1]


def test_stop_cancels_the_call_in_flight_and_keeps_the_report(tmp_path: Path) -> None:
    queue, client, clock = _queue(tmp_path)
    queue.startService()
    queue.report(_report("a", RUNNING))
    inflight = client.last()
    queue.stopService()
    assert inflight.cancelled
    assert queue.pending == 1 and len(_files(tmp_path)) == 1
    clock.advance(100)
    assert len(client.calls) == 1
    # restarting the same object resends it
    queue.startService()
    assert len(client.calls) == 2
    client.last().succeed()
    assert queue.pending == 0 and _files(tmp_path) == []


def test_reports_before_start_are_delivered_after_start(tmp_path: Path) -> None:
    queue, client, _ = _queue(tmp_path)
    queue.report(_report("a", RUNNING))
    assert client.calls == [] and len(_files(tmp_path)) == 1
    queue.startService()
    assert _sent(client) == [("a", RUNNING)]


def test_reports_after_stop_are_persisted(tmp_path: Path) -> None:
    queue, client, _ = _queue(tmp_path)
    queue.startService()
    queue.stopService()
    queue.report(_report("a", SUCCEEDED))
    assert client.calls == [] and len(_files(tmp_path)) == 1


def test_unreadable_files_are_discarded(tmp_path: Path) -> None:
    directory = tmp_path / "reports"
    directory.mkdir()
    report_path(directory, 1).write_bytes(_report("a", RUNNING).SerializeToString())
    report_path(directory, 2).write_bytes(b"\xff\xff\xff\xff")
    (directory / ".000000000003.pb.123.tmp").write_bytes(b"half")
    (directory / "notes.txt").write_text("not ours")
    queue, client, _ = _queue(tmp_path)
    queue.startService()
    client.last().succeed()
    assert _sent(client) == [("a", RUNNING)]
    assert _files(tmp_path) == ["notes.txt"]


def test_bounded(tmp_path: Path) -> None:
    clock = Clock()
    client = ScriptedControllerClient()
    queue = ReportQueue(client, clock, InlinePool(), tmp_path, "w1", max_pending=3)
    queue.startService()
    for i in range(5):
        queue.report(_report(f"j{i}", RUNNING))
    assert queue.pending == 3 and queue.dropped == 2


def test_wait_idle(tmp_path: Path) -> None:
    queue, client, _ = _queue(tmp_path)
    queue.startService()
    assert queue.wait_idle().called
    queue.report(_report("a", RUNNING))
    idle = queue.wait_idle()
    other = queue.wait_idle()
    assert idle is not other and not idle.called
    client.last().succeed()
    assert idle.called and other.called


def test_against_the_fake_controller_in_memory(tmp_path: Path) -> None:
    clock = Clock()
    fake = FakeController(clock)
    client, stub = stub_client(fake, clock)
    queue = ReportQueue(client, clock, InlinePool(), tmp_path, "w1", random=lambda: 0.0)
    queue.startService()
    fake.fail(503)
    queue.report(_report("a", RUNNING))
    queue.report(_report("a", SUCCEEDED))
    stub.flush()
    for _ in range(3):
        clock.advance(10)
        stub.flush()
    fake.recover()
    clock.advance(10)
    stub.flush()
    stub.flush()
    assert queue.pending == 0
    assert [(r.job_id, r.state) for r in fake.reports][-2:] == [("a", RUNNING), ("a", SUCCEEDED)]
    assert all(r.worker_id == "w1" for r in fake.reports)


def test_scripted_call_helpers() -> None:
    client = ScriptedControllerClient()
    d = client.call("ReportJobState", pb.ReportJobStateRequest(job_id="x"), pb.ReportJobStateResponse)
    call: ScriptedCall = client.last()
    assert not call.answered
    call.succeed()
    assert call.answered and d.called


def _due(timer: Any) -> float:
    """When a delayed call of the Clock fires."""
    return float(timer.getTime())


class _StoppedPool:
    """A BlockingPool whose threads are gone: work never runs."""

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Any:
        from twisted.internet.defer import Deferred

        return Deferred()


def test_stop_does_not_hang_on_a_stopped_pool(tmp_path: Path, logs: Sequence[LogEvent]) -> None:
    clock = Clock()
    queue = ReportQueue(ScriptedControllerClient(), clock, _StoppedPool(), tmp_path, "w1", stop_timeout_s=5)
    queue.startService()
    queue.report(_report("a", RUNNING))
    stopped = queue.stopService()
    clock.advance(4.9)
    assert not stopped.called
    clock.advance(0.1)
    assert stopped.called
    assert len(_ours(logs, LogLevel.error)) == 1
