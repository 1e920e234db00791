"""The JSON shapes of a job: its summary (a row of the lists), its detail (the
job page and ``/api/v1/jobs/<id>``), its phases on a timeline, its log lines."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from fluster_worker.jobs.model import JobRecord
from fluster_worker.logs.model import LogLine


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


def line_json(line: LogLine) -> dict[str, Any]:
    return {"seq": line.seq, "timestamp_ms": line.timestamp_ms, "source": line.source, "data": line.data}
