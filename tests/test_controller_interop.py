"""Interoperability with the official Connect implementation (connect-python, the
library the existing Controller uses), on 127.0.0.1 and the real reactor:

- our ControllerClient / ReportQueue against the official server (hosted as WSGI),
  including a controller that predates ReportJobState;
- the official client against our FakeController (so the fake speaks real Connect).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cluster_connect import (  # type: ignore[import-not-found]
    ControllerServiceClientSync,
    ControllerServiceWSGIApplication,
)
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread
from twisted.web.server import Site
from twisted.web.wsgi import WSGIResource

from fluster_worker.common.backoff import Backoff
from fluster_worker.controller.client import ControllerClient, ControllerError
from fluster_worker.controller.reports import ReportQueue
from fluster_worker.testing.controller import FakeController, poll_until
from fluster_worker.web.rpc import cluster_pb2 as pb

reactor: Any = _reactor


class OfficialController:
    """A ControllerService implementation served by connect-python."""

    def __init__(self, with_reports: bool = True, fail: bool = False) -> None:
        self.with_reports = with_reports
        self.fail = fail
        self.registered: list[pb.RegisterWorkerRequest] = []
        self.reports: list[pb.ReportJobStateRequest] = []

    def register_worker(self, request: pb.RegisterWorkerRequest, ctx: Any) -> pb.RegisterWorkerResponse:
        if self.fail:
            raise ConnectError(Code.UNAVAILABLE, "controller is restarting")
        self.registered.append(request)
        return pb.RegisterWorkerResponse(accepted=True, controller_address="127.0.0.1:1")

    def report_job_state(self, request: pb.ReportJobStateRequest, ctx: Any) -> pb.ReportJobStateResponse:
        if not self.with_reports:
            raise ConnectError(Code.UNIMPLEMENTED, "Not implemented")
        self.reports.append(request)
        return pb.ReportJobStateResponse()


Serve = Callable[[OfficialController], Any]


@pytest_twisted.async_yield_fixture
async def serve(blocking_pool: Any) -> AsyncIterator[Serve]:
    ports: list[Any] = []

    def start(controller: OfficialController) -> str:
        app = ControllerServiceWSGIApplication(controller)
        site = Site(WSGIResource(reactor, blocking_pool.pool, app))
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}"

    yield start
    for port in ports:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_our_client_against_the_official_server(serve: Serve) -> None:
    controller = OfficialController()
    client = ControllerClient.create(serve(controller), reactor, timeout_s=5)
    try:
        request = pb.RegisterWorkerRequest(worker_id="w1", address="127.0.0.1:8080")
        request.resources.cpu = 4
        request.resources.memory = "8g"
        response = await client.call("RegisterWorker", request, pb.RegisterWorkerResponse)
        assert response.accepted and response.controller_address == "127.0.0.1:1"
        assert controller.registered == [request]
        report = pb.ReportJobStateRequest(worker_id="w1", job_id="j", state=pb.JOB_STATE_SUCCEEDED)
        assert (
            await client.call("ReportJobState", report, pb.ReportJobStateResponse)
            == pb.ReportJobStateResponse()
        )
        assert controller.reports == [report]

        with pytest.raises(ControllerError) as unknown:
            await client.call("NoSuchMethod", pb.Empty(), pb.Empty)
        assert unknown.value.code == "unimplemented" and not unknown.value.retryable

        controller.fail = True
        with pytest.raises(ControllerError) as failing:
            await client.call("RegisterWorker", request, pb.RegisterWorkerResponse)
        assert failing.value.code == "unavailable" and failing.value.retryable
        assert failing.value.message == "controller is restarting"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_reports_against_the_official_server(serve: Serve, blocking_pool: Any, tmp_path: Path) -> None:
    controller = OfficialController()
    client = ControllerClient.create(serve(controller), reactor, timeout_s=5)
    queue = ReportQueue(client, reactor, blocking_pool, tmp_path, "w1", backoff=Backoff(0.05, 0.2))
    queue.startService()
    try:
        for job in ("a", "b"):
            queue.report(pb.ReportJobStateRequest(job_id=job, state=pb.JOB_STATE_RUNNING, attempt_id=2))
            queue.report(pb.ReportJobStateRequest(job_id=job, state=pb.JOB_STATE_SUCCEEDED, attempt_id=2))
        await poll_until(lambda: queue.pending == 0, reactor, what="delivery")
    finally:
        await queue.stopService()
        await client.close()
    assert [(r.job_id, r.state, r.worker_id, r.attempt_id) for r in controller.reports] == [
        ("a", pb.JOB_STATE_RUNNING, "w1", 2),
        ("a", pb.JOB_STATE_SUCCEEDED, "w1", 2),
        ("b", pb.JOB_STATE_RUNNING, "w1", 2),
        ("b", pb.JOB_STATE_SUCCEEDED, "w1", 2),
    ]


@pytest_twisted.ensureDeferred
async def test_an_official_older_controller_does_not_pile_reports_up(
    serve: Serve, blocking_pool: Any, tmp_path: Path
) -> None:
    controller = OfficialController(with_reports=False)
    client = ControllerClient.create(serve(controller), reactor, timeout_s=5)
    queue = ReportQueue(client, reactor, blocking_pool, tmp_path, "w1", backoff=Backoff(0.05, 0.2))
    queue.startService()
    try:
        for i in range(3):
            queue.report(pb.ReportJobStateRequest(job_id=f"j{i}", state=pb.JOB_STATE_SUCCEEDED))
        await poll_until(lambda: queue.pending == 0, reactor, what="the drops")
    finally:
        await queue.stopService()
        await client.close()
    assert queue.dropped == 3 and queue.delivered == 0
    assert list((tmp_path / "reports").iterdir()) == []


@pytest_twisted.async_yield_fixture
async def fake() -> AsyncIterator[FakeController]:
    controller = FakeController(reactor)
    await controller.start()
    yield controller
    await controller.stop()


@pytest.mark.parametrize("proto_json", [False, True])
@pytest_twisted.ensureDeferred
async def test_the_official_client_against_the_fake(fake: FakeController, proto_json: bool) -> None:
    """The official client gzips request bodies by default; both codecs."""

    def calls() -> tuple[Any, ...]:
        with ControllerServiceClientSync(fake.url, proto_json=proto_json, timeout_ms=5000) as client:
            registered = client.register_worker(pb.RegisterWorkerRequest(worker_id="w1", address="h:1"))
            client.report_job_state(
                pb.ReportJobStateRequest(worker_id="w1", job_id="j", state=pb.JOB_STATE_RUNNING)
            )
            fake.report_error = (501, "unimplemented")
            try:
                client.report_job_state(pb.ReportJobStateRequest(job_id="k"))
            except ConnectError as e:
                refused = e.code
            fake.fail(503)
            try:
                client.register_worker(pb.RegisterWorkerRequest(worker_id="w1"))
            except ConnectError as e:
                failing = e.code
            return registered, refused, failing

    registered, refused, failing = await deferToThread(calls)
    assert registered.accepted
    assert refused == Code.UNIMPLEMENTED
    assert failing == Code.UNAVAILABLE
    assert [c.method for c in fake.calls] == [
        "RegisterWorker",
        "ReportJobState",
        "ReportJobState",
        "RegisterWorker",
    ]
    assert fake.register_calls[0].request == pb.RegisterWorkerRequest(worker_id="w1", address="h:1")
    assert fake.reports[0].job_id == "j"
    expected_type = "application/json" if proto_json else "application/proto"
    assert {c.content_type for c in fake.calls} == {expected_type}
