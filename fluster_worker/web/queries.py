"""What the pages and the JSON API take from a query string, bounded and
checked: a bad value is a ``BadRequest`` with a one-line message."""

from __future__ import annotations

from collections.abc import Iterable

from twisted.web.server import Request

from fluster_worker.jobs.model import JobRecord, JobState
from fluster_worker.logs.model import SOURCES, LogQuery

#: The most log lines one request returns (server-rendered or JSON).
MAX_LOG_LINES = 5000
#: The most line data one such request returns (the JSON is encoded on the reactor).
MAX_LOG_BYTES = 4 * 2**20
DEFAULT_TAIL = 500
#: The most jobs one listing returns.
MAX_JOBS = 1000


class BadRequest(ValueError):
    """A query parameter the API cannot take; the message is one line."""


def arg(request: Request, name: str) -> str | None:
    """The first value of a query (or form) parameter, decoded; None when absent."""
    values = (request.args or {}).get(name.encode("ascii"))  # type: ignore[attr-defined]
    if not values:
        return None
    return bytes(values[0]).decode("utf-8", errors="replace")


def int_arg(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = arg(request, name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw[:40]!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {value}")
    return value


def parse_sources(raw: str | None) -> frozenset[str] | None:
    """``stdout``, ``stdout,stderr``; empty or ``all`` means every source."""
    if raw is None or raw.strip() in ("", "all"):
        return None
    names = frozenset(part.strip() for part in raw.split(",") if part.strip())
    unknown = sorted(names - set(SOURCES))
    if unknown:
        raise BadRequest(f"unknown log source {unknown[0][:40]!r}; use one of {', '.join(SOURCES)}")
    return names


def parse_state(raw: str | None) -> JobState | None:
    if raw is None or raw.strip() in ("", "all"):
        return None
    try:
        state = JobState[raw.strip().upper()]
    except KeyError:
        raise BadRequest(f"unknown job state {raw[:40]!r}") from None
    return state


def log_query(
    sources: frozenset[str] | None, tail: int, after_seq: int | None, regex: str = ""
) -> LogQuery:
    """The last ``tail`` lines, or with ``after_seq`` the first ``tail`` lines after
    that one (``after_seq`` < 0: from the first line)."""
    if after_seq is None:
        return LogQuery(regex=regex, start_line=-tail, sources=sources, max_bytes=MAX_LOG_BYTES)
    return LogQuery(
        regex=regex,
        max_lines=tail,
        max_bytes=MAX_LOG_BYTES,
        sources=sources,
        after_seq=after_seq if after_seq >= 0 else None,
    )


def select_jobs(records: Iterable[JobRecord], state: JobState | None, limit: int) -> list[JobRecord]:
    chosen = [r for r in records if state is None or r.state is state]
    chosen.sort(key=lambda r: (r.submitted_at_ms, r.job_id), reverse=True)
    return chosen[:limit]
