"""The Connect layer over a real socket: codecs, compression, every error path."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
import treq
from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from fluster_worker.common.threads import BlockingPool
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.rpc.connect import ConnectRouter, mount_unknown_services
from fluster_worker.web.rpc.errors import Code, ConnectError
from fluster_worker.web.rpc.site import bounded_site

LIMIT = 64 * 1024


class FakeService:
    """Each method exercises one way a service can answer."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def HealthCheck(self, request: pb.Empty) -> pb.HealthResponse:
        return pb.HealthResponse(healthy=True, uptime_ms=1234, running_jobs=2)

    async def GetJobStatus(self, request: pb.GetJobStatusRequest) -> pb.JobStatus:
        self.calls.append(request)
        if request.job_id == "missing":
            raise ConnectError(Code.NOT_FOUND, "job missing not found")
        return pb.JobStatus(job_id=request.job_id, state=pb.JOB_STATE_RUNNING, exit_code=0)

    def RunJob(self, request: pb.RunJobRequest) -> Deferred[pb.RunJobResponse]:
        self.calls.append(request)
        d: Deferred[pb.RunJobResponse] = Deferred()
        reactor.callLater(0, d.callback, pb.RunJobResponse(job_id=request.job_id, state=pb.JOB_STATE_PENDING))
        return d

    def ListJobs(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        raise RuntimeError("secret internal detail")

    def FetchLogs(self, request: pb.FetchLogsRequest) -> Deferred[pb.FetchLogsResponse]:
        return Deferred()  # never answers: for the deadline test

    def KillJob(self, request: pb.KillJobRequest) -> pb.HealthResponse:
        return pb.HealthResponse()  # wrong type on purpose


@pytest_twisted.async_yield_fixture
async def server(blocking_pool: BlockingPool) -> AsyncIterator[tuple[str, FakeService]]:
    service = FakeService()
    app = Klein()
    ConnectRouter(
        pb.DESCRIPTOR.services_by_name["WorkerService"], service, reactor, pool=blocking_pool, max_body_bytes=LIMIT
    ).mount(app)
    mount_unknown_services(app)
    port = reactor.listenTCP(0, bounded_site(app.resource(), LIMIT), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}", service
    await port.stopListening()


def url(base: str, method: str) -> str:
    return f"{base}/fluster.cluster.WorkerService/{method}"


async def post(target: str, body: bytes, content_type: str = "application/proto", **headers: str) -> Any:
    hdrs = {"Content-Type": [content_type], "Connect-Protocol-Version": ["1"]}
    hdrs.update({k.replace("_", "-"): [v] for k, v in headers.items()})
    response = await treq.post(target, data=body, headers=hdrs)
    return response, await response.content()


async def expect_error(response_body: tuple[Any, bytes], status: int, code: str) -> dict[str, Any]:
    response, body = response_body
    assert response.code == status, body
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    error = json.loads(body)
    assert error["code"] == code
    assert "\n" not in error["message"]
    return error  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_binary_round_trip(server: tuple[str, FakeService]) -> None:
    base, _ = server
    response, body = await post(url(base, "HealthCheck"), pb.Empty().SerializeToString())
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/proto"]
    assert pb.HealthResponse.FromString(body) == pb.HealthResponse(healthy=True, uptime_ms=1234, running_jobs=2)


@pytest_twisted.ensureDeferred
async def test_empty_body_is_an_empty_message(server: tuple[str, FakeService]) -> None:
    base, _ = server
    response, body = await post(url(base, "HealthCheck"), b"")
    assert response.code == 200
    assert pb.HealthResponse.FromString(body).healthy


@pytest_twisted.ensureDeferred
async def test_json_round_trip_accepts_both_field_spellings(server: tuple[str, FakeService]) -> None:
    base, service = server
    for field in ("jobId", "job_id"):
        response, body = await post(
            url(base, "GetJobStatus"),
            json.dumps({field: "j1", "includeResult": True, "unknownField": 3}).encode(),
            "application/json",
        )
        assert response.code == 200, body
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
        assert json.loads(body) == {"jobId": "j1", "state": "JOB_STATE_RUNNING"}
    assert [c.job_id for c in service.calls] == ["j1", "j1"]
    assert service.calls[0].include_result


@pytest_twisted.ensureDeferred
async def test_json_charset_parameter_is_accepted(server: tuple[str, FakeService]) -> None:
    base, _ = server
    response, _ = await post(url(base, "HealthCheck"), b"{}", "application/json; charset=utf-8")
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_deferred_result(server: tuple[str, FakeService]) -> None:
    base, _ = server
    request = pb.RunJobRequest(job_id="j2", serialized_entrypoint=b"x")
    response, body = await post(url(base, "RunJob"), request.SerializeToString())
    assert response.code == 200
    assert pb.RunJobResponse.FromString(body) == pb.RunJobResponse(job_id="j2", state=pb.JOB_STATE_PENDING)


@pytest_twisted.ensureDeferred
async def test_gzip_request_body_is_decoded(server: tuple[str, FakeService]) -> None:
    base, service = server
    body = gzip.compress(pb.GetJobStatusRequest(job_id="gz").SerializeToString())
    response, answer = await post(url(base, "GetJobStatus"), body, content_encoding="gzip")
    assert response.code == 200
    assert pb.JobStatus.FromString(answer).job_id == "gz"


@pytest_twisted.ensureDeferred
async def test_service_error_maps_code_and_status(server: tuple[str, FakeService]) -> None:
    base, _ = server
    body = pb.GetJobStatusRequest(job_id="missing").SerializeToString()
    error = await expect_error(await post(url(base, "GetJobStatus"), body), 404, "not_found")
    assert error["message"] == "job missing not found"
    assert error["details"][0]["type"] == "fluster.rpc.ErrorDetails"


@pytest_twisted.ensureDeferred
async def test_internal_error_hides_details(server: tuple[str, FakeService]) -> None:
    base, _ = server
    error = await expect_error(await post(url(base, "ListJobs"), b""), 500, "internal")
    assert "secret" not in json.dumps(error)


@pytest_twisted.ensureDeferred
async def test_wrong_response_type_is_internal(server: tuple[str, FakeService]) -> None:
    base, _ = server
    await expect_error(await post(url(base, "KillJob"), b""), 500, "internal")


@pytest_twisted.ensureDeferred
async def test_unknown_method_and_service_are_unimplemented(server: tuple[str, FakeService]) -> None:
    base, _ = server
    await expect_error(await post(url(base, "Nope"), b""), 501, "unimplemented")
    await expect_error(await post(f"{base}/fluster.cluster.Other/Thing", b""), 501, "unimplemented")


@pytest_twisted.ensureDeferred
async def test_wrong_content_type_is_415(server: tuple[str, FakeService]) -> None:
    base, _ = server
    response, _body = await post(url(base, "HealthCheck"), b"", "text/plain")
    assert response.code == 415
    response, _body = await post(url(base, "HealthCheck"), b"", "application/grpc")
    assert response.code == 415


@pytest_twisted.ensureDeferred
async def test_malformed_bodies_are_invalid_argument(server: tuple[str, FakeService]) -> None:
    base, _ = server
    await expect_error(await post(url(base, "GetJobStatus"), b"\xff\xff\xff"), 400, "invalid_argument")
    await expect_error(
        await post(url(base, "GetJobStatus"), b"{not json", "application/json"), 400, "invalid_argument"
    )
    await expect_error(
        await post(url(base, "GetJobStatus"), b"\xff\xfe", "application/json"), 400, "invalid_argument"
    )
    await expect_error(
        await post(url(base, "GetJobStatus"), b"not gzip", content_encoding="gzip"), 400, "invalid_argument"
    )
    await expect_error(
        await post(url(base, "HealthCheck"), b"", connect_protocol_version="2"), 400, "invalid_argument"
    )
    await expect_error(
        await post(url(base, "HealthCheck"), b"", connect_timeout_ms="soon"), 400, "invalid_argument"
    )


@pytest_twisted.ensureDeferred
async def test_unknown_encoding_is_unimplemented(server: tuple[str, FakeService]) -> None:
    base, _ = server
    await expect_error(await post(url(base, "HealthCheck"), b"", content_encoding="br"), 501, "unimplemented")


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_resource_exhausted(server: tuple[str, FakeService]) -> None:
    base, _ = server
    body = pb.RunJobRequest(serialized_entrypoint=b"x" * (LIMIT + 1)).SerializeToString()
    await expect_error(await post(url(base, "RunJob"), body), 429, "resource_exhausted")


@pytest_twisted.ensureDeferred
async def test_oversized_chunked_body_is_resource_exhausted(server: tuple[str, FakeService]) -> None:
    base, _ = server

    # A generator body has no length: treq sends it chunked.
    from twisted.web.client import FileBodyProducer

    class Unsized(FileBodyProducer):
        length = None  # type: ignore[assignment]

    import io

    producer = Unsized(io.BytesIO(b"y" * (4 * LIMIT)))
    response = await treq.post(
        url(base, "RunJob"), data=producer, headers={"Content-Type": ["application/proto"]}
    )
    body = await response.content()
    assert response.code == 429, body
    assert json.loads(body)["code"] == "resource_exhausted"


@pytest_twisted.ensureDeferred
async def test_gzip_bomb_is_resource_exhausted(server: tuple[str, FakeService]) -> None:
    base, _ = server
    bomb = gzip.compress(b"\0" * (LIMIT * 16))
    assert len(bomb) < LIMIT
    await expect_error(
        await post(url(base, "RunJob"), bomb, content_encoding="gzip"), 429, "resource_exhausted"
    )


@pytest_twisted.ensureDeferred
async def test_connect_timeout_is_deadline_exceeded(server: tuple[str, FakeService]) -> None:
    base, _ = server
    await expect_error(
        await post(url(base, "FetchLogs"), b"", connect_timeout_ms="50"), 504, "deadline_exceeded"
    )


@pytest_twisted.ensureDeferred
async def test_get_is_not_an_rpc(server: tuple[str, FakeService]) -> None:
    base, _ = server
    response = await treq.get(url(base, "HealthCheck"))
    await response.content()
    assert response.code == 405


@pytest_twisted.ensureDeferred
async def test_every_refused_call_is_logged_once_with_method_code_and_reason(blocking_pool: BlockingPool) -> None:
    from twisted.logger import Logger, formatEvent

    from fluster_worker.web.refusals import RefusalLog

    refusals = RefusalLog(reactor, burst=100)
    events: list[dict[str, Any]] = []
    refusals.log = Logger(namespace="test", observer=events.append)
    app = Klein()
    ConnectRouter(
        pb.DESCRIPTOR.services_by_name["WorkerService"], FakeService(), reactor, pool=blocking_pool,
        max_body_bytes=LIMIT, refusals=refusals,
    ).mount(app)
    mount_unknown_services(app, refusals)
    port = reactor.listenTCP(0, bounded_site(app.resource(), LIMIT), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        ok = pb.GetJobStatusRequest(job_id="present").SerializeToString()
        await expect_error(await post(url(base, "GetJobStatus"),
                                      pb.GetJobStatusRequest(job_id="missing").SerializeToString()), 404, "not_found")
        await post(url(base, "GetJobStatus"), ok)  # answered: not a refusal
        await expect_error(await post(url(base, "RunJob"), b"\xff\xff"), 400, "invalid_argument")
        await expect_error(await post(url(base, "Nope"), b""), 501, "unimplemented")
        await expect_error(await post(f"{base}/other.Service/Call", b""), 501, "unimplemented")
        await expect_error(await post(url(base, "ListJobs"), b""), 500, "internal")  # logged with its traceback
    finally:
        await port.stopListening()
    lines = [formatEvent(e) for e in events]
    assert len(lines) == 4, lines
    assert lines[0].startswith("refused GetJobStatus from 127.0.0.1:")
    assert "not_found: job missing not found" in lines[0]
    assert "refused RunJob" in lines[1] and "invalid_argument" in lines[1]
    assert "refused Nope" in lines[2] and "unimplemented" in lines[2]
    assert "refused other.Service/Call" in lines[3]
