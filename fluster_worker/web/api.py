"""The dashboard's data: what a worker and its jobs look like as JSON, and the
read-only JSON API under ``/api/v1/`` that serves it (the pages' live follow
reads it). ``/api/...`` without ``v1`` is the existing worker's API, in its
shapes (``compat_api``).

Routes (GET, ``application/json``):

- ``/api/v1/stats``: identity, health, controller link, resources, counts by state.
- ``/api/v1/jobs[?state=running&limit=N]``: job summaries, newest first.
- ``/api/v1/jobs/<id>``: one job in full (timeline, build, spec without env values).
- ``/api/v1/jobs/<id>/logs[?tail=N][&source=stdout,stderr][&after_seq=K][&regex=R]``:
  log lines with their ``seq``; ``after_seq`` pages forward (the live follow),
  otherwise the last ``tail`` lines.

Ids may contain "/": encode it as ``%2F`` in these paths (``urls.split_suffix``).
The shapes are in ``job_json`` and ``worker_json``, the protocols it reads the
worker through in ``views``.
"""

from __future__ import annotations

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.web.server import Request

from fluster_worker.jobs.model import JobRecord
from fluster_worker.logs.model import InvalidLogQuery
from fluster_worker.web.answers import json_bytes, json_error, json_response
from fluster_worker.web.job_json import job_detail, job_summary, line_json, now_ms
from fluster_worker.web.queries import (
    DEFAULT_TAIL,
    MAX_JOBS,
    MAX_LOG_LINES,
    BadRequest,
    arg,
    int_arg,
    log_query,
    parse_sources,
    parse_state,
    select_jobs,
)
from fluster_worker.web.rows import RowCache
from fluster_worker.web.urls import not_found_message, split_suffix
from fluster_worker.web.views import Facts, WorkerView
from fluster_worker.web.worker_json import worker_stats

PREFIX = "/api/v1"

# -- the routes ---------------------------------------------------------------------


class JobsApi:
    """``/api/v1/...`` on a Klein app."""

    def __init__(self, worker: WorkerView, facts: Facts) -> None:
        self._worker = worker
        self._facts = facts
        # A finished job's summary no longer changes with the time: kept (rows.py).
        self._rows = RowCache(
            lambda r: job_summary(r, now_ms(worker.reactor)),
            lambda: [r.job_id for r in worker.manager.records()],
            keep=lambda r: r.state.terminal,
        )

    def mount(self, app: Klein) -> None:
        app.route(PREFIX + "/stats", methods=["GET"], endpoint="api_stats")(self.stats)
        app.route(PREFIX + "/jobs", methods=["GET"], endpoint="api_jobs")(self.jobs)
        app.route(PREFIX + "/jobs/<path:job_id>", methods=["GET"], endpoint="api_job")(self.job)
        app.route(PREFIX + "/jobs/<path:job_id>/logs", methods=["GET"], endpoint="api_job_logs")(self.job_logs)

    def stats(self, request: Request) -> bytes:
        return json_response(request, 200, worker_stats(self._worker, self._facts))

    def jobs(self, request: Request) -> bytes | Deferred[bytes]:
        """Job summaries, a finished job's kept as bytes (rows.py); many to
        encode are encoded off the reactor."""
        try:
            state = parse_state(arg(request, "state"))
            limit = int_arg(request, "limit", MAX_JOBS, 1, MAX_JOBS)
        except BadRequest as e:
            return json_error(request, 400, str(e))
        records = select_jobs(self._worker.manager.records(), state, limit)
        body = self._rows.joined(records, self._worker.cpu_pool, b'{"jobs":[', b"]}")
        if isinstance(body, Deferred):
            return body.addCallback(lambda b: json_bytes(request, b))
        return json_bytes(request, body)

    def job(self, request: Request, job_id: str) -> bytes:
        record = self._record(job_id)
        if record is None:
            return json_error(request, 404, not_found_message(job_id))
        now = now_ms(self._worker.reactor)
        return json_response(request, 200, job_detail(record, now, self._worker.logs))

    async def job_logs(self, request: Request, job_id: str) -> bytes:
        job_id, is_logs = split_suffix(request, job_id, "logs", lambda j: self._record(j) is not None)
        if not is_logs:
            return self.job(request, job_id)
        record = self._record(job_id)
        if record is None:
            return json_error(request, 404, not_found_message(job_id))
        try:
            sources = parse_sources(arg(request, "source"))
            tail = int_arg(request, "tail", DEFAULT_TAIL, 1, MAX_LOG_LINES)
            raw_after = arg(request, "after_seq")
            after = None if raw_after in (None, "") else int_arg(request, "after_seq", -1, -1, 2**62)
            regex = arg(request, "regex") or ""
            lines = await self._worker.logs.query(job_id, log_query(sources, tail, after, regex))
        except (BadRequest, InvalidLogQuery) as e:
            return json_error(request, 400, str(e))
        # Read the state after the lines: a client that sees "terminal" has every line.
        return json_response(request, 200, {
            "job_id": record.job_id,
            "state": record.state.name,
            "terminal": record.state.terminal,
            "status_message": record.status_message,
            "lines": [line_json(line) for line in lines],
            "last_seq": lines[-1].seq if lines else after,
            "limit": tail,
        })

    def _record(self, job_id: str) -> JobRecord | None:
        return self._worker.manager.find(job_id)
