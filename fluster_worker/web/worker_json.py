"""The JSON shape of the worker itself: identity, health and node conditions,
the controller link, resources and devices, jobs by state (the overview page,
``/api/v1/stats``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fluster_worker import __version__
from fluster_worker.jobs.devices import JobDevices
from fluster_worker.jobs.model import JobRecord, JobState
from fluster_worker.web.views import Facts, WorkerView


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
