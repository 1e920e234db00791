"""Turns job state changes into ReportJobState calls for the controller."""

from __future__ import annotations

from fluster_worker.controller import ReportQueue
from fluster_worker.jobs.model import JobRecord, JobState
from fluster_worker.web.rpc import cluster_pb2 as pb

# WORKER_FAILED too: a job its worker lost must not vanish from the controller.
REPORTED = frozenset(
    {JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.KILLED, JobState.WORKER_FAILED}
)


class JobReporter:
    """A JobManager listener: RUNNING once the container has started, then the
    terminal state, each exactly once per job attempt (phase changes within a
    state are not reports)."""

    def __init__(self, queue: ReportQueue) -> None:
        self._queue = queue
        self._sent: dict[tuple[str, int], JobState] = {}

    def __call__(self, record: JobRecord) -> None:
        key = (record.job_id, record.attempt_id)
        state = record.state
        if state not in REPORTED or self._sent.get(key) is state:
            return
        self._sent[key] = state
        if state.terminal:
            del self._sent[key]  # nothing comes after a terminal state
        self._queue.report(
            pb.ReportJobStateRequest(
                job_id=record.job_id,
                state=int(state),  # type: ignore[arg-type]
                exit_code=record.exit_code,
                error=record.error,
                finished_at_ms=record.finished_at_ms,
                attempt_id=record.attempt_id,
            )
        )
