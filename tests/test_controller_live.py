"""The controller side against FakeController on 127.0.0.1, on the real reactor:
registration, an outage of several retry intervals, and a worker restart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, capturedLogs

from fluster_worker.common.backoff import Backoff
from fluster_worker.controller.client import ControllerClient, ControllerUnavailable
from fluster_worker.controller.registration import Registration, RegistrationAdvert
from fluster_worker.controller.reports import ReportQueue
from fluster_worker.testing.controller import FakeController, poll_until
from fluster_worker.web.rpc import cluster_pb2 as pb

reactor: Any = _reactor
FAST = Backoff(initial_s=0.05, max_s=0.2, factor=2.0, jitter=0.5)
RUNNING, SUCCEEDED, FAILED = pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED


@pytest_twisted.async_yield_fixture
async def fake() -> AsyncIterator[FakeController]:
    controller = FakeController(reactor)
    await controller.start()
    yield controller
    await controller.stop()


def _client(fake: FakeController) -> ControllerClient:
    return ControllerClient.create(fake.url, reactor, timeout_s=2.0)


def _queue(client: ControllerClient, pool: Any, state_dir: Path) -> ReportQueue:
    return ReportQueue(client, reactor, pool, state_dir, "w-live", backoff=FAST)


def _report(job: str, state: int, attempt: int = 1) -> pb.ReportJobStateRequest:
    return pb.ReportJobStateRequest(job_id=job, state=state, attempt_id=attempt)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_registration_and_heartbeats_through_an_outage(
    fake: FakeController, blocking_pool: Any
) -> None:
    # The worker listens on port 0: the advertised port is the one it really got.
    listening = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    client = _client(fake)
    advert = RegistrationAdvert("w-live", fake.url, lambda: listening.getHost().port, blocking_pool)
    registration = Registration(client, reactor, advert, heartbeat_interval_s=0.1, backoff=FAST)
    with capturedLogs() as events:
        registration.startService()
        try:
            await poll_until(lambda: len(fake.register_calls) >= 3, reactor, what="heartbeats")
            assert registration.connected
            assert registration.controller_url == fake.url
            assert registration.last_heartbeat_ms is not None
            request = fake.register_calls[0].request
            assert request.worker_id == "w-live"
            assert request.address == f"127.0.0.1:{listening.getHost().port}"
            assert request.resources.cpu >= 1 and request.resources.memory.endswith(("g", "m"))
            assert request.metadata.hostname and request.metadata.memory_bytes > 0

            await fake.stop()
            await poll_until(lambda: not registration.connected, reactor, what="the loss")
            failures_seen = registration.status().consecutive_failures
            await poll_until(
                lambda: registration.status().consecutive_failures >= failures_seen + 4,
                reactor,
                what="several retries",
            )
            seen = len(fake.register_calls)
            await fake.start()
            await poll_until(lambda: registration.connected, reactor, what="re-registration")
            assert len(fake.register_calls) > seen
        finally:
            registration.stopService()
            await client.close()
            await listening.stopListening()
    ours = [e for e in events if e.get("log_namespace") == "fluster_worker.controller.registration"]
    assert len([e for e in ours if e["log_level"] == LogLevel.warn]) == 1
    assert len([e for e in ours if "is back" in e["log_format"]]) == 1


@pytest_twisted.ensureDeferred
async def test_reports_survive_an_outage_in_order(
    fake: FakeController, blocking_pool: Any, tmp_path: Path
) -> None:
    client = _client(fake)
    queue = _queue(client, blocking_pool, tmp_path)
    queue.startService()
    try:
        queue.report(_report("job-a", RUNNING))
        await poll_until(lambda: queue.pending == 0, reactor, what="the first report")
        assert len(fake.reports) == 1

        await fake.stop()
        during = [
            ("job-b", RUNNING),
            ("job-a", SUCCEEDED),
            ("job-b", FAILED),
            ("job-c", RUNNING),
            ("job-c", SUCCEEDED),
        ]
        for job, state in during:
            queue.report(_report(job, state))
        await poll_until(lambda: queue.consecutive_failures >= 4, reactor, what="several retries")
        assert queue.pending == len(during)
        assert len(list((tmp_path / "reports").iterdir())) == len(during)

        await fake.start()  # same port
        await poll_until(lambda: queue.pending == 0, reactor, what="delivery after the outage")
    finally:
        await queue.stopService()
        await client.close()
    delivered = [(r.job_id, r.state) for r in fake.reports]
    assert delivered == [("job-a", RUNNING), *during]  # every one, once, in order
    assert all(r.worker_id == "w-live" and r.attempt_id == 1 for r in fake.reports)
    assert list((tmp_path / "reports").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_a_restarted_worker_still_delivers(
    fake: FakeController, blocking_pool: Any, tmp_path: Path
) -> None:
    await fake.stop()
    client = _client(fake)
    first = _queue(client, blocking_pool, tmp_path)
    first.startService()
    reports = [("job-a", RUNNING), ("job-b", RUNNING), ("job-a", SUCCEEDED)]
    try:
        for job, state in reports:
            first.report(_report(job, state))
        await poll_until(lambda: first.consecutive_failures >= 2, reactor, what="retries")
    finally:
        await first.stopService()
        await client.close()

    # The worker process restarts: new client, new queue, same state directory.
    await fake.start()
    client = _client(fake)
    second = _queue(client, blocking_pool, tmp_path)
    second.startService()
    try:
        await poll_until(lambda: second.pending == 0 and second.delivered == 3, reactor, what="delivery")
    finally:
        await second.stopService()
        await client.close()
    assert [(r.job_id, r.state) for r in fake.reports] == reports


@pytest_twisted.ensureDeferred
async def test_an_older_controller_does_not_pile_reports_up(
    fake: FakeController, blocking_pool: Any, tmp_path: Path
) -> None:
    fake.report_error = (501, "unimplemented")
    client = _client(fake)
    queue = _queue(client, blocking_pool, tmp_path)
    queue.startService()
    try:
        for i in range(5):
            queue.report(_report(f"job-{i}", SUCCEEDED))
        await poll_until(lambda: queue.pending == 0, reactor, what="the drops")
    finally:
        await queue.stopService()
        await client.close()
    assert queue.dropped == 5 and len(fake.reports) == 5
    assert list((tmp_path / "reports").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_unavailable(fake: FakeController) -> None:
    await fake.stop()
    client = _client(fake)
    try:
        with pytest.raises(ControllerUnavailable) as info:
            await client.call("RegisterWorker", pb.RegisterWorkerRequest(), pb.RegisterWorkerResponse)
    finally:
        await client.close()
    assert info.value.retryable
    assert "refused" in str(info.value).lower()
