"""The Connect layer's inputs and answers over a real socket: what is parsed or
encoded on the reactor and what on the pool, cached answers, odd headers."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest
import pytest_twisted
import treq
from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

from fluster_worker.common.threads import BlockingPool
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.rpc import codec
from fluster_worker.web.rpc.connect import ConnectRouter, Encoded
from fluster_worker.web.rpc.site import bounded_site

T = TypeVar("T")
LIMIT = 8 * 2**20
INLINE = 4096


class CountingPool(BlockingPool):
    """A BlockingPool that counts what runs on it."""

    def __init__(self) -> None:
        super().__init__(reactor, "counting")
        self.calls = 0

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        self.calls += 1
        return super().run(f, *args, **kwargs)


class Service:
    def __init__(self) -> None:
        self.requests: list[Any] = []

    def RunJob(self, request: pb.RunJobRequest) -> pb.RunJobResponse:
        self.requests.append(request)
        return pb.RunJobResponse(job_id=request.job_id)

    def ListJobs(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=[pb.JobStatus(job_id=f"job-{i}", error="x" * 100) for i in range(1000)])

    def GetJobStatus(self, request: pb.GetJobStatusRequest) -> Encoded:
        status = pb.JobStatus(job_id=request.job_id, exit_code=3)
        return Encoded(
            pb.JobStatus, lambda c, _: b"cached " + c.encode() if request.job_id == "raw" else codec.encode(status, c)
        )

    def HealthCheck(self, request: pb.Empty) -> Encoded:
        return Encoded(pb.JobStatus, lambda c, _: b"")  # the wrong type on purpose


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[tuple[str, Service, CountingPool]]:
    pool = CountingPool()
    pool.startService()
    service = Service()
    app = Klein()
    ConnectRouter(
        pb.DESCRIPTOR.services_by_name["WorkerService"],
        service,
        reactor,
        pool=pool,
        max_body_bytes=LIMIT,
        inline_body_bytes=INLINE,
        inline_answer_bytes=INLINE,
    ).mount(app)
    port = reactor.listenTCP(0, bounded_site(app.resource(), LIMIT), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}/fluster.cluster.WorkerService/", service, pool
    await port.stopListening()
    await pool.stopService()


async def post(
    target: str, body: bytes, content_type: str = "application/json", headers: dict[Any, Any] | None = None
) -> tuple[Any, bytes]:
    hdrs: dict[Any, list[Any]] = {"Content-Type": [content_type]}
    hdrs.update({k: [v] for k, v in (headers or {}).items()})
    response = await treq.post(target, data=body, headers=hdrs)
    return response, await response.content()


@pytest_twisted.ensureDeferred
async def test_small_gzip_body_that_inflates_is_parsed_on_the_pool(server: tuple[str, Service, CountingPool]) -> None:
    base, service, pool = server
    big = json.dumps({"jobId": "big", "ports": ["a"] * 20000}).encode()
    small = gzip.compress(big)
    assert len(small) < INLINE < len(big)
    response, body = await post(base + "RunJob", small, headers={"Content-Encoding": "gzip"})
    assert response.code == 200, body
    assert pool.calls == 1  # the parse, not on the reactor
    assert len(service.requests[-1].ports) == 20000

    tiny = gzip.compress(json.dumps({"jobId": "tiny", "ports": ["a"]}).encode())
    response, body = await post(base + "RunJob", tiny, headers={"Content-Encoding": "gzip"})
    assert response.code == 200, body
    assert pool.calls == 1  # small once inflated: parsed inline
    assert service.requests[-1].job_id == "tiny"


@pytest_twisted.ensureDeferred
async def test_truncated_small_gzip_is_invalid_argument(server: tuple[str, Service, CountingPool]) -> None:
    base, _, _ = server
    cut = gzip.compress(b'{"jobId": "x"}')[:-6]
    response, body = await post(base + "RunJob", cut, headers={"Content-Encoding": "gzip"})
    assert response.code == 400, body
    assert json.loads(body)["code"] == "invalid_argument"


@pytest.mark.parametrize("value", ["\u00b2".encode("latin-1"), "\u00b3".encode("latin-1"), "\u00b9".encode("latin-1"),
                                   "\u0663".encode(), "\u00b2".encode(), "１０".encode(), b"12\xb2"])
@pytest_twisted.ensureDeferred
async def test_non_ascii_digits_in_connect_timeout_are_a_plain_400(
    server: tuple[str, Service, CountingPool], value: bytes
) -> None:
    base, _, _ = server
    failures: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        response, body = await post(base + "RunJob", b"{}", headers={b"Connect-Timeout-Ms": value})
    finally:
        globalLogPublisher.removeObserver(observer)
    assert response.code == 400, body
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    error = json.loads(body)
    assert error["code"] == "invalid_argument"
    assert "connect-timeout-ms" in error["message"]
    assert failures == []  # no traceback logged


@pytest_twisted.ensureDeferred
async def test_large_answers_are_encoded_on_the_pool_in_both_codecs(server: tuple[str, Service, CountingPool]) -> None:
    base, _, pool = server
    response, body = await post(base + "ListJobs", b"", "application/proto")
    assert response.code == 200
    assert len(pb.ListJobsResponse.FromString(body).jobs) == 1000
    assert pool.calls == 1
    response, body = await post(base + "ListJobs", b"{}", "application/json")
    assert response.code == 200
    assert len(json.loads(body)["jobs"]) == 1000
    assert pool.calls == 2
    response, body = await post(base + "RunJob", b'{"jobId": "small"}', "application/json")
    assert json.loads(body) == {"jobId": "small"}
    assert pool.calls == 2  # a small answer is encoded inline


@pytest_twisted.ensureDeferred
async def test_encoded_answers_are_served_as_given(server: tuple[str, Service, CountingPool]) -> None:
    base, _, _ = server
    response, body = await post(base + "GetJobStatus", b'{"jobId": "raw"}')
    assert (response.code, body) == (200, b"cached application/json")
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    response, body = await post(base + "GetJobStatus", pb.GetJobStatusRequest(job_id="j").SerializeToString(),
                                "application/proto")
    assert pb.JobStatus.FromString(body) == pb.JobStatus(job_id="j", exit_code=3)
    response, body = await post(base + "HealthCheck", b"{}")
    assert response.code == 500  # an Encoded of the wrong message type
    assert json.loads(body)["code"] == "internal"
