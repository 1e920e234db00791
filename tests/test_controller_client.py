"""ControllerClient: Connect unary calls over treq (in memory, on a task.Clock)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StringStubbingResource, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from fluster_worker.controller.client import (
    CODES,
    ControllerClient,
    ControllerError,
    ControllerUnavailable,
    parse_connect_error,
)
from fluster_worker.testing.controller import FakeController, connect_error_body, stub_client
from fluster_worker.web.rpc import cluster_pb2 as pb

Seen = list[tuple[bytes, str, dict[bytes, list[bytes]], bytes]]


def _stub(code: int, headers: dict[bytes, bytes], body: bytes) -> tuple[ControllerClient, StubTreq, Seen]:
    seen: Seen = []

    def respond(method: bytes, url: str, params: Any, hdrs: Any, data: bytes) -> Any:
        seen.append((method, url, hdrs, data))
        return code, headers, body

    stub = StubTreq(StringStubbingResource(respond))
    client = ControllerClient("127.0.0.1:9090", stub, Clock(), timeout_s=10)  # type: ignore[arg-type]
    return client, stub, seen


def _result(d: Deferred[Any], stub: StubTreq | None = None) -> Any:
    if stub is not None:
        stub.flush()
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the call did not finish"
    return out[0]


def _error(d: Deferred[Any], stub: StubTreq | None = None) -> ControllerError:
    result = _result(d, stub)
    assert isinstance(result, Failure), result
    assert isinstance(result.value, ControllerError), result
    return result.value


def test_request_shape() -> None:
    response = pb.RegisterWorkerResponse(accepted=True, controller_address="c:1")
    client, stub, seen = _stub(200, {b"content-type": b"application/proto"}, response.SerializeToString())
    request = pb.RegisterWorkerRequest(worker_id="w1", address="10.0.0.1:8080")
    result = _result(client.call("RegisterWorker", request, pb.RegisterWorkerResponse), stub)
    assert result == response
    [(method, url, headers, data)] = seen
    assert method == b"POST"
    assert url == "http://127.0.0.1:9090/fluster.cluster.ControllerService/RegisterWorker"
    lowered = {k.lower(): v for k, v in headers.items()}
    assert lowered[b"content-type"] == [b"application/proto"]
    assert lowered[b"connect-protocol-version"] == [b"1"]
    assert lowered[b"connect-timeout-ms"] == [b"10000"]
    assert pb.RegisterWorkerRequest.FromString(data) == request


def test_empty_body_is_an_empty_message() -> None:
    client, stub, _ = _stub(200, {b"content-type": b"application/proto"}, b"")
    result = _result(
        client.call("ReportJobState", pb.ReportJobStateRequest(), pb.ReportJobStateResponse), stub
    )
    assert result == pb.ReportJobStateResponse()


def test_base_url_is_normalized() -> None:
    assert ControllerClient("c:1", StubTreq(Resource()), Clock()).base_url == "http://c:1"  # type: ignore[arg-type]
    assert ControllerClient("http://c:1/", StubTreq(Resource()), Clock()).base_url == "http://c:1"  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ControllerClient("ftp://c:1", StubTreq(Resource()), Clock())  # type: ignore[arg-type]


def test_connect_error() -> None:
    body = connect_error_body("failed_precondition", "worker w1 is draining")
    client, stub, _ = _stub(400, {b"content-type": b"application/json"}, body)
    err = _error(client.call("ReportJobState", pb.ReportJobStateRequest(), pb.ReportJobStateResponse), stub)
    assert (err.code, err.message, err.http_status) == ("failed_precondition", "worker w1 is draining", 400)
    assert not err.retryable
    assert not isinstance(err, ControllerUnavailable)


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (404, b"<html><body>Not Found</body></html>", "unimplemented"),
        (503, b"upstream connect error", "unavailable"),
        (502, b"", "unavailable"),
        (500, b"{", "unknown"),
        (500, b"\xff\xfe\x00garbage", "unknown"),
        (500, b"[1, 2, 3]", "unknown"),
        (500, b'"a string"', "unknown"),
        (400, json.dumps({"code": "no_such_code", "message": "x"}).encode(), "invalid_argument"),
        (503, json.dumps({"code": 7, "message": ["x"]}).encode(), "unavailable"),
        (418, b"teapot", "unknown"),
        (429, b"", "unavailable"),
    ],
)
def test_garbage_error_bodies_fall_back_to_the_status(status: int, body: bytes, code: str) -> None:
    client, stub, _ = _stub(status, {b"content-type": b"text/html"}, body)
    err = _error(client.call("ReportJobState", pb.ReportJobStateRequest(), pb.ReportJobStateResponse), stub)
    assert err.code == code
    assert err.http_status == status
    assert "\n" not in str(err)


def test_error_message_is_one_bounded_line() -> None:
    body = connect_error_body("internal", "line one\nline two\r\n" + "x" * 5000)
    client, stub, _ = _stub(500, {b"content-type": b"application/json"}, body)
    err = _error(client.call("ReportJobState", pb.ReportJobStateRequest(), pb.ReportJobStateResponse), stub)
    assert err.message.startswith("line one line two")
    assert "\n" not in err.message and len(err.message) <= 500
    assert err.retryable


def test_oversized_answers() -> None:
    big = b"x" * 5000
    for status, code in ((200, "internal"), (503, "unavailable")):
        _, stub, _ = _stub(status, {b"content-type": b"application/proto"}, big)
        client = ControllerClient("c:1", stub, Clock(), max_response_bytes=1000)  # type: ignore[arg-type]
        err = _error(
            client.call("ReportJobState", pb.ReportJobStateRequest(), pb.ReportJobStateResponse), stub
        )
        assert err.code == code


def test_unparsable_success_body() -> None:
    client, stub, _ = _stub(200, {b"content-type": b"application/proto"}, b"\xff\xff\xff\xff")
    err = _error(client.call("RegisterWorker", pb.RegisterWorkerRequest(), pb.RegisterWorkerResponse), stub)
    assert err.code == "internal" and err.retryable


def test_success_with_a_foreign_content_type() -> None:
    client, stub, _ = _stub(200, {b"content-type": b"text/html"}, b"<html>captive portal</html>")
    err = _error(client.call("RegisterWorker", pb.RegisterWorkerRequest(), pb.RegisterWorkerResponse), stub)
    assert err.code == "internal" and "text/html" in err.message


class _Hang(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render_POST(self, request: Request) -> int:
        self.requests.append(request)
        return NOT_DONE_YET


def test_timeout_is_unavailable() -> None:
    clock = Clock()
    hang = _Hang()
    stub = StubTreq(hang)
    client = ControllerClient("c:1", stub, clock, timeout_s=2.5)  # type: ignore[arg-type]
    d = client.call("RegisterWorker", pb.RegisterWorkerRequest(), pb.RegisterWorkerResponse)
    stub.flush()
    assert len(hang.requests) == 1
    out: list[Any] = []
    d.addBoth(out.append)
    clock.advance(2.4)
    assert not out
    clock.advance(0.1)
    [failure] = out
    assert isinstance(failure.value, ControllerUnavailable)
    assert failure.value.code == "deadline_exceeded" and failure.value.retryable
    assert not clock.getDelayedCalls()


def test_cancel_is_not_translated() -> None:
    stub = StubTreq(_Hang())
    clock = Clock()
    client = ControllerClient("c:1", stub, clock)  # type: ignore[arg-type]
    d = client.call("RegisterWorker", pb.RegisterWorkerRequest(), pb.RegisterWorkerResponse)
    stub.flush()
    out: list[Any] = []
    d.addBoth(out.append)
    d.cancel()
    from twisted.internet.defer import CancelledError

    assert isinstance(out[0].value, CancelledError)
    assert not clock.getDelayedCalls()


def test_bad_method_name() -> None:
    client, _, _ = _stub(200, {}, b"")
    with pytest.raises(ValueError):
        client.call("../etc", pb.Empty(), pb.Empty)


def test_against_the_fake_controller() -> None:
    clock = Clock()
    fake = FakeController(clock)
    client, stub = stub_client(fake, clock)
    ok = _result(
        client.call("RegisterWorker", pb.RegisterWorkerRequest(worker_id="w"), pb.RegisterWorkerResponse),
        stub,
    )
    assert ok.accepted
    fake.reject()
    assert not _result(
        client.call("RegisterWorker", pb.RegisterWorkerRequest(), pb.RegisterWorkerResponse), stub
    ).accepted
    fake.fail(503)
    err = _error(client.call("RegisterWorker", pb.RegisterWorkerRequest(), pb.RegisterWorkerResponse), stub)
    assert (err.code, err.http_status, err.retryable) == ("unavailable", 503, True)
    fake.recover()
    fake.report_error = (501, "unimplemented")
    err = _error(client.call("ReportJobState", pb.ReportJobStateRequest(), pb.ReportJobStateResponse), stub)
    assert (err.code, err.retryable) == ("unimplemented", False)
    err = _error(client.call("NoSuchMethod", pb.Empty(), pb.Empty), stub)
    assert err.code == "unimplemented"
    assert [c.method for c in fake.calls] == ["RegisterWorker"] * 3 + ["ReportJobState"]
    assert clock.getDelayedCalls() == []  # no timeout timer outlives its call


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        ("unavailable", True),
        ("deadline_exceeded", True),
        ("resource_exhausted", True),
        ("internal", True),
        ("unknown", True),
        ("aborted", True),
        ("invalid_argument", False),
        ("not_found", False),
        ("failed_precondition", False),
        ("unimplemented", False),
        ("permission_denied", False),
        ("already_exists", False),
    ],
)
def test_retryable_codes(code: str, retryable: bool) -> None:
    assert ControllerError(code, "m").retryable is retryable


@given(st.integers(min_value=100, max_value=599), st.binary(max_size=300))
def test_parse_connect_error_never_raises(status: int, body: bytes) -> None:
    err = parse_connect_error(status, body)
    assert err.code in CODES
    assert "\n" not in err.message


@given(st.integers(min_value=100, max_value=599), st.text(max_size=50), st.text(max_size=200))
def test_parse_connect_error_json(status: int, code: str, message: str) -> None:
    err = parse_connect_error(status, json.dumps({"code": code, "message": message}).encode())
    assert err.code == (code if code in CODES else parse_connect_error(status, b"").code)
