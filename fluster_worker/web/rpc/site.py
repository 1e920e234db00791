"""The worker's HTTP Site: what any connection may cost before a handler runs.

- A request body past ``max_body_bytes`` is dropped as it arrives and flagged
  (``BoundedRequest``); the RPC answers resource_exhausted.
- A request whose path (or Host) is not UTF-8 once unquoted answers a plain 400
  before any resource sees it (Klein would log a traceback for it).
- At most ``max_connections`` connections are open at once; one more is answered
  ``503`` and closed (``GuardedSite``).
- A request must be read whole, headers and body, within ``read_timeout_s`` of its
  first byte, or the connection is answered ``408`` and closed: a client that
  sends slowly (slowloris) holds a connection for that long at most. The clock
  runs only while a request is being read: a request being answered (a KillJob
  waiting out its grace) and an idle keep-alive connection (Twisted's own idle
  timeout, ``timeOut``) are not reads.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from fluster_worker.common.http import quiet_channel

DEFAULT_MAX_BODY_BYTES = 32 * 2**20
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_READ_TIMEOUT_S = 60.0
#: How long a keep-alive connection may stay idle between requests (Twisted's default).
DEFAULT_IDLE_TIMEOUT_S = 60.0


class BoundedRequest(Request):
    """A Request that discards body bytes past ``max_body_bytes``, and answers a
    path that is not UTF-8 with a plain 400.

    Twisted buffers a whole body before the resource sees it; an oversized one
    is instead dropped as it arrives and flagged, so a handler answers
    resource_exhausted without the worker ever holding it.
    """

    max_body_bytes = DEFAULT_MAX_BODY_BYTES
    body_too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_bytes:
            self.body_too_large = True
            self.content = io.BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:
            self.body_too_large = True
            if self.content is not None:
                self.content.close()
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        problem = undecodable(self)
        if problem is None:
            super().process()
            return
        self.site = self.channel.site  # type: ignore[attr-defined]
        body = f"{problem}\n".encode()
        self.setResponseCode(400)
        self.setHeader(b"content-type", b"text/plain; charset=utf-8")
        self.setHeader(b"x-content-type-options", b"nosniff")
        self.setHeader(b"content-length", b"%d" % len(body))
        if self.method != b"HEAD":
            self.write(body)
        self.finish()


def undecodable(request: Request) -> str | None:
    """Why the request's URL cannot be routed as text (None when it can)."""
    path = request.path.split(b"?", 1)[0]
    try:
        b"/".join(map(_unquote, path.split(b"/"))).decode("utf-8")
    except UnicodeDecodeError:
        return "request path is not UTF-8 once percent-decoded"
    try:
        request.getRequestHostname().decode("utf-8")
    except UnicodeDecodeError:
        return "Host header is not UTF-8"
    return None


def _unquote(segment: bytes) -> bytes:
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(segment)


class GuardedChannel(HTTPChannel):
    """An HTTPChannel that must read each request whole within ``read_timeout_s``
    of its first byte (see the module doc), and tells its site when it closes."""

    read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S
    _read_deadline: IDelayedCall | None = None
    _counted = False

    def dataReceived(self, data: bytes) -> None:
        # Bytes that arrive while a request is answered wait in Twisted's buffer
        # and come back through here once it is done: the clock starts then.
        if self._read_deadline is None and not self._handlingRequest and self.read_timeout_s:
            self._read_deadline = self.callLater(self.read_timeout_s, self._read_too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._stop_read_clock()
        super().allContentReceived()

    def _read_too_slow(self) -> None:
        self._read_deadline = None
        if self._handlingRequest or self.transport is None:
            return
        body = b"request not received in time\n"
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        # Closes, and aborts the connection if the peer does not let go (abortTimeout).
        self.timeoutConnection()

    def _stop_read_clock(self) -> None:
        if self._read_deadline is not None:
            if self._read_deadline.active():
                self._read_deadline.cancel()
            self._read_deadline = None

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._stop_read_clock()
        site = getattr(self, "site", None)
        if self._counted and isinstance(site, GuardedSite):
            self._counted = False
            site.connection_closed()
        super().connectionLost(reason)


class _Overloaded(Protocol):
    """Answers a connection past the cap with a 503 and closes it."""

    def connectionMade(self) -> None:
        body = b"too many connections; try again later\n"
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.transport.loseConnection()


class GuardedSite(Site):
    """A Site with a cap on open connections and a read deadline per request;
    its connections do not log ``Timing out client`` when an idle keep-alive
    connection (a controller's, a polling client's) is closed."""

    _logger = Logger()
    protocol = GuardedChannel  # type: ignore[assignment]
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS
    read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S
    open_connections = 0
    refused_connections = 0  # since start
    _overloaded = False

    def buildProtocol(self, addr: Any) -> Any:
        if self.max_connections and self.open_connections >= self.max_connections:
            self.refused_connections += 1
            if not self._overloaded:
                self._overloaded = True
                self._logger.warn(
                    "{count} connections open: new connections are refused (503) until some close",
                    count=self.open_connections,
                )
            overflow = _Overloaded()
            overflow.factory = self  # type: ignore[assignment]
            return overflow
        channel = super().buildProtocol(addr)
        if isinstance(channel, GuardedChannel):
            channel.read_timeout_s = self.read_timeout_s
            channel._counted = True
            self.open_connections += 1
        return quiet_channel(channel)

    def connection_closed(self) -> None:
        self.open_connections -= 1
        if self._overloaded and self.max_connections and self.open_connections < self.max_connections:
            self._overloaded = False
            self._logger.info(
                "connections below the cap again; {refused} refused so far", refused=self.refused_connections
            )


def bounded_site(
    resource: IResource,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
    read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S,
    idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
) -> GuardedSite:
    """A Site for ``resource`` whose request bodies are capped at ``max_body_bytes``,
    with at most ``max_connections`` connections (None: no cap) and a read deadline
    of ``read_timeout_s`` per request (None: none)."""

    class _Request(BoundedRequest):
        pass

    _Request.max_body_bytes = max_body_bytes

    def factory(*args: Any, **kwargs: Any) -> Request:
        return _Request(*args, **kwargs)

    site = GuardedSite(resource, requestFactory=factory, timeout=idle_timeout_s)
    limit_connections(site, max_connections, read_timeout_s)
    # Twisted prints every request to the log by default; the RPC layer logs what matters.
    site.noisy = False
    return site


def limit_connections(site: Site, max_connections: int | None, read_timeout_s: float | None) -> None:
    """Set the connection cap and the read deadline of a GuardedSite (the options
    reach the site where the listener is made)."""
    if isinstance(site, GuardedSite):
        site.max_connections = max_connections or None
        site.read_timeout_s = read_timeout_s or None
