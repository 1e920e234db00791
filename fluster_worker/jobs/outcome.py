"""How a job ended: decided once, from what is known when its container exits.

The order of the rules is the point:

1. A stop the worker made (a kill, the timeout, a drain at shutdown) decides only
   if its signal reached the container while it ran. A kill that arrives after
   the exit changes nothing: the exit stands.
2. An exit the Docker engine caused (it stopped or restarted) is the worker's
   failure, not the job's: WORKER_FAILED naming the engine and the exit status.
3. Otherwise the container's own exit: OOM, a non-zero code, or success.
"""

from __future__ import annotations

from dataclasses import dataclass

from fluster_worker.containers.status import ExitStatus
from fluster_worker.jobs.model import JobRecord, JobState

__all__ = ["Outcome", "exit_outcome", "lost_outcome"]

KILLED_BY_REQUEST = "Killed by request"
TIMEOUT_EXCEEDED = "Timeout exceeded"


@dataclass(frozen=True)
class Outcome:
    """A terminal state, its error (one line) and the container's exit code
    (None: the job has none, e.g. it never ran or its exit is unknown)."""

    state: JobState
    error: str = ""
    exit_code: int | None = None


def exit_outcome(record: JobRecord, status: ExitStatus, *, signal_unknown: bool = False) -> Outcome:
    """The outcome of a job whose container exited with ``status``.
    ``signal_unknown``: whether a stop's signal was delivered is not known (a
    worker restarted between asking for the stop and hearing back); the stop
    then decides if the container ended after it was asked for."""
    code = status.exit_code
    stop = record.stop
    if stop is not None:
        signalled = stop.signalled_ms > 0 or (signal_unknown and status.finished_at_ms >= stop.requested_ms)
        if signalled:
            return Outcome(JobState[stop.state], stop.error, code)
    if status.engine_stopped:
        return Outcome(
            JobState.WORKER_FAILED,
            f"the Docker engine stopped or restarted and stopped the job's container with it (exit status {code})",
            code,
        )
    if status.oom_killed:
        limit = record.spec.memory or "its limit"
        return Outcome(
            JobState.FAILED,
            f"Out of memory: the job exceeded its memory limit ({limit}) and was OOM-killed (exit code {code})",
            code,
        )
    if code != 0:
        return Outcome(JobState.FAILED, f"Exit code: {code}", code)
    return Outcome(JobState.SUCCEEDED, "", 0)


def lost_outcome(container_id: str) -> Outcome:
    """A RUNNING job whose container is gone without an exit status anywhere."""
    shown = container_id[:12] or "(unknown)"
    return Outcome(
        JobState.WORKER_FAILED,
        f"the worker lost the job: its container {shown} is gone and its exit status is unknown",
        None,
    )
