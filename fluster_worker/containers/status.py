"""What the engine says about a container, read into our results (pure, no Docker
calls): ``ExitStatus`` from an inspected State, ``UsageSample`` from a stats answer
(with the CPU-delta arithmetic between samples), and Docker's RFC 3339 times.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["ExitStatus", "SampleState", "UsageSample", "exit_status", "parse_time_ns", "usage_sample"]

_RFC3339 = re.compile(
    r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", re.ASCII
)


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int
    oom_killed: bool
    finished_at_ms: int
    # The engine stopped the container (it was shutting down or restarting):
    # the exit is not the job's doing (see containers/events.py).
    engine_stopped: bool = False


@dataclass(frozen=True)
class UsageSample:
    memory_bytes: int  # usage without inactive page cache (what `docker stats` shows)
    memory_peak_bytes: int  # cgroup v1 max_usage (includes page cache), at least memory
    cpu_percent: float  # docker's: 100.0 is one core busy; 0.0 on a first sample
    cpu_millicores: int  # CPU time per wall time since the previous sample; 0 on the first
    process_count: int


def parse_time_ns(text: object) -> int | None:
    """Epoch nanoseconds of a Docker RFC 3339 time; None for the zero time or junk."""
    if not isinstance(text, str):
        return None
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    base, frac, zone = match.groups()
    if base.startswith("0001-"):
        return None
    zone = "+00:00" if zone == "Z" else zone
    try:
        seconds = datetime.fromisoformat(base + zone).timestamp()
    except ValueError:
        return None
    return int(seconds) * 10**9 + int((frac or "0").ljust(9, "0"))


def exit_status(state: dict[str, Any], now_ms: int) -> ExitStatus | None:
    """The ExitStatus of an inspected container's State, or None while it has not
    exited (created, running, paused or restarting)."""
    if state.get("Running") or state.get("Restarting") or state.get("Status") == "created":
        return None
    if state.get("Status") in ("removing", "dead") and parse_time_ns(state.get("StartedAt")) is None:
        # Never started (e.g. "removing" or "dead" mid force-remove): no exit to
        # report; remove() fails its waiters instead.
        return None
    finished_ns = parse_time_ns(state.get("FinishedAt"))
    return ExitStatus(
        exit_code=int(state.get("ExitCode") or 0),
        oom_killed=bool(state.get("OOMKilled")),
        finished_at_ms=now_ms if finished_ns is None else finished_ns // 10**6,
    )


@dataclass
class _CpuPoint:
    read_ns: int
    total_usage: int
    system_usage: int


@dataclass
class SampleState:
    """What one container's previous samples leave for the next: its last CPU point
    and its memory peak so far."""

    cpu: _CpuPoint | None = None
    peak: int = 0


def usage_sample(stats: dict[str, Any], previous: SampleState) -> UsageSample | None:
    """A UsageSample from one stats answer (updating ``previous``), or None when the
    container is not running (Docker then answers zero times and empty stats)."""
    read_ns = parse_time_ns(stats.get("read"))
    pids = stats.get("pids_stats") or {}
    memory = stats.get("memory_stats") or {}
    if read_ns is None or not pids or not memory:
        return None
    usage = int(memory.get("usage") or 0)
    inner = memory.get("stats") or {}
    # cgroup v1 reports total_inactive_file, v2 inactive_file: both are reclaimable cache.
    inactive = inner.get("total_inactive_file", inner.get("inactive_file", 0)) or 0
    current = usage - inactive if 0 < inactive <= usage else usage
    previous.peak = max(previous.peak, int(memory.get("max_usage") or 0), usage, current)

    cpu = stats.get("cpu_stats") or {}
    total = int((cpu.get("cpu_usage") or {}).get("total_usage") or 0)
    system = int(cpu.get("system_cpu_usage") or 0)
    online = int(cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage") or []) or 1)
    point = _CpuPoint(read_ns, total, system)
    before = previous.cpu
    pre = stats.get("precpu_stats") or {}
    pre_read = parse_time_ns(stats.get("preread"))
    if pre_read is not None and pre.get("system_cpu_usage"):
        # A two-sample (not one-shot) answer carries its own previous point.
        pre_total = int((pre.get("cpu_usage") or {}).get("total_usage") or 0)
        before = _CpuPoint(pre_read, pre_total, int(pre["system_cpu_usage"]))
    percent = 0.0
    millicores = 0
    if before is not None:
        d_total = total - before.total_usage
        d_system = system - before.system_usage
        d_wall = read_ns - before.read_ns
        if d_total >= 0 and d_system > 0:
            percent = d_total / d_system * online * 100.0
        if d_total >= 0 and d_wall > 0:
            millicores = round(d_total / d_wall * 1000)
    previous.cpu = point
    return UsageSample(
        memory_bytes=current,
        memory_peak_bytes=previous.peak,
        cpu_percent=percent,
        cpu_millicores=millicores,
        process_count=int(pids.get("current") or 0),
    )
