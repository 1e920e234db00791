"""Connect unary RPC on Klein: one generic layer for every service.

A service is a plain object whose methods are named as in the ``.proto``
(``RunJob``, ``HealthCheck``...), take the request message and return the
response message or a Deferred of one, and raise ``ConnectError`` to answer
with a Connect code. No method knows about HTTP.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from fluster_worker.common.threads import BlockingPool
from fluster_worker.web.rpc import codec
from fluster_worker.web.rpc.errors import Code, ConnectError
from fluster_worker.web.rpc.errors_pb2 import ErrorDetails
from fluster_worker.web.rpc.request import DEFAULT_MAX_BODY_BYTES

if TYPE_CHECKING:
    from fluster_worker.web.refusals import RefusalLog

# Request bodies whose (decompressed) size is above this are parsed off the
# reactor thread (a small gzip body can inflate to megabytes of JSON).
DEFAULT_INLINE_BODY_BYTES = 64 * 1024
# Responses whose serialized size (``ByteSize``, computed in C) is above this are
# encoded off the reactor thread: proto3 JSON of a big message takes long.
DEFAULT_INLINE_ANSWER_BYTES = 64 * 1024

CallObserver = Callable[[str, str, float], None]
"""Called once per RPC with (method, code or "ok", seconds)."""


class ConnectRouter:
    """Serves ``impl`` as the proto service ``descriptor`` under ``/<full name>/``."""

    log = Logger()

    def __init__(
        self,
        descriptor: ServiceDescriptor,
        impl: object,
        reactor: IReactorTime,
        *,
        pool: BlockingPool,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        observe: CallObserver | None = None,
        refusals: RefusalLog | None = None,
        inline_body_bytes: int = DEFAULT_INLINE_BODY_BYTES,
        inline_answer_bytes: int = DEFAULT_INLINE_ANSWER_BYTES,
    ) -> None:
        self._reactor = reactor
        self._inline_body = inline_body_bytes
        self._inline_answer = inline_answer_bytes
        self._refusals = refusals
        self._pool = pool
        self._impl = impl
        self._max_body_bytes = max_body_bytes
        self._observe = observe
        self.service_name = descriptor.full_name
        self._methods: dict[str, tuple[type[Message], type[Message]]] = {
            m.name: (GetMessageClass(m.input_type), GetMessageClass(m.output_type))
            for m in descriptor.methods
        }

    def mount(self, app: Klein) -> None:
        # One static rule per method: werkzeug finds a static path by lookup,
        # where a ``<method>`` converter costs a regex match per candidate rule
        # (about a tenth of a HealthCheck). Other names under the service reach
        # the converter rule and are answered unimplemented.
        for name in self._methods:
            app.route(f"/{self.service_name}/{name}", methods=["POST"], endpoint=f"rpc_{name}")(
                self._handler_of(name)
            )
        app.route(f"/{self.service_name}/<string:method>", methods=["POST"], endpoint="rpc_other")(self._handle)

    def _handler_of(self, method: str) -> Callable[[Request], bytes | Deferred[bytes]]:
        def handle(request: Request) -> bytes | Deferred[bytes]:
            return self._handle(request, method)

        handle.__name__ = f"rpc_{method}"
        return handle

    def _handle(self, request: Request, method: str) -> bytes | Deferred[bytes]:
        """A call answered synchronously when it can be (a small body parsed
        inline, a handler that answers at once, a small or cached answer: no
        Deferred on the way); through Deferreds otherwise."""
        call = _Call(request, method, time.monotonic())
        types = self._methods.get(method)
        content_type = codec.media_type(call.content_type)
        call.codec = content_type or codec.JSON
        if types is None:
            return self._failed(call, Failure(ConnectError(
                Code.UNIMPLEMENTED, f"unknown method {self.service_name}/{method[:80]}")))
        if content_type is None:
            return self._failed(call, Failure(_UnsupportedMediaType(
                "unsupported content type; use application/proto or application/json")))
        try:
            response = self._dispatch(call, types, content_type)
            # (Checked by what it is rather than by isinstance(Deferred): that
            # is an ABC check, on the path of every call.)
            if type(response) is types[1] or type(response) is Encoded:
                return self._ok(response, call)  # type: ignore[arg-type]
        except Exception:
            return self._failed(call, Failure())
        # An answer that fails to encode is an internal error like any other.
        pending: Deferred[Message | Encoded] = response  # type: ignore[assignment]
        answer: Deferred[bytes] = pending.addCallback(self._ok, call).addErrback(  # type: ignore[assignment]
            self._failed_later, call
        )
        return answer

    def _ok(self, response: Message | Encoded, call: _Call) -> bytes | Deferred[bytes]:
        if isinstance(response, Encoded):
            body = response.body(call.codec, self._pool)
        elif response.ByteSize() <= self._inline_answer:
            body = codec.encode(response, call.codec)
        else:
            # A big answer (many jobs, many log lines): encoded on the pool so
            # that the reactor keeps serving meanwhile.
            body = self._pool.run(codec.encode, response, call.codec)
        if type(body) is bytes:
            return self._answered(call, body)
        return body.addCallbacks(  # type: ignore[union-attr, no-any-return]
            lambda b: self._answered(call, b), lambda f: self._failed(call, f)
        )

    def _answered(self, call: _Call, body: bytes) -> bytes:
        request = call.request
        request.setHeader(b"content-type", codec.CONTENT_TYPES[call.codec])
        # A length, not chunks: one write for the whole answer, none after it.
        request.setHeader(b"content-length", b"%d" % len(body))
        self._done(call.method, "ok", call.started)
        return body

    def _failed_later(self, failure: Failure, call: _Call) -> bytes:
        return self._failed(call, failure)

    def _failed(self, call: _Call, failure: Failure) -> bytes:
        request, method = call.request, call.method
        code, message = self._classify(failure, method)
        request.setHeader(b"content-type", codec.JSON.encode())
        if code is None:  # wrong content type: HTTP 415, as Connect peers expect
            request.setResponseCode(415)
            request.setHeader(b"accept-post", b"application/proto, application/json")
            code = Code.INVALID_ARGUMENT
        else:
            request.setResponseCode(code.http_status)
        self._refused(request, method, code, message)
        self._done(method, code.wire_name, call.started)
        body = codec.error_body(code, message, _details(failure, message))
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    def _dispatch(
        self,
        call: _Call,
        types: tuple[type[Message], type[Message]],
        content_type: str,
    ) -> Message | Encoded | Deferred[Message | Encoded]:
        """The handler's answer, or a Deferred of it; raises what it refuses."""
        request, method = call.request, call.method
        if getattr(request, "body_too_large", False):
            raise ConnectError(Code.RESOURCE_EXHAUSTED, f"request body exceeds {self._max_body_bytes} bytes")
        version = call.protocol_version
        if version is not None and version.strip() != b"1":
            raise ConnectError(
                Code.INVALID_ARGUMENT,
                f"unsupported connect-protocol-version {version.decode('latin-1')[:20]!r}",
            )
        timeout = _timeout_seconds(call.timeout_ms.decode("latin-1")) if call.timeout_ms is not None else None
        encoding = call.encoding.decode("latin-1") if call.encoding is not None else None
        content = request.content
        request_type, response_type = types
        answer: Deferred[Message | Encoded]
        body = content.getvalue() if type(content) is io.BytesIO else None
        if body is not None and len(body) <= self._inline_body:
            # Parsed here only if it stays small once decompressed; a small
            # gzip body that inflates (up to the body limit) goes to the pool.
            small = codec.inflate_small(body, encoding, self._inline_body) if encoding is not None else body
            if small is not None:
                result = self._call(method, codec.decode(small, content_type, request_type))
                if type(result) is response_type:
                    return result  # type: ignore[no-any-return]
                if not isinstance(result, Deferred):
                    return _checked(result, method, response_type)
                answer = result.addCallback(_checked, method, response_type)
            else:
                parsed = self._pool.run(self._parse, body, encoding, content_type, request_type)
                answer = parsed.addCallback(self._call_later, method).addCallback(_checked, method, response_type)
        else:
            parsed = self._pool.run(self._read_and_parse, content, encoding, content_type, request_type)
            answer = parsed.addCallback(self._call_later, method).addCallback(_checked, method, response_type)
        if timeout is not None:
            answer.addTimeout(timeout, self._reactor)
        return answer

    def _parse(self, body: bytes, encoding: str | None, content_type: str, request_type: type[Message]) -> Message:
        return codec.decode(codec.decompress(body, encoding, self._max_body_bytes), content_type, request_type)

    def _read_and_parse(
        self, content: Any, encoding: str | None, content_type: str, request_type: type[Message]
    ) -> Message:
        return self._parse(content.read() if content is not None else b"", encoding, content_type, request_type)

    def _call(self, method: str, message: Message) -> Any:
        """The handler's answer (a message, an Encoded, or a Deferred of one)."""
        handler = getattr(self._impl, method, None)
        if handler is None:
            raise ConnectError(Code.UNIMPLEMENTED, f"{self.service_name}/{method} is not implemented")
        result = handler(message)
        if isinstance(result, CoroutineType):
            return Deferred.fromCoroutine(result)
        return result

    def _call_later(self, message: Message, method: str) -> Any:
        return self._call(method, message)

    def _classify(self, failure: Failure, method: str) -> tuple[Code | None, str]:
        if failure.check(_UnsupportedMediaType):
            return None, failure.getErrorMessage()
        if failure.check(ConnectError):
            e: ConnectError = failure.value  # type: ignore[assignment]
            return e.code, e.message
        if failure.check(TimeoutError):
            return Code.DEADLINE_EXCEEDED, "deadline from connect-timeout-ms exceeded"
        if failure.check(CancelledError):
            return Code.CANCELED, "request canceled"
        self.log.failure("RPC {method} failed", failure, method=method)
        return Code.INTERNAL, f"internal error: {type(failure.value).__name__}"

    def _refused(self, request: Request, method: str, code: Code, message: str) -> None:
        # Internal errors are already logged with their traceback (``_classify``); a
        # caller that went away was not refused.
        if self._refusals is not None and code not in (Code.INTERNAL, Code.CANCELED):
            self._refusals.refused(method, code.wire_name, message, peer_of(request))

    def _done(self, method: str, code: str, started: float) -> None:
        if self._observe is not None:
            self._observe(method, code, time.monotonic() - started)


def mount_unknown_services(app: Klein, refusals: RefusalLog | None = None) -> None:
    """Answer POSTs to any other ``/<service>/<method>`` as Connect does: unimplemented."""

    def unknown(request: Request, service: str, method: str) -> bytes:
        request.setResponseCode(Code.UNIMPLEMENTED.http_status)
        request.setHeader(b"content-type", codec.JSON.encode())
        message = f"unknown service {service[:80]}"
        if refusals is not None:
            refusals.refused(f"{service[:80]}/{method[:80]}", Code.UNIMPLEMENTED.wire_name, message, peer_of(request))
        return codec.error_body(Code.UNIMPLEMENTED, message)

    app.route("/<string:service>/<string:method>", methods=["POST"])(unknown)


class _UnsupportedMediaType(Exception):
    pass


def _checked(response: Any, method: str, response_type: type[Message]) -> Message | Encoded:
    """``response``, when it is (or encodes) the method's response type."""
    kind = response.message_type if isinstance(response, Encoded) else type(response)
    if kind is not response_type:
        raise TypeError(f"{method} returned {kind.__name__}, not {response_type.__name__}")
    return response  # type: ignore[no-any-return]


class _Call:
    """One RPC being answered, and the request headers the router reads (found
    in one pass over the headers rather than a lookup each)."""

    __slots__ = ("request", "method", "started", "codec", "content_type", "protocol_version", "timeout_ms", "encoding")

    def __init__(self, request: Request, method: str, started: float) -> None:
        self.request = request
        self.method = method
        self.started = started
        self.codec = codec.JSON
        self.content_type: bytes | None = None
        self.protocol_version: bytes | None = None
        self.timeout_ms: bytes | None = None
        self.encoding: bytes | None = None
        # Twisted gives the names in its canonical spelling (Http-Header-Case).
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name in _READ_HEADERS:
                setattr(self, _READ_HEADERS[name], values[-1])


#: The request headers a call reads, by Twisted's spelling of their names.
_READ_HEADERS = {
    b"Content-Type": "content_type",
    b"Connect-Protocol-Version": "protocol_version",
    b"Connect-Timeout-Ms": "timeout_ms",
    b"Content-Encoding": "encoding",
}


class Encoded:
    """An answer already serialized, for a method that keeps its answers' bytes
    (a job's status, encoded once per change): ``bodies(codec, pool)`` gives the body
    for ``codec.PROTO`` or ``codec.JSON``, as bytes or a Deferred of them (when
    it is encoded off the reactor, on the pool it is given: the router's CPU
    pool). ``message_type`` is what it encodes."""

    __slots__ = ("message_type", "body")

    def __init__(
        self, message_type: type[Message], bodies: Callable[[str, BlockingPool], bytes | Deferred[bytes]]
    ) -> None:
        self.message_type = message_type
        self.body = bodies


def peer_of(request: Request) -> str:
    """The caller's address as ``host:port`` ("" when unknown)."""
    try:
        address = request.getClientAddress()
    except Exception:
        return ""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return ""
    return f"{host}:{port}" if port is not None else str(host)


def _timeout_seconds(value: str | None) -> float | None:
    if value is None:
        return None
    # isdigit() alone takes "²" or Arabic-Indic digits, which int() refuses.
    if not value.isascii() or not value.isdigit() or len(value) > 10:
        raise ConnectError(Code.INVALID_ARGUMENT, f"invalid connect-timeout-ms {value[:20]!r}")
    return int(value) / 1000.0


def _details(failure: Failure, message: str) -> list[dict[str, str]]:
    """The ``fluster.rpc.ErrorDetails`` detail existing peers read. Tracebacks
    stay in the worker's log: they are never sent to a caller."""
    detail = ErrorDetails(
        exception_type=type(failure.value).__name__,
        message=message,
        timestamp_ms=int(time.time() * 1000),
    )
    return [{
        "type": "fluster.rpc.ErrorDetails",
        "value": base64.b64encode(detail.SerializeToString()).decode("ascii").rstrip("="),
    }]
