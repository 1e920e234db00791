"""Whether the JobManager takes a RunJob now, before it allocates anything: the
attempt against the job's last one, the node conditions, the bound on the jobs
waiting in line. Each refusal is a domain error naming the cause."""

from __future__ import annotations

from fluster_worker.jobs.model import JobAlreadyExists, JobRecord, ResourcesExhausted, WorkerUnavailable
from fluster_worker.node.conditions import UNAVAILABLE, NodeConditions

__all__ = ["check_attempt", "check_conditions", "check_line"]


def check_attempt(existing: JobRecord | None, job_id: str, attempt: int) -> JobRecord | None:
    """The record a retried RunJob (same attempt) answers with, if this is one;
    JobAlreadyExists while the job runs, or for an older attempt."""
    if existing is None:
        return None
    if existing.attempt_id == attempt:
        # A retried RunJob (e.g. after a controller timeout): idempotent.
        return existing
    if not existing.state.terminal:
        raise JobAlreadyExists(
            f"job {job_id} is already {existing.state.name} as attempt {existing.attempt_id}",
        )
    if attempt < existing.attempt_id:
        raise JobAlreadyExists(
            f"job {job_id} already ran as attempt {existing.attempt_id} (got attempt {attempt})",
        )
    return None


def check_conditions(conditions: NodeConditions | None) -> None:
    """Refuse new work while a node condition blocks it, saying why."""
    blocking = conditions.blocking() if conditions is not None else None
    if blocking is None:
        return
    if blocking.severity == UNAVAILABLE:
        raise WorkerUnavailable(blocking.reason)
    raise ResourcesExhausted(blocking.reason)


def check_line(waiting: int, max_pending: int | None) -> None:
    """Refuse a job past ``max_pending`` waiting ones: the line (and the ports
    its jobs hold from acceptance) stays bounded."""
    if max_pending is None:
        return
    if waiting >= max_pending:
        raise ResourcesExhausted(
            f"{waiting} jobs are already waiting to start (--max-pending-jobs {max_pending}); try again later"
        )
