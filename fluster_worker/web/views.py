"""What the pages and the JSON API read of a worker, and the JSON shapes of a
worker and its jobs.

The pages, the API and the metrics read the worker through the small protocols
below (the JobManager's read-only queries and the LogStore's query API), so they
are unit-tested against ``fluster_worker.testing.dashboard``.
"""


from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, unquote_to_bytes

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from fluster_worker import __version__
from fluster_worker.common.jobnames import shown_job_id
from fluster_worker.common.threads import BlockingPool
from fluster_worker.config import WorkerConfig
from fluster_worker.jobs.devices import JobDevices
from fluster_worker.jobs.model import JobRecord, JobState, valid_job_id
from fluster_worker.logs.model import SOURCES, LogLine, LogQuery

#: The most log lines one request returns (server-rendered or JSON).
MAX_LOG_LINES = 5000
#: The most line data one such request returns (the JSON is encoded on the reactor).
MAX_LOG_BYTES = 4 * 2**20
DEFAULT_TAIL = 500
#: The most jobs one listing returns.
MAX_JOBS = 1000


# -- what the dashboard needs from a worker ---------------------------------------


class ManagerView(Protocol):
    """The JobManager's read-only queries (and kill, for the dashboard)."""

    def find(self, job_id: str) -> JobRecord | None: ...

    def records(self) -> list[JobRecord]: ...

    def job_count(self) -> int: ...

    def running_count(self) -> int: ...

    def kill(self, job_id: str, term_timeout_ms: int) -> Awaitable[None]: ...

    def add_listener(self, listener: Callable[[JobRecord], None]) -> None: ...


class LogView(Protocol):
    def query(self, job_id: str, q: LogQuery) -> Awaitable[list[LogLine]]: ...


class WorkerView(Protocol):
    @property
    def config(self) -> WorkerConfig: ...

    @property
    def worker_id(self) -> str: ...

    @property
    def manager(self) -> ManagerView: ...

    @property
    def logs(self) -> LogView: ...

    @property
    def reactor(self) -> Any: ...

    @property
    def cpu_pool(self) -> BlockingPool:
        """Where large bodies are parsed and large answers encoded."""

    def advertised_address(self) -> str: ...


class BadRequest(ValueError):
    """A query parameter the API cannot take; the message is one line."""


@dataclass(frozen=True)
class Facts:
    """What does not change while the worker runs, read once at start."""

    started_s: float
    memory_total_bytes: int


# -- JSON shapes --------------------------------------------------------------------


def now_ms(clock: IReactorTime) -> int:
    return int(clock.seconds() * 1000)


def duration_ms(record: JobRecord, now: int) -> int:
    """Run time: started to finished, or to now while running; 0 before it starts."""
    if not record.started_at_ms:
        return 0
    end = record.finished_at_ms or (now if not record.state.terminal else record.started_at_ms)
    return max(0, end - record.started_at_ms)


def line_count(logs: object, job_id: str) -> int | None:
    """Lines the LogStore knows of for the job, when it can say so cheaply."""
    count = getattr(logs, "line_count", None)
    if count is None:
        return None
    try:
        return int(count(job_id))
    except Exception:
        return None


def job_summary(record: JobRecord, now: int) -> dict[str, Any]:
    u = record.usage
    return {
        "job_id": record.job_id,
        "attempt_id": record.attempt_id,
        "state": record.state.name,
        "terminal": record.state.terminal,
        "status_message": record.status_message,
        "exit_code": record.exit_code,
        "error": record.error,
        "submitted_at_ms": record.submitted_at_ms,
        "started_at_ms": record.started_at_ms,
        "finished_at_ms": record.finished_at_ms,
        "duration_ms": duration_ms(record, now),
        "ports": dict(record.ports),
        "devices": job_devices(record),
        "usage": {
            "cpu_percent": u.cpu_percent,
            "cpu_millicores": u.cpu_millicores,
            "memory_mb": u.memory_mb,
            "memory_peak_mb": u.memory_peak_mb,
            "process_count": u.process_count,
            "disk_mb": u.disk_mb,
        },
    }


def job_devices(record: JobRecord) -> dict[str, Any] | None:
    """The GPUs or TPU a job asked for and the ids it holds (or held); None for a
    job without devices."""
    s = record.spec
    if not s.device_kind:
        return None
    return {
        "kind": s.device_kind,
        "ids": list(record.devices),
        "count": s.device_count,
        "variant": s.device_variant,
        "topology": s.device_topology,
    }


def worker_devices(worker: object) -> dict[str, Any]:
    """The worker's GPUs and TPU device nodes, and which are in use."""
    devices = getattr(worker, "devices", None)
    if not isinstance(devices, JobDevices):
        return {}
    found = devices.accelerators
    usage = devices.usage()
    gpus = {**usage["gpu"], "name": found.gpus.name if found else "", "variant": found.gpus.variant if found else ""}
    tpus = {
        **usage["tpu"],
        "accelerator_type": found.tpus.accelerator_type if found else "",
        "topology": found.tpus.topology if found else "",
    }
    return {"known": found is not None, "gpu": gpus, "tpu": tpus}


def timeline(record: JobRecord, now: int) -> list[dict[str, Any]]:
    """Each phase with its offset from submission and how long it lasted; the last
    phase of a live job lasts until now (``ongoing``)."""
    phases = record.phases
    origin = phases[0][1] if phases else record.submitted_at_ms
    out: list[dict[str, Any]] = []
    for i, (name, at) in enumerate(phases):
        last = i == len(phases) - 1
        if not last:
            end = phases[i + 1][1]
        else:
            end = at if record.state.terminal else max(at, now)
        out.append({
            "name": name,
            "at_ms": at,
            "offset_ms": max(0, at - origin),
            "duration_ms": max(0, end - at),
            "ongoing": last and not record.state.terminal,
        })
    return out


def job_detail(record: JobRecord, now: int, logs: object) -> dict[str, Any]:
    b = record.build
    s = record.spec
    data = job_summary(record, now)
    data.update({
        "worker_id": record.worker_id,
        "build": {
            "started_ms": b.started_ms,
            "finished_ms": b.finished_ms,
            "duration_ms": max(0, b.finished_ms - b.started_ms) if b.finished_ms else 0,
            "from_cache": b.from_cache,
            "image_tag": b.image_tag,
        },
        "phases": timeline(record, now),
        # Env var values may be secrets: the dashboard shows names only.
        "spec": {
            "bundle_url": s.bundle_url,
            "cpu": s.cpu,
            "memory": s.memory,
            "timeout_seconds": s.timeout_seconds,
            "port_names": list(s.port_names),
            "env_var_names": sorted(s.env_vars),
            "extras": list(s.extras),
            "pip_packages": list(s.pip_packages),
            "workspace": s.workspace,
        },
        "log_lines": line_count(logs, record.job_id),
    })
    return data


def counts_by_state(records: Iterable[JobRecord]) -> dict[str, int]:
    counts = {state.name: 0 for state in JobState if state is not JobState.UNSPECIFIED}
    for record in records:
        counts[record.state.name] = counts.get(record.state.name, 0) + 1
    return counts


def node_health(worker: object) -> tuple[bool, list[dict[str, Any]]]:
    """Whether the node takes work, and its conditions (engine, disk) with reasons."""
    conditions = getattr(worker, "conditions", None)
    if conditions is None:
        return True, []
    listed = [
        {"name": c.name, "severity": c.severity, "reason": c.reason, "since_ms": c.since_ms}
        for c in conditions.current()
    ]
    return bool(conditions.healthy), listed


def worker_stats(worker: WorkerView, facts: Facts) -> dict[str, Any]:
    config = worker.config
    registration = getattr(worker, "registration", None)
    records = worker.manager.records()
    healthy, conditions = node_health(worker)
    disk = getattr(worker, "disk", None)
    return {
        "worker_id": worker.worker_id,
        "version": __version__,
        "address": worker.advertised_address(),
        "healthy": healthy,
        "conditions": conditions,
        "disk_free_bytes": getattr(disk, "free_bytes", None),
        "uptime_ms": max(0, int((worker.reactor.seconds() - facts.started_s) * 1000)),
        "controller": {
            "address": config.controller or "",
            "registered": bool(getattr(registration, "connected", False)),
            "last_heartbeat_ms": getattr(registration, "last_heartbeat_ms", None),
            "heartbeats_paused": getattr(registration, "paused", None),
        },
        "resources": {
            "cpu_count": config.cpu_count,
            "memory": config.advertise_memory or "",
            "memory_total_bytes": facts.memory_total_bytes,
            "max_concurrent_jobs": config.max_concurrent_jobs,
            **({"devices": devices} if (devices := worker_devices(worker)) else {}),
        },
        "jobs": {
            "total": len(records),
            "running": worker.manager.running_count(),
            "by_state": counts_by_state(records),
        },
    }


def line_json(line: LogLine) -> dict[str, Any]:
    return {"seq": line.seq, "timestamp_ms": line.timestamp_ms, "source": line.source, "data": line.data}


# -- query parameters ---------------------------------------------------------------


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


def json_response(request: Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_error(request: Request, code: int, message: str) -> bytes:
    return json_response(request, code, {"error": message})
