"""Which finished jobs the worker forgets: past the retention count or age,
oldest first (``--retention-count``, ``--retention-seconds``)."""

from __future__ import annotations

from collections.abc import Container, Mapping

from fluster_worker.jobs.model import JobRecord

__all__ = ["expired"]


def expired(
    jobs: Mapping[str, JobRecord], active: Container[str], now_ms: int, count: int, seconds: float
) -> list[JobRecord]:
    """The finished jobs (not active) to forget so that at most ``count`` jobs
    stay and none finished more than ``seconds`` ago."""
    finished = sorted(
        (r for r in jobs.values() if r.state.terminal and r.job_id not in active),
        key=lambda r: r.finished_at_ms,
    )
    excess = len(jobs) - count
    forget = []
    for record in finished:
        too_old = now_ms - record.finished_at_ms > seconds * 1000
        if excess <= 0 and not too_old:
            break
        excess -= 1
        forget.append(record)
    return forget
