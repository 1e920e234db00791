"""Unary Connect calls to the Controller (fluster.cluster.ControllerService) over treq.

``ControllerClient.call`` POSTs a binary protobuf and returns a Deferred that fires
with the parsed response, or fails with `ControllerError` (the controller answered
with an error) or `ControllerUnavailable` (no answer: refused, reset, timed out).
Every answer byte is untrusted: bodies are size-bounded and error bodies that are
not Connect JSON fall back to a code derived from the HTTP status.
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol, TypeVar, cast

from google.protobuf.message import DecodeError, Message
from treq.client import HTTPClient
from treq.content import collect
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IResponse

from fluster_worker.common.http import quiet_http_client
from fluster_worker.common.text import one_line
from fluster_worker.controller.address import normalize_controller_url

SERVICE = "fluster.cluster.ControllerService"

DEFAULT_TIMEOUT_S = 10.0
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_ERROR_MESSAGE_CHARS = 500

M = TypeVar("M", bound=Message)

# Connect codes (wire contract section 1).
CODES = frozenset(
    {
        "canceled",
        "unknown",
        "invalid_argument",
        "deadline_exceeded",
        "not_found",
        "already_exists",
        "permission_denied",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unimplemented",
        "internal",
        "unavailable",
        "data_loss",
        "unauthenticated",
    }
)

# Codes after which the same request may succeed later. The others say the request
# itself will never be taken by this controller (malformed, unknown method — an older
# controller —, refused by policy), so retrying only piles requests up.
RETRYABLE_CODES = frozenset(
    {
        "canceled",
        "unknown",
        "deadline_exceeded",
        "resource_exhausted",
        "aborted",
        "internal",
        "unavailable",
        "data_loss",
    }
)

# The code of a non-200 answer whose body is not a Connect error (a proxy page, a
# server that does not speak Connect). Based on the Connect spec's HTTP-to-code table,
# but 4xx statuses that mean "this request will never work here" map to
# non-retryable codes: 404/405/501 mean the method does not exist (an older
# controller), 400/415 that the request is not understood.
_STATUS_CODES = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "unimplemented",
    405: "unimplemented",
    408: "deadline_exceeded",
    409: "aborted",
    412: "failed_precondition",
    415: "invalid_argument",
    429: "unavailable",
    499: "canceled",
    501: "unimplemented",
    502: "unavailable",
    503: "unavailable",
    504: "unavailable",
}

_METHOD = re.compile(r"[A-Z][A-Za-z0-9]{0,63}")


class ControllerError(Exception):
    """The controller answered a call with a Connect error (or an unusable answer)."""

    def __init__(self, code: str, message: str, http_status: int | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.http_status = http_status

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_CODES

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code


class ControllerUnavailable(ControllerError):
    """No answer from the controller: connection refused or lost, DNS failure, or
    the call's timeout. Always retryable. ``code`` is "deadline_exceeded" for a
    timeout and "unavailable" otherwise."""

    def __init__(self, message: str, code: str = "unavailable") -> None:
        super().__init__(code, message, None)

    @property
    def retryable(self) -> bool:
        return True


class ControllerCaller(Protocol):
    """What Registration and ReportQueue need; ControllerClient and the test doubles
    in ``fluster_worker.testing.controller`` provide it."""

    @property
    def base_url(self) -> str: ...

    def call(self, method: str, request: Message, response_type: type[M]) -> Deferred[M]: ...


class HTTPPoster(Protocol):
    """The part of ``treq.client.HTTPClient`` (and ``treq.testing.StubTreq``) we use."""

    def post(
        self,
        url: str,
        /,
        *,
        data: bytes,
        headers: Any,
        unbuffered: bool,
        allow_redirects: bool,
    ) -> Deferred[Any]: ...


def make_http_client(reactor: Any) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client with its own persistent, quiet connection pool (no log line
    per connection: ``common.http``). Idle connections are closed after 4 s, below
    the usual 5 s server keep-alive, so a heartbeat rarely races a server closing
    an idle connection."""
    return quiet_http_client(reactor, max_per_host=2, idle_timeout_s=4)


class _TooLarge(Exception):
    pass


def _cancelled(exc: BaseException) -> bool:
    """twisted.web reports a cancelled request as ResponseNeverReceived etc. wrapping
    a CancelledError: that is a cancellation (ours or a timeout), not an outage."""
    reasons = getattr(exc, "reasons", None)
    return isinstance(reasons, list) and any(
        isinstance(r, Failure) and r.check(CancelledError) for r in reasons
    )


def _describe(exc: BaseException) -> str:
    """One line for a transport failure; treq/twisted.web wrap the real reasons."""
    reasons = getattr(exc, "reasons", None)
    if isinstance(reasons, list) and reasons:
        inner = "; ".join(r.getErrorMessage() if isinstance(r, Failure) else str(r) for r in reasons)
        return one_line(f"{type(exc).__name__}: {inner}", MAX_ERROR_MESSAGE_CHARS)
    text = str(exc)
    return one_line(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, MAX_ERROR_MESSAGE_CHARS)


def parse_connect_error(status: int, body: bytes) -> ControllerError:
    """The error of a non-200 answer: the Connect JSON error when the body is one,
    else a code from the HTTP status ("unknown" when nothing fits)."""
    fallback = _STATUS_CODES.get(status, "unknown")
    code, message = fallback, f"HTTP {status}"
    try:
        doc = json.loads(body.decode("utf-8")) if body else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict):
        raw_code = doc.get("code")
        if isinstance(raw_code, str) and raw_code in CODES:
            code = raw_code
        raw_message = doc.get("message")
        if isinstance(raw_message, str) and raw_message.strip():
            message = raw_message
    return ControllerError(code, one_line(message, MAX_ERROR_MESSAGE_CHARS), status)


class ControllerClient:
    """Unary Connect calls to ``<base_url>/fluster.cluster.ControllerService/<Method>``.

    ``http`` is a treq ``HTTPClient`` (``make_http_client``) or ``StubTreq`` in
    tests; ``clock`` times out whole calls (connect, send, answer, body) after
    ``timeout_s``. ``connection_pool``, when given, is closed by `close`.
    """

    def __init__(
        self,
        controller_address: str,
        http: HTTPPoster,
        clock: IReactorTime,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        connection_pool: HTTPConnectionPool | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("controller call timeout must be > 0")
        self._base_url = normalize_controller_url(controller_address)
        self._http = http
        self._clock = clock
        self._timeout_s = timeout_s
        self._max_bytes = max_response_bytes
        self._pool = connection_pool

    @classmethod
    def create(
        cls, controller_address: str, reactor: Any, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> ControllerClient:
        """The production client: treq over a persistent pool on ``reactor``."""
        http, pool = make_http_client(reactor)
        return cls(controller_address, http, reactor, timeout_s=timeout_s, connection_pool=pool)

    @property
    def base_url(self) -> str:
        return self._base_url

    def close(self) -> Deferred[None]:
        """Close idle pooled connections (call from the owner's stopService)."""
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()

    def call(self, method: str, request: Message, response_type: type[M]) -> Deferred[M]:
        if not _METHOD.fullmatch(method):
            raise ValueError(f"bad Connect method name {method!r}")
        d = Deferred.fromCoroutine(self._call(method, request, response_type))
        d.addTimeout(self._timeout_s, cast(Any, self._clock))
        d.addErrback(self._timed_out, method)
        return d

    def _timed_out(self, failure: Failure, method: str) -> Failure:
        if failure.check(TimeoutError):
            raise ControllerUnavailable(
                f"{method} got no answer within {self._timeout_s:g} s", "deadline_exceeded"
            )
        return failure

    async def _call(self, method: str, request: Message, response_type: type[M]) -> M:
        url = f"{self._base_url}/{SERVICE}/{method}"
        headers = {
            b"Content-Type": [b"application/proto"],
            b"Connect-Protocol-Version": [b"1"],
            b"Connect-Timeout-Ms": [str(int(self._timeout_s * 1000)).encode("ascii")],
            b"User-Agent": [b"fluster-worker"],
        }
        try:
            response: IResponse = await self._http.post(
                url,
                data=request.SerializeToString(),
                headers=headers,
                unbuffered=True,
                allow_redirects=False,
            )
            status = response.code
            body = await self._read(response, status)
        except (CancelledError, ControllerError):
            raise
        except Exception as e:
            if _cancelled(e):
                raise CancelledError() from e
            raise ControllerUnavailable(f"{method} to {self._base_url}: {_describe(e)}") from e
        if status != 200:
            raise parse_connect_error(status, body)
        content_type = _content_type(response)
        if content_type not in ("", "application/proto"):
            raise ControllerError("internal", f"{method} answered with content type {content_type!r}", status)
        message = response_type()
        try:
            message.ParseFromString(body)
        except DecodeError as e:
            raise ControllerError(
                "internal", f"{method} answer is not a {response_type.__name__}: {e}", status
            ) from e
        return message

    async def _read(self, response: IResponse, status: int) -> bytes:
        chunks: list[bytes] = []
        size = 0

        def collector(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > self._max_bytes:
                raise _TooLarge()
            chunks.append(data)

        try:
            await collect(response, collector)
        except _TooLarge:
            if status == 200:
                raise ControllerError("internal", f"answer exceeds {self._max_bytes} bytes", status) from None
            return b""  # an oversized error body is garbage: fall back to the status
        return b"".join(chunks)


def _content_type(response: IResponse) -> str:
    values = response.headers.getRawHeaders(b"content-type") or [b""]
    return values[0].split(b";")[0].strip().lower().decode("latin-1")
