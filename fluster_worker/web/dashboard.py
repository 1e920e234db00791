"""The dashboard: HTML pages on the RPC's port (Klein + Jinja2, autoescaped).

Routes:

- ``GET /``: the worker (identity, health, controller link, resources), counts by
  state and the jobs table (``?state=running`` filters it).
- ``GET /job/<id>`` (ids may contain "/": ``/job/parent/child``): one job:
  timeline, build, ports, usage, spec and its log (``?source=stdout`` picks a
  tab; ``?tail=N`` how many lines). The page works
  without JavaScript; ``/static/dashboard.js`` then follows the log live.
- ``POST /job/<id>/kill``: kill, after a confirmation (a confirm page without JS,
  ``confirm()`` with it). Needs the form's token, and a same-origin ``Origin``
  when the browser sends one. The job page shows the Kill button only to
  callers the access gate would let kill (``guard.control``); others see a
  one-line note of who may.
- ``GET /static/<name>``: the CSS and JS, served from memory (no CDN, ever).

Job ids, errors, phases and log lines are hostile: every template is autoescaped,
and ids from URLs are checked with ``valid_job_id`` before any lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit

import jinja2
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException, NotFound

from fluster_worker import __version__
from fluster_worker.jobs.model import JobError, JobRecord
from fluster_worker.logs.model import SOURCES, InvalidLogQuery, LogLine
from fluster_worker.web.answers import json_error
from fluster_worker.web.guard.control import control_of
from fluster_worker.web.job_json import job_detail, job_summary, now_ms
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
from fluster_worker.web.urls import job_page_url, literal_suffix, not_found_message, split_suffix
from fluster_worker.web.views import Facts, WorkerView
from fluster_worker.web.wire import connect_error
from fluster_worker.web.worker_json import counts_by_state, worker_stats

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
PAGES = ("base.html", "macros.html", "index.html", "job.html", "confirm_kill.html", "message.html")
_STATIC_TYPES = {".css": b"text/css; charset=utf-8", ".js": b"text/javascript; charset=utf-8"}
#: Jobs listed on the overview page; the API has them all.
PAGE_JOBS = 300
#: Grace before SIGKILL for a kill from the dashboard (the RPC's default).
KILL_GRACE_MS = 5000


# -- formatting (template filters) --------------------------------------------------


def fmt_time(ms: int | None) -> str:
    """Epoch ms as UTC ``YYYY-MM-DD HH:MM:SS``; empty for 0/None."""
    if not ms:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"


def fmt_clock(ms: int | None) -> str:
    """Epoch ms as UTC ``HH:MM:SS.mmm`` (log lines)."""
    if not ms:
        return ""
    return time.strftime("%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}"


def fmt_duration(ms: int | None) -> str:
    """``850 ms``, ``12.3 s``, ``4m 05s``, ``2h 03m``, ``3d 04h``."""
    if ms is None:
        return ""
    ms = max(0, int(ms))
    if ms < 1000:
        return f"{ms} ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m {sec:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h:02d}h"


def fmt_bytes(n: int | None) -> str:
    if not n:
        return "0"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def shorten(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def make_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,  # every template: ids, errors and log lines are hostile
        undefined=jinja2.StrictUndefined,
        auto_reload=False,  # templates are read once, at start (no file I/O per request)
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        time=fmt_time, clock=fmt_clock, duration=fmt_duration, bytes=fmt_bytes, shorten=shorten,
        urlpart=lambda s: quote(str(s), safe=""),
        jobpage=lambda s: job_page_url(str(s)),
    )
    for name in PAGES:
        env.get_template(name)
    return env


def load_static(directory: Path = STATIC) -> dict[str, tuple[bytes, bytes]]:
    """name -> (content type, bytes), read once at start."""
    files: dict[str, tuple[bytes, bytes]] = {}
    for path in sorted(directory.iterdir()):
        kind = _STATIC_TYPES.get(path.suffix)
        if kind is not None and path.is_file():
            files[path.name] = (kind, path.read_bytes())
    return files


# -- the pages ----------------------------------------------------------------------


class Dashboard:
    log = Logger()

    def __init__(self, worker: WorkerView, facts: Facts, *, secret: bytes | None = None) -> None:
        self._worker = worker
        self._facts = facts
        self._secret = secret if secret is not None else os.urandom(32)
        self._env = make_environment()
        self._static = load_static()

    def mount(self, app: Klein) -> None:
        # Explicit endpoint names: Klein defaults to the function's name, and two
        # handlers called "job" would silently share one endpoint.
        app.route("/", methods=["GET"], endpoint="dashboard_index")(self.index)
        app.route("/job/<path:job_id>", methods=["GET"], endpoint="dashboard_job")(self.job)
        app.route("/job/<path:job_id>/kill", methods=["POST"], endpoint="dashboard_kill")(self.kill)
        app.route("/static/<string:name>", methods=["GET"], endpoint="dashboard_static")(self.static)

    # -- rendering ------------------------------------------------------------------

    def render(self, request: Request, name: str, code: int = 200, **context: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        context.setdefault("worker_id", self._worker.worker_id)
        context.setdefault("version", __version__)
        return self._env.get_template(name).render(**context).encode("utf-8")

    def message(self, request: Request, code: int, title: str, text: str, back: str = "/") -> bytes:
        return self.render(request, "message.html", code, title=title, text=text, back=back)

    # -- routes ---------------------------------------------------------------------

    def index(self, request: Request) -> bytes:
        try:
            state = parse_state(arg(request, "state"))
        except BadRequest as e:
            return self.message(request, 400, "Bad request", str(e))
        now = now_ms(self._worker.reactor)
        everything = self._worker.manager.records()
        records = select_jobs(everything, state, MAX_JOBS)
        return self.render(
            request,
            "index.html",
            stats=worker_stats(self._worker, self._facts),
            counts=counts_by_state(everything),
            selected=state.name if state is not None else "",
            rows=[job_summary(r, now) for r in records[:PAGE_JOBS]],
            matching=len(records),
            controller_url=controller_url(self._worker.config.controller),
            now=now,
        )

    async def job(self, request: Request, job_id: str) -> bytes:
        record = self._record(job_id)
        if record is None:
            owner = job_id.rpartition("/")[0]
            if job_id.endswith("/kill") and literal_suffix(request, "kill") and self._known(owner):
                # Not a job "<id>/kill": a kill link followed with GET.
                return self.message(request, 405, "Method not allowed", "a kill needs the Kill button", job_url(owner))
            return self.message(request, 404, "Job not found", not_found_message(job_id))
        try:
            sources = parse_sources(arg(request, "source"))
            tail = int_arg(request, "tail", DEFAULT_TAIL, 1, MAX_LOG_LINES)
        except BadRequest as e:
            return self.message(request, 400, "Bad request", str(e), back=job_url(job_id))
        tab = "all" if sources is None else ",".join(sorted(sources))
        log_error = ""
        lines: list[LogLine] = []
        try:
            lines = await self._worker.logs.query(job_id, log_query(sources, tail, None))
        except InvalidLogQuery as e:
            log_error = str(e)
        now = now_ms(self._worker.reactor)
        detail = job_detail(record, now, self._worker.logs)
        total = max((p["offset_ms"] + p["duration_ms"] for p in detail["phases"]), default=0)
        control = control_of(request)
        return self.render(
            request,
            "job.html",
            job=detail,
            record=record,
            tabs=("all",) + SOURCES,
            tab=tab,
            tail=tail,
            lines=lines,
            log_error=log_error,
            last_seq=lines[-1].seq if lines else -1,
            timeline_total=max(total, 1),
            control=control,
            token=self.token(job_id) if control.allowed else "",
            cpu_max_percent=100 * (record.spec.cpu or self._worker.config.cpu_count),
            memory_limit_mb=(record.spec.memory_bytes or 0) // 2**20,
            now=now,
        )

    async def kill(self, request: Request, job_id: str) -> bytes:
        job_id, is_kill = split_suffix(request, job_id, "kill", self._known)
        if not is_kill:
            return self.message(request, 405, "Method not allowed", "a job page takes no POST", job_url(job_id))
        record = self._record(job_id)
        if record is None:
            return self.message(request, 404, "Job not found", not_found_message(job_id))
        back = job_url(job_id)
        if not same_origin(request):
            return self.message(request, 403, "Forbidden", "cross-site kill request refused", back)
        given = (arg(request, "token") or "").encode("utf-8")  # bytes: any text compares safely
        if not hmac.compare_digest(given, self.token(job_id).encode("ascii")):
            return self.message(
                request, 403, "Forbidden", "missing or stale form token: reload the job page and retry", back
            )
        if record.state.terminal:
            return self.message(
                request, 409, "Already finished", f"job {job_id} already finished as {record.state.name}", back
            )
        if arg(request, "confirmed") != "yes":
            return self.render(request, "confirm_kill.html", job=record, token=self.token(job_id))
        try:
            # A browser that goes away must not cancel a kill halfway.
            await _shielded(self._worker.manager.kill(job_id, KILL_GRACE_MS))
        except JobError as e:
            failed = connect_error(e)
            return self.message(request, failed.code.http_status, "Kill failed", failed.message, back)
        self.log.info("job {job_id} killed from the dashboard", job_id=job_id)
        request.setResponseCode(303)
        request.setHeader(b"location", back.encode("ascii"))
        return b""

    def static(self, request: Request, name: str) -> bytes:
        found = self._static.get(name)
        if found is None:
            raise NotFound()
        kind, body = found
        request.setHeader(b"content-type", kind)
        request.setHeader(b"cache-control", b"public, max-age=300")
        return body

    # -- helpers ----------------------------------------------------------------------

    def token(self, job_id: str) -> str:
        """The kill form's token: only pages of this worker process carry it."""
        return hmac.new(self._secret, b"kill:" + job_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def _record(self, job_id: str) -> JobRecord | None:
        return self._worker.manager.find(job_id)

    def _known(self, job_id: str) -> bool:
        return self._record(job_id) is not None

    # -- errors -----------------------------------------------------------------------

    def mount_errors(self, app: Klein) -> None:
        """404 pages (JSON under /api/); other routing errors (405...) keep their
        status; anything else is a logged 500 without a traceback."""
        app.handle_errors(NotFound)(self._not_found)
        app.handle_errors(Exception)(self._crashed)

    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return self._not_found_page(cast(Request, request))

    def _not_found_page(self, request: Request) -> bytes:
        path = bytes(request.path or b"")
        if path.startswith(b"/api/"):
            return json_error(request, 404, "no such API route")
        return self.message(request, 404, "Not found", "there is no page at this address")

    def _crashed(self, request: IRequest, failure: Failure) -> bytes:
        if failure.check(HTTPException):
            failure.raiseException()  # on to Klein's default answer, which keeps the status (405...)
        return self._crash_page(cast(Request, request), failure)

    def _crash_page(self, request: Request, failure: Failure) -> bytes:
        self.log.failure("dashboard request failed", failure)
        return self.message(request, 500, "Internal error", f"internal error: {type(failure.value).__name__}")


def controller_url(address: str | None) -> str:
    """A link to the controller: ``http://host:port/`` (never another scheme)."""
    if not address:
        return ""
    if address.startswith(("http://", "https://")):
        parts = urlsplit(address)
        return f"{parts.scheme}://{parts.netloc}/"
    return f"http://{address}/"


def job_url(job_id: str) -> str:
    return job_page_url(job_id)


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another origin: its
    ``Origin`` (or, without one, ``Referer``) names another host than ``Host``."""
    host = request.getHeader(b"host")
    origin = request.getHeader(b"origin") or request.getHeader(b"referer")
    if origin is None:
        return True  # not a browser, or one that sends neither; the token still applies
    if host is None:
        return False
    try:
        parts = urlsplit(origin.decode("latin-1"))
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.decode("latin-1").lower()


def _shielded(awaitable: Awaitable[None]) -> Deferred[None]:
    """A Deferred for ``awaitable`` whose cancellation does not reach it."""
    inner: Deferred[None] = ensureDeferred(awaitable)  # type: ignore[arg-type]
    outer: Deferred[None] = Deferred(lambda d: None)

    def done(result: object) -> None:
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(None)
        elif isinstance(result, Failure) and not result.check(CancelledError):
            Dashboard.log.failure("dashboard kill failed", result)

    inner.addBoth(done)
    return outer
