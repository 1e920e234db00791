"""Job ids in URLs: the page and API paths of a job, which job a path with a
suffix means (ids may contain "/"), and the answer for an id that names no job."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote, unquote_to_bytes

from twisted.web.server import Request

from fluster_worker.common.jobnames import shown_job_id
from fluster_worker.jobs.model import valid_job_id


def not_found_message(job_id: str) -> str:
    shown = job_id if len(job_id) <= 80 else job_id[:80] + "..."
    return f"job {shown} not found" if valid_job_id(job_id) else f"invalid job id {shown_job_id(job_id)}"


def split_suffix(request: Request, job_id: str, suffix: str, known: Callable[[str], bool]) -> tuple[str, bool]:
    """For a route ``.../<path:job_id>/<suffix>``: which job is meant, and whether
    the suffix is really one. Job ids may end in a segment named like the suffix
    (``exp/logs``), and the path arrives decoded, ``%2F`` included. The suffix
    counts when the request's raw last segment is literally it (a ``%2F`` in the
    id keeps it part of the id), unless only the longer id names a job."""
    whole = f"{job_id}/{suffix}"
    if not literal_suffix(request, suffix):
        return whole, False
    if not known(job_id) and known(whole):
        return whole, False
    return job_id, True


def literal_suffix(request: Request, suffix: str) -> bool:
    """Whether the request's path ends in ``/<suffix>`` as typed (not ``%2F<suffix>``)."""
    raw_last = bytes(request.path or b"").rsplit(b"/", 1)[-1]
    return unquote_to_bytes(raw_last) == suffix.encode("utf-8")


def job_page_url(job_id: str) -> str:
    """``/job/<id>``, readable: the slashes of ``parent/child`` stay slashes."""
    return "/job/" + quote(job_id, safe="/")


def job_api_url(job_id: str, prefix: str = "/api/v1/jobs/") -> str:
    """An API path for the job, with every "/" of the id encoded (unambiguous)."""
    return prefix + quote(job_id, safe="")
