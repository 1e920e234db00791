"""Test doubles for the Controller side (``fluster_worker.controller``).

- `FakeController`: a Klein app serving ControllerService over Connect (binary proto
  or JSON requests, Connect JSON errors). It records every call with its arrival
  time, can reject registrations or fail every call, and can listen on
  127.0.0.1:<port>, stop (closing open connections) and listen again on the same
  port, for outage tests on the real reactor. In memory, use `stub_client`.
- `ScriptedControllerClient`: a ControllerCaller whose calls stay pending until the
  test answers them; with ``task.IReactorTime`` this pins down retry timing exactly.
- `InlinePool`: a BlockingRunner that runs the function at once, on the caller's
  thread (unit tests only).
- `poll_until`: wait for a condition with a deadline, on a clock.

The Connect handling here is deliberately small and independent of the worker's
own Connect server layer.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from fluster_worker.controller.client import SERVICE, ControllerClient
from fluster_worker.web.rpc import cluster_pb2 as pb

T = TypeVar("T")
M = TypeVar("M", bound=Message)

_METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    "RegisterWorker": (pb.RegisterWorkerRequest, pb.RegisterWorkerResponse),
    "ReportJobState": (pb.ReportJobStateRequest, pb.ReportJobStateResponse),
}


@dataclass(frozen=True)
class RecordedCall(Generic[M]):
    method: str
    request: M
    at: float  # the fake's clock (reactor.seconds()) when the call arrived
    content_type: str


class _ConnectFailure(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class FakeController:
    """ControllerService over Connect. Knobs (plain attributes, change any time):

    - ``accept_registrations``: RegisterWorkerResponse.accepted (see `reject`).
    - ``fail_status``/``fail_code``: when set, every call answers that HTTP status
      with a Connect error (see `fail`, `recover`).
    - ``report_error``: (status, code) for ReportJobState only, e.g. (501,
      "unimplemented") for a controller that predates it.
    - ``controller_address``: echoed in RegisterWorkerResponse.
    """

    app = Klein()

    def __init__(self, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor: Any = reactor
        self.calls: list[RecordedCall[Message]] = []
        self.accept_registrations = True
        self.fail_status: int | None = None
        self.fail_code = "unavailable"
        self.report_error: tuple[int, str] | None = None
        self.controller_address = ""
        self.port: int | None = None
        #: TCP connections accepted so far (a persistent client reuses one).
        self.connections = 0
        self._listener: Any = None
        self._connections: WrappingFactory | None = None

    # -- knobs ------------------------------------------------------------------

    def reject(self) -> None:
        self.accept_registrations = False

    def accept(self) -> None:
        self.accept_registrations = True

    def fail(self, status: int = 503, code: str = "unavailable") -> None:
        self.fail_status, self.fail_code = status, code

    def recover(self) -> None:
        self.fail_status = None

    # -- what arrived ---------------------------------------------------------------

    @property
    def register_calls(self) -> list[RecordedCall[pb.RegisterWorkerRequest]]:
        return [cast(Any, c) for c in self.calls if c.method == "RegisterWorker"]

    @property
    def report_calls(self) -> list[RecordedCall[pb.ReportJobStateRequest]]:
        return [cast(Any, c) for c in self.calls if c.method == "ReportJobState"]

    @property
    def reports(self) -> list[pb.ReportJobStateRequest]:
        return [c.request for c in self.report_calls]

    # -- serving ----------------------------------------------------------------------

    def resource(self) -> IResource:
        return cast(IResource, self.app.resource())

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the fake controller was never started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def listening(self) -> bool:
        return self._listener is not None

    async def start(self, port: int | None = None, interface: str = "127.0.0.1") -> int:
        """Listen on ``interface``: ``port``, else the previous port (a restart), else a
        free one. Returns the port. (Containers reach the host only on an address
        other than loopback: tests whose jobs call the controller pass "0.0.0.0".)"""
        if self._listener is not None:
            raise RuntimeError("the fake controller is already listening")
        if port is None:
            port = self.port or 0
        site = Site(self.resource())
        site.noisy = False
        self._connections = _CountingFactory(site, self)
        self._connections.noisy = False
        self._listener = self.reactor.listenTCP(port, self._connections, interface=interface)
        self.port = self._listener.getHost().port
        return cast(int, self.port)

    async def stop(self) -> None:
        """Stop listening and cut every open connection (so the next call of a
        client sees the outage, not a kept-alive connection)."""
        listener, connections = self._listener, self._connections
        self._listener = self._connections = None
        if listener is None or connections is None:
            return
        await maybeDeferred(listener.stopListening)
        for protocol in list(connections.protocols):
            protocol.transport.abortConnection()
        await poll_until(
            lambda: not connections.protocols,
            self.reactor,
            timeout_s=10,
            what="fake controller connections to close",
        )

    @app.route(f"/{SERVICE}/<string:method>", methods=["POST"])
    def _handle(self, request: Request, method: str) -> bytes:
        content_type = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
        json_codec = content_type == "application/json"
        try:
            if content_type not in ("application/proto", "application/json"):
                raise _ConnectFailure(415, "invalid_argument", f"bad content type {content_type!r}")
            if method not in _METHODS:
                raise _ConnectFailure(501, "unimplemented", f"{SERVICE}/{method} is not implemented")
            request_type, response_type = _METHODS[method]
            body = _decode_body(request)
            try:
                message = request_type()
                if json_codec:
                    json_format.Parse(body.decode("utf-8"), message, ignore_unknown_fields=True)
                else:
                    message.ParseFromString(body)
            except (DecodeError, json_format.ParseError, UnicodeDecodeError) as e:
                raise _ConnectFailure(400, "invalid_argument", f"bad {method} request: {e}") from e
            self.calls.append(RecordedCall(method, message, self.reactor.seconds(), content_type))
            if self.fail_status is not None:
                raise _ConnectFailure(self.fail_status, self.fail_code, "controller is failing")
            if method == "ReportJobState" and self.report_error is not None:
                status, code = self.report_error
                raise _ConnectFailure(status, code, f"{method} refused by the fake controller")
            response = response_type()
            if isinstance(response, pb.RegisterWorkerResponse):
                response.accepted = self.accept_registrations
                response.controller_address = self.controller_address
        except _ConnectFailure as failure:
            request.setResponseCode(failure.status)
            request.setHeader("content-type", "application/json")
            return json.dumps({"code": failure.code, "message": failure.message}).encode()
        request.setResponseCode(200)
        request.setHeader("content-type", content_type)
        if json_codec:
            return json_format.MessageToJson(response, indent=None).encode()
        return response.SerializeToString()


class _CountingFactory(WrappingFactory):
    def __init__(self, site: Site, fake: FakeController) -> None:
        super().__init__(site)
        self._fake = fake

    def registerProtocol(self, p: Any) -> None:
        self._fake.connections += 1
        super().registerProtocol(p)


def _decode_body(request: Request) -> bytes:
    body = request.content.read() if request.content is not None else b""
    encoding = (request.getHeader("content-encoding") or "identity").strip().lower()
    if encoding == "gzip":
        try:
            return gzip.decompress(body)
        except (OSError, EOFError) as e:
            raise _ConnectFailure(400, "invalid_argument", f"bad gzip body: {e}") from e
    if encoding != "identity":
        raise _ConnectFailure(501, "unimplemented", f"unsupported content encoding {encoding!r}")
    return body


def stub_client(
    fake: FakeController, clock: IReactorTime, *, timeout_s: float = 10.0
) -> tuple[ControllerClient, StubTreq]:
    """A real ControllerClient calling ``fake`` in memory (treq's StubTreq); time
    outs run on ``clock``. Call ``stub.flush()`` when a handler waits."""
    stub = StubTreq(fake.resource())
    return ControllerClient("http://controller.test:8080", cast(Any, stub), clock, timeout_s=timeout_s), stub


@dataclass
class ScriptedCall:
    method: str
    request: Message
    response_type: type[Message]
    deferred: Deferred[Any]
    cancelled: bool = False

    @property
    def answered(self) -> bool:
        return self.deferred.called

    def succeed(self, response: Message | None = None) -> None:
        self.deferred.callback(response if response is not None else self.response_type())

    def fail(self, error: BaseException) -> None:
        self.deferred.errback(error)


@dataclass
class ScriptedControllerClient:
    """Every call is recorded and stays pending until the test answers it — or
    ``autorespond`` (when set) answers it as soon as it is made."""

    url: str = "http://controller.test:8080"
    calls: list[ScriptedCall] = field(default_factory=list)
    autorespond: Callable[[ScriptedCall], None] | None = None

    @property
    def base_url(self) -> str:
        return self.url

    def call(self, method: str, request: Message, response_type: type[M]) -> Deferred[M]:
        copy = type(request)()
        copy.CopyFrom(request)
        scripted: ScriptedCall

        def cancel(_: Deferred[Any]) -> None:
            scripted.cancelled = True

        d: Deferred[Any] = Deferred(cancel)
        scripted = ScriptedCall(method, copy, response_type, d)
        self.calls.append(scripted)
        if self.autorespond is not None:
            self.autorespond(scripted)
        return d

    @property
    def pending(self) -> list[ScriptedCall]:
        return [c for c in self.calls if not c.answered]

    def last(self) -> ScriptedCall:
        return self.calls[-1]


class InlinePool:
    """A BlockingRunner that runs on the calling thread, for unit tests."""

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        return maybeDeferred(f, *args, **kwargs)


async def poll_until(
    predicate: Callable[[], bool],
    clock: Any,
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.01,
    what: str = "a condition",
) -> None:
    """Poll ``predicate`` every ``interval_s`` on ``clock`` (the real reactor) until
    it is true; AssertionError after ``timeout_s``."""
    deadline = clock.seconds() + timeout_s
    while not predicate():
        if clock.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await deferLater(clock, interval_s, lambda: None)


def connect_error_body(code: str, message: str, details: list[dict[str, str]] | None = None) -> bytes:
    """A Connect JSON error body (for tests of error parsing)."""
    doc: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        doc["details"] = details
    return json.dumps(doc).encode()


def error_detail(payload: bytes, type_name: str = "fluster.rpc.ErrorDetails") -> dict[str, str]:
    return {"type": type_name, "value": base64.b64encode(payload).decode("ascii")}
