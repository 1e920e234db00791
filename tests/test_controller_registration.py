"""Registration: RegisterWorker at start, backoff until accepted, heartbeat cadence."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, capturedLogs

from fluster_worker.common.backoff import Backoff
from fluster_worker.controller.client import ControllerError, ControllerUnavailable
from fluster_worker.controller.registration import Registration, RegistrationAdvert
from fluster_worker.host import MachineFacts
from fluster_worker.testing.controller import (
    FakeController,
    InlinePool,
    ScriptedControllerClient,
    stub_client,
)
from fluster_worker.web.rpc import cluster_pb2 as pb

NAMESPACE = "fluster_worker.controller.registration"
FACTS = MachineFacts(hostname="box", ip_address="10.0.0.9", cpu_count=4, memory_bytes=8 * 1024**3)
ACCEPTED = pb.RegisterWorkerResponse(accepted=True)
REJECTED = pb.RegisterWorkerResponse(accepted=False)


class StaticAdvert:
    def __init__(self, port: int = 8080) -> None:
        self.port = port
        self.invalidations = 0

    async def build(self) -> pb.RegisterWorkerRequest:
        if self.port == 0:
            raise ValueError("cannot advertise port 0: the worker is not listening yet")
        return pb.RegisterWorkerRequest(worker_id="w1", address=f"10.0.0.9:{self.port}")

    def invalidate(self) -> None:
        self.invalidations += 1


def _registration(
    random: float = 0.0, interval: float = 10.0, advert: StaticAdvert | None = None
) -> tuple[Registration, ScriptedControllerClient, Clock]:
    clock = Clock()
    clock.advance(1000)
    client = ScriptedControllerClient()
    reg = Registration(
        client,
        clock,
        advert or StaticAdvert(),
        heartbeat_interval_s=interval,
        backoff=Backoff(initial_s=0.5, max_s=8.0, factor=2.0, jitter=0.5),
        random=lambda: random,
    )
    return reg, client, clock


def _ours(events: Sequence[LogEvent], level: LogLevel) -> list[str]:
    return [
        e["log_format"] for e in events if e.get("log_namespace") == NAMESPACE and e["log_level"] == level
    ]


@pytest.fixture
def logs() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


def test_registers_at_start_then_heartbeats_every_interval() -> None:
    reg, client, clock = _registration()
    reg.startService()
    assert [c.method for c in client.calls] == ["RegisterWorker"]
    assert client.last().request == pb.RegisterWorkerRequest(worker_id="w1", address="10.0.0.9:8080")
    assert not reg.connected and reg.last_heartbeat_ms is None
    clock.advance(0.3)  # the answer takes 0.3 s
    client.last().succeed(ACCEPTED)
    assert reg.connected
    assert reg.last_heartbeat_ms == 1000_300
    assert reg.controller_url == "http://controller.test:8080"
    sent_at = [1000.0]
    for _ in range(5):
        clock.advance(9.69)
        assert len(client.calls) == len(sent_at), "heartbeat too early"
        clock.advance(0.01)
        assert len(client.calls) == len(sent_at) + 1
        sent_at.append(clock.seconds())
        client.last().succeed(ACCEPTED)
        clock.advance(0.3)
    # every 10 s from the start of the previous call
    assert [round(b - a, 6) for a, b in zip(sent_at, sent_at[1:], strict=False)] == [10.0] * 5


def _call_times_while_failing(
    reg: Registration, client: ScriptedControllerClient, clock: Clock, n: int
) -> list[float]:
    """Fail the pending call n times; the delays between consecutive calls."""
    delays = []
    for _ in range(n):
        client.last().fail(ControllerUnavailable("connection refused"))
        [timer] = clock.getDelayedCalls()
        delay = _due(timer) - clock.seconds()
        before = len(client.calls)
        clock.advance(delay - 0.001)
        assert len(client.calls) == before, "retried too early"
        clock.advance(0.001)
        assert len(client.calls) == before + 1
        delays.append(round(delay, 6))
    return delays


def test_backoff_grows_to_the_cap_without_jitter() -> None:
    reg, client, clock = _registration(random=0.0)
    reg.startService()
    assert _call_times_while_failing(reg, client, clock, 8) == [0.5, 1, 2, 4, 8, 8, 8, 8]


@pytest.mark.parametrize("r", [0.25, 0.5, 0.999])
def test_backoff_jitter_stays_within_bounds(r: float) -> None:
    reg, client, clock = _registration(random=r)
    reg.startService()
    delays = _call_times_while_failing(reg, client, clock, 7)
    for delay, base in zip(delays, [0.5, 1, 2, 4, 8, 8, 8], strict=True):
        assert base * 0.5 <= delay <= base
        assert delay == pytest.approx(base * (1 - 0.5 * r), abs=1e-6)


def test_backoff_delays() -> None:
    b = Backoff(initial_s=0.5, max_s=8.0, factor=2.0, jitter=0.5)
    assert [b.delay(i, lambda: 0.0) for i in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]
    assert b.delay(10_000, lambda: 0.5) == 6.0
    for i in range(20):
        assert 0.25 <= b.delay(i, lambda: 0.99999) <= 8.0
    with pytest.raises(ValueError):
        Backoff(initial_s=0)


def test_rejection_is_retried_with_backoff_not_heartbeat_cadence() -> None:
    reg, client, clock = _registration(random=0.0)
    reg.startService()
    client.last().succeed(REJECTED)
    assert not reg.connected
    clock.advance(0.5)
    assert len(client.calls) == 2
    client.last().succeed(REJECTED)
    clock.advance(1.0)
    assert len(client.calls) == 3
    client.last().succeed(ACCEPTED)
    assert reg.connected
    assert reg.status().last_error is None
    clock.advance(9.99)
    assert len(client.calls) == 3
    clock.advance(0.01)
    assert len(client.calls) == 4


def test_other_errors_are_retried_too() -> None:
    reg, client, clock = _registration(random=0.0)
    reg.startService()
    client.last().fail(ControllerError("unimplemented", "no such method", 501))
    clock.advance(0.5)
    client.last().fail(RuntimeError("bug"))
    clock.advance(1.0)
    assert len(client.calls) == 3
    assert "bug" in (reg.status().last_error or "")


def test_heartbeat_failure_backs_off_then_cadence_resumes(logs: Sequence[LogEvent]) -> None:
    reg, client, clock = _registration(random=0.0)
    reg.startService()
    client.last().succeed(ACCEPTED)
    assert _ours(logs, LogLevel.info) == ["registered with controller {url} as {address}"]
    clock.advance(10)
    assert len(client.calls) == 2
    # The controller goes away for a while.
    delays = _call_times_while_failing(reg, client, clock, 6)
    assert delays == [0.5, 1, 2, 4, 8, 8]
    assert not reg.connected
    assert reg.status().consecutive_failures == 6
    # ... and comes back.
    start = clock.seconds()
    client.last().succeed(ACCEPTED)
    assert reg.connected
    clock.advance(9.99)
    assert len(client.calls) == 8
    clock.advance(0.01)
    assert len(client.calls) == 9 and clock.seconds() == start + 10
    warns = _ours(logs, LogLevel.warn)
    infos = _ours(logs, LogLevel.info)
    assert warns == ["lost controller {url}: {error}; retrying with backoff"]
    assert infos == [
        "registered with controller {url} as {address}",
        "controller {url} is back: registered again after {outage_s:.1f} s",
    ]


def test_never_reached_is_logged_once(logs: Sequence[LogEvent]) -> None:
    reg, client, clock = _registration(random=0.0)
    reg.startService()
    _call_times_while_failing(reg, client, clock, 10)
    assert _ours(logs, LogLevel.warn) == [
        "cannot register with controller {url}: {error}; retrying with backoff"
    ]
    client.last().succeed(ACCEPTED)
    assert _ours(logs, LogLevel.info) == ["registered with controller {url} as {address}"]


def test_lost_invalidates_cached_facts() -> None:
    advert = StaticAdvert()
    reg, client, clock = _registration(advert=advert)
    reg.startService()
    client.last().succeed(ACCEPTED)
    clock.advance(10)
    client.last().fail(ControllerUnavailable("down"))
    clock.advance(0.5)
    client.last().fail(ControllerUnavailable("down"))
    assert advert.invalidations == 1


def test_unbuildable_request_is_retried_and_never_sent(logs: Sequence[LogEvent]) -> None:
    advert = StaticAdvert(port=0)
    reg, client, clock = _registration(random=0.0, advert=advert)
    reg.startService()
    clock.advance(0.5)
    clock.advance(1.0)
    assert client.calls == []
    errors = [e for e in logs if e.get("log_namespace") == NAMESPACE and e["log_level"] == LogLevel.error]
    assert len(errors) == 1 and "port 0" in errors[0]["error"]
    advert.port = 8080
    clock.advance(2.0)
    assert [c.request.address for c in client.calls] == ["10.0.0.9:8080"]  # type: ignore[attr-defined]


def test_stop_cancels_the_timer_and_the_call_in_flight() -> None:
    reg, client, clock = _registration()
    reg.startService()
    client.last().succeed(ACCEPTED)
    clock.advance(10)
    inflight = client.last()
    reg.stopService()
    assert inflight.cancelled
    assert clock.getDelayedCalls() == []
    assert not reg.connected
    clock.advance(100)
    assert len(client.calls) == 2
    # stopping while waiting for the next heartbeat
    reg.startService()
    client.last().succeed(ACCEPTED)
    assert len(clock.getDelayedCalls()) == 1
    reg.stopService()
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert len(client.calls) == 3


def test_advert_builds_the_request_from_local_facts() -> None:
    probes: list[tuple[Any, ...]] = []
    port = [0]

    def probe(host: str | None, controller_port: int, configured: str | None) -> MachineFacts:
        probes.append((host, controller_port, configured))
        return FACTS

    advert = RegistrationAdvert(
        "w1", "controller.example.com:10000", lambda: port[0], InlinePool(), probe=probe
    )
    with pytest.raises(ValueError, match="port 0"):
        _run(advert.build())
    port[0] = 43210
    request = _run(advert.build())
    assert request.worker_id == "w1"
    assert request.address == "10.0.0.9:43210"
    assert (request.resources.cpu, request.resources.memory) == (4, "8g")
    assert not request.resources.HasField("device")
    assert (request.metadata.hostname, request.metadata.ip_address) == ("box", "10.0.0.9")
    assert probes == [("controller.example.com", 10000, None)]  # probed once, then cached
    _run(advert.build())
    assert len(probes) == 1
    advert.invalidate()
    _run(advert.build())
    assert len(probes) == 2


def test_advert_overrides_and_validation() -> None:
    def probe(host: str | None, port: int, configured: str | None) -> MachineFacts:
        return dataclasses.replace(FACTS, advertise_host=configured)

    advert = RegistrationAdvert(
        "w1",
        "http://c:1",
        lambda: 5,
        InlinePool(),
        cpu=2,
        memory="3g",
        advertise_host="w.example",
        probe=probe,
    )
    request = _run(advert.build())
    assert (request.resources.cpu, request.resources.memory) == (2, "3g")
    assert request.address == "w.example:5"
    assert request.metadata.ip_address == "10.0.0.9"
    with pytest.raises(ValueError):
        RegistrationAdvert("w1", "c:1", lambda: 5, InlinePool(), advertise_host="0.0.0.0")
    with pytest.raises(ValueError):
        RegistrationAdvert("w1", "c:1", lambda: 5, InlinePool(), memory="much")
    with pytest.raises(ValueError):
        RegistrationAdvert("w1", "c:1", lambda: 5, InlinePool(), cpu=0)


def test_against_the_fake_controller_in_memory() -> None:
    clock = Clock()
    fake = FakeController(clock)
    client, stub = stub_client(fake, clock)
    fake.reject()
    reg = Registration(client, clock, StaticAdvert(), random=lambda: 0.0)
    reg.startService()
    stub.flush()
    assert not reg.connected
    fake.accept()
    clock.advance(0.5)
    stub.flush()
    assert reg.connected
    clock.advance(10)
    stub.flush()
    fake.fail(503)
    clock.advance(10)
    stub.flush()
    assert not reg.connected
    assert reg.status().last_error == "unavailable: controller is failing"
    reg.stopService()
    assert [c.request.worker_id for c in fake.register_calls] == ["w1"] * 4


def _run(awaitable: Any) -> Any:
    from twisted.internet.defer import Deferred

    out: list[Any] = []
    Deferred.fromCoroutine(awaitable).addBoth(out.append)
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def _due(timer: Any) -> float:
    """When a delayed call of the Clock fires."""
    return float(timer.getTime())
