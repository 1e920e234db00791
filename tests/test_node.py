"""Node conditions: the engine unreachable and the disk nearly full, as the
worker shows them (HealthCheck, the dashboard, /api/v1/stats, /metrics), with the
heartbeats they pause. Fakes only (a Clock, the fake worker, a scripted
controller client)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from fluster_worker.containers.health import EngineHealth
from fluster_worker.node import DiskWatch, NodeConditions
from fluster_worker.node.conditions import EXHAUSTED, UNAVAILABLE, WARNING
from fluster_worker.testing.dashboard import FakeRegistration, FakeWorker
from fluster_worker.testing.logs import InlinePool
from tests.test_controller_registration import ACCEPTED, _registration
from tests.test_metrics import Scraper, value

MiB = 2**20


def test_conditions_block_by_severity_and_say_why() -> None:
    clock = Clock()
    conditions = NodeConditions(clock)
    changes: list[bool] = []
    conditions.add_listener(changes.append)
    assert conditions.healthy and conditions.summary() == ""
    conditions.set("disk", WARNING, "low disk space: 3 GiB free")
    assert conditions.healthy and changes == []
    clock.advance(5)
    conditions.set("engine", UNAVAILABLE, "Docker engine unreachable: connection refused")
    assert not conditions.healthy and changes == [False]
    blocking = conditions.blocking()
    assert blocking is not None and blocking.name == "engine" and blocking.since_ms == 5000
    assert conditions.summary() == "Docker engine unreachable: connection refused; low disk space: 3 GiB free"
    conditions.set("disk", EXHAUSTED, "disk nearly full")
    conditions.clear("engine")
    assert not conditions.healthy and changes == [False]  # still blocked, by the disk
    conditions.clear("disk")
    assert conditions.healthy and changes == [False, True]


def test_engine_health_follows_the_events_stream() -> None:
    clock = Clock()
    clock.advance(100)
    health = EngineHealth(clock)
    seen: list[tuple[bool, str]] = []
    health.add_listener(lambda up, reason: seen.append((up, reason)))
    waiting = health.ready()
    health.connected(live_restore=False)
    assert health.up and waiting.called and seen == [(True, "")]
    health.stream_lost()
    clock.advance(2)
    health.connect_failed("connection refused")
    assert not health.up and seen[-1] == (False, "Docker engine unreachable: connection refused")
    assert health.outage is not None and health.outage.start_ms == 100_000 and not health.outage.end_ms
    back = health.ready()
    assert not back.called
    clock.advance(3)
    health.connected(live_restore=True)
    assert back.called and health.outage.end_ms == 105_000 and health.live_restore


class FakeStatvfs:
    def __init__(self, free: int, total: int = 64 * MiB) -> None:
        self.free = free
        self.total = total

    def __call__(self, path: str) -> Any:
        return os.statvfs_result((4096, 4096, self.total // 4096, 0, self.free // 4096, 0, 0, 0, 0, 255))


def test_disk_watch_warns_then_refuses(tmp_path: Path) -> None:
    clock = Clock()
    conditions = NodeConditions(clock)
    statvfs = FakeStatvfs(free=40 * MiB)
    problems: list[str] = []
    watch = DiskWatch(
        clock, InlinePool(), conditions, [tmp_path / "state", tmp_path / "cache"],  # type: ignore[arg-type]
        floor_bytes=8 * MiB, low_bytes=32 * MiB, interval_s=5, problems=[lambda: problems[0] if problems else ""],
        statvfs=statvfs,
    )
    watch.startService()
    assert conditions.current() == [] and watch.free_bytes == 40 * MiB
    statvfs.free = 20 * MiB
    clock.advance(5)
    disk = conditions.get("disk")
    assert disk is not None and disk.severity == WARNING and "20.0 MiB free" in disk.reason
    assert conditions.healthy
    statvfs.free = 4 * MiB
    clock.advance(5)
    disk = conditions.get("disk")
    assert disk is not None and disk.severity == EXHAUSTED and "below the floor of 8.0 MiB" in disk.reason
    assert not conditions.healthy
    statvfs.free = 40 * MiB
    problems.append("saving the record of j1 failed: [Errno 28] No space left on device")
    watch.check_now()
    disk = conditions.get("disk")
    assert disk is not None and disk.severity == EXHAUSTED and "No space left" in disk.reason
    problems.clear()
    watch.check_now()
    assert conditions.healthy and conditions.current() == []
    watch.stopService()


def test_health_dashboard_api_and_metrics_say_why() -> None:
    worker = FakeWorker(registration=FakeRegistration(connected=True))
    worker.conditions = NodeConditions(worker.reactor)
    worker.disk = type("Disk", (), {"free_bytes": 5 * MiB})()
    scraper = Scraper(worker)
    _, samples = scraper.scrape()
    assert value(samples, "fluster_worker_healthy") == 1
    worker.conditions.set("engine", UNAVAILABLE, "Docker engine unreachable: connection refused")
    response = scraper._done(scraper.stub.post(
        "http://w/fluster.cluster.WorkerService/HealthCheck", data=b"{}",
        headers={"Content-Type": ["application/json"]},
    ))
    health = scraper._done(scraper.stub.json_content(response))
    assert health.get("healthy", False) is False
    _, samples = scraper.scrape()
    assert value(samples, "fluster_worker_healthy") == 0
    assert value(
        samples, "fluster_worker_node_condition",
        condition="engine", severity="unavailable", reason="Docker engine unreachable: connection refused",
    ) == 1
    assert value(samples, "fluster_worker_disk_free_bytes") == 5 * MiB
    page = scraper._done(scraper.stub.get("http://w/"))
    html = scraper._done(scraper.stub.content(page)).decode()
    assert "unhealthy" in html and "Docker engine unreachable: connection refused" in html
    stats = scraper._done(scraper.stub.json_content(scraper._done(scraper.stub.get("http://w/api/v1/stats"))))
    assert stats["healthy"] is False
    assert stats["conditions"][0]["name"] == "engine"
    assert "connection refused" in stats["conditions"][0]["reason"]


def test_heartbeats_pause_while_unhealthy_and_resume() -> None:
    reg, client, clock = _registration()
    reg.startService()
    client.last().succeed(ACCEPTED)
    assert reg.connected
    reg.pause("Docker engine unreachable: connection refused")
    assert not reg.connected and reg.paused == "Docker engine unreachable: connection refused"
    calls = len(client.calls)
    clock.advance(120)  # long past the heartbeat interval and the controller's 60 s
    assert len(client.calls) == calls and clock.getDelayedCalls() == []
    reg.resume()
    assert len(client.calls) == calls + 1 and reg.paused is None
    client.last().succeed(ACCEPTED)
    assert reg.connected
    reg.stopService()
