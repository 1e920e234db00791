"""The existing worker's HTTP JSON API, at its paths and in its shapes (wire
contract section 7), for the tools and dashboards that already read it.

Routes (GET, ``application/json``):

- ``/api/stats``: ``{"running", "pending", "building", "completed"}`` counts
  (completed = SUCCEEDED + FAILED + KILLED).
- ``/api/jobs``: a list of flat job summaries.
- ``/api/jobs/<id>``: one job with ``ports``, ``resources{...}`` and ``build{...}``;
  an unknown job is 404 ``{"error": "Not found"}``. Jobs also carry ``devices``
  (ours: the GPUs or TPU a job asked for and holds, or null).
- ``/api/jobs/<id>/logs?tail=N&source=S``: a list of ``{timestamp, source, data}``
  (the last N lines of source S; all sources without S; every line, up to
  ``MAX_LOG_LINES``, without N; at most ``MAX_LOG_BYTES`` of line data, the
  oldest of those lines first); an unknown job is ``[]``.

Ids may contain "/" (``parent/child``): the routes take the rest of the path,
and a ``%2F`` in it is part of the id (see ``urls.split_suffix``). The
dashboard's own, richer JSON is under ``/api/v1/`` (``api``).
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.web.server import Request

from fluster_worker.jobs.model import JobRecord, JobState
from fluster_worker.logs.model import SOURCES, InvalidLogQuery, LogQuery
from fluster_worker.web.answers import json_bytes, json_error, json_response
from fluster_worker.web.job_json import job_devices
from fluster_worker.web.queries import MAX_LOG_BYTES, MAX_LOG_LINES, BadRequest, arg, int_arg
from fluster_worker.web.rows import RowCache
from fluster_worker.web.urls import split_suffix
from fluster_worker.web.views import WorkerView

#: ``status`` as the existing worker spells it; any other state is "unknown".
STATUS_NAMES: dict[JobState, str] = {
    JobState.PENDING: "pending",
    JobState.BUILDING: "building",
    JobState.RUNNING: "running",
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.KILLED: "killed",
}
COMPLETED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.KILLED})
NOT_FOUND = {"error": "Not found"}


def status_name(state: JobState) -> str:
    return STATUS_NAMES.get(state, "unknown")


def stats(records: list[JobRecord]) -> dict[str, int]:
    def count(states: frozenset[JobState]) -> int:
        return sum(1 for r in records if r.state in states)

    return {
        "running": count(frozenset({JobState.RUNNING})),
        "pending": count(frozenset({JobState.PENDING})),
        "building": count(frozenset({JobState.BUILDING})),
        "completed": count(COMPLETED),
    }


def job_row(record: JobRecord) -> dict[str, Any]:
    """One element of ``/api/jobs``."""
    u, b = record.usage, record.build
    return {
        "job_id": record.job_id,
        "attempt_id": record.attempt_id,
        "status": status_name(record.state),
        "started_at": record.started_at_ms,
        "finished_at": record.finished_at_ms,
        "exit_code": record.exit_code,
        "error": record.error,
        "memory_mb": u.memory_mb,
        "memory_peak_mb": u.memory_peak_mb,
        "cpu_percent": u.cpu_percent,
        "process_count": u.process_count,
        "disk_mb": u.disk_mb,
        "build_from_cache": b.from_cache,
        "image_tag": b.image_tag,
        "devices": job_devices(record),  # ours (objects may carry more fields)
    }


def job_object(record: JobRecord) -> dict[str, Any]:
    """``/api/jobs/<id>``."""
    u, b = record.usage, record.build
    return {
        "job_id": record.job_id,
        "attempt_id": record.attempt_id,
        "status": status_name(record.state),
        "started_at": record.started_at_ms,
        "finished_at": record.finished_at_ms,
        "exit_code": record.exit_code,
        "error": record.error,
        "ports": dict(record.ports),
        "devices": job_devices(record),  # ours: the GPUs or TPU the job holds, or null
        "resources": {
            "memory_mb": u.memory_mb,
            "memory_peak_mb": u.memory_peak_mb,
            "cpu_percent": u.cpu_percent,
            "disk_mb": u.disk_mb,
            "process_count": u.process_count,
        },
        "build": {
            "started_ms": b.started_ms,
            "finished_ms": b.finished_ms,
            "duration_ms": max(0, b.finished_ms - b.started_ms) if b.started_ms and b.finished_ms else 0,
            "from_cache": b.from_cache,
            "image_tag": b.image_tag,
        },
    }


class CompatApi:
    """``/api/stats``, ``/api/jobs``, ``/api/jobs/<id>``, ``/api/jobs/<id>/logs``."""

    def __init__(self, worker: WorkerView) -> None:
        self._worker = worker
        self._rows = RowCache(job_row, lambda: [r.job_id for r in worker.manager.records()])

    def mount(self, app: Klein) -> None:
        app.route("/api/stats", methods=["GET"], endpoint="compat_stats")(self.stats)
        app.route("/api/jobs", methods=["GET"], endpoint="compat_jobs")(self.jobs)
        app.route("/api/jobs/<path:job_id>", methods=["GET"], endpoint="compat_job")(self.job)
        app.route("/api/jobs/<path:job_id>/logs", methods=["GET"], endpoint="compat_job_logs")(self.job_logs)

    def stats(self, request: Request) -> bytes:
        return json_response(request, 200, stats(self._worker.manager.records()))

    def jobs(self, request: Request) -> bytes | Deferred[bytes]:
        """Rows kept per job (rows.py); many to encode are encoded off the reactor."""
        records = sorted(self._worker.manager.records(), key=lambda r: (r.submitted_at_ms, r.job_id))
        body = self._rows.joined(records, self._worker.cpu_pool)
        if isinstance(body, Deferred):
            return body.addCallback(lambda b: json_bytes(request, b))
        return json_bytes(request, body)

    def job(self, request: Request, job_id: str) -> bytes:
        record = self._worker.manager.find(job_id)
        if record is None:
            return json_response(request, 404, NOT_FOUND)
        return json_response(request, 200, job_object(record))

    async def job_logs(self, request: Request, job_id: str) -> bytes:
        manager = self._worker.manager
        job_id, is_logs = split_suffix(request, job_id, "logs", lambda j: manager.find(j) is not None)
        if not is_logs:
            return self.job(request, job_id)
        if manager.find(job_id) is None:
            return json_response(request, 200, [])
        try:
            tail = int_arg(request, "tail", 0, 0, 2**31)
        except BadRequest as e:
            return json_error(request, 400, str(e))
        source = (arg(request, "source") or "").strip()
        if source and source not in SOURCES:
            return json_response(request, 200, [])  # no line has that source
        sources = frozenset({source}) if source else None
        count = min(tail, MAX_LOG_LINES) if tail else MAX_LOG_LINES
        try:
            query = LogQuery(start_line=-count, sources=sources, max_bytes=MAX_LOG_BYTES)
            lines = await self._worker.logs.query(job_id, query)
        except InvalidLogQuery as e:
            return json_error(request, 400, str(e))
        return json_response(
            request,
            200,
            [{"timestamp": line.timestamp_ms, "source": line.source, "data": line.data, "seq": line.seq}
             for line in lines],
        )
