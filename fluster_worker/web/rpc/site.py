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
- A large answer (a FetchLogs page of up to 16 MiB) is handed to the socket a
  slice at a time as the peer reads it, and all answers not yet sent count
  against ``max_unsent_bytes``: when a new one would pass it, the connections
  that have been holding unsent answers the longest are aborted. A client that
  asks for pages and never reads them costs the worker at most that much
  memory, not a page per connection.
"""

from __future__ import annotations

import io
from collections import deque
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from fluster_worker.common.http import quiet_channel

DEFAULT_MAX_BODY_BYTES = 32 * 2**20
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_READ_TIMEOUT_S = 60.0
#: How long a keep-alive connection may stay idle between requests (Twisted's default).
DEFAULT_IDLE_TIMEOUT_S = 60.0
#: Answers not yet handed to the sockets, over all connections.
DEFAULT_MAX_UNSENT_BYTES = 256 * 2**20
#: A write at least this large goes out a slice at a time (_Unsent).
LARGE_WRITE = 256 * 1024
SLICE = 64 * 1024


class _Unsent:
    """The unsent part of one request's answer: a push producer (registered on
    the request) that the channel pauses while the socket's buffer is full."""

    def __init__(self, request: BoundedRequest) -> None:
        self.request = request
        self.chunks: deque[bytes] = deque()
        self.offset = 0  # into chunks[0]
        self.size = 0  # bytes left to send
        self.paused = False

    def add(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)

    def take(self) -> bytes:
        head = self.chunks[0]
        piece = head[self.offset : self.offset + SLICE]
        self.offset += len(piece)
        if self.offset >= len(head):
            self.chunks.popleft()
            self.offset = 0
        self.size -= len(piece)
        return piece

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.request._pump()

    def stopProducing(self) -> None:
        self.paused = True


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
    _unsent: _Unsent | None = None
    _guarded: GuardedSite | None = None  # the site counting this request's unsent bytes
    _finish_when_sent = False

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

    # -- large answers, a slice at a time (see the module doc) ---------------------------

    def write(self, data: bytes) -> None:
        site = getattr(self.channel, "site", None)
        if self._unsent is None and (
            len(data) < LARGE_WRITE
            or not isinstance(site, GuardedSite)
            or self.method == b"HEAD"
            or self.code in NO_BODY_CODES
            or self.finished
            or self._disconnected
        ):
            super().write(data)
            return
        if self._unsent is None:
            assert isinstance(site, GuardedSite)
            self._guarded = site
            self._unsent = _Unsent(self)
            self.registerProducer(self._unsent, True)
            if getattr(self.channel, "_waitingForTransport", False):
                self._unsent.paused = True
            site.unsent_started(self)
        self._unsent.add(data)
        assert self._guarded is not None
        self._guarded.unsent_added(self, len(data))
        self._pump()

    def _pump(self) -> None:
        unsent, site = self._unsent, self._guarded
        if unsent is None or site is None:
            return
        while unsent is self._unsent and not unsent.paused and unsent.size:
            piece = unsent.take()
            site.unsent_sent(len(piece))
            super().write(piece)  # the channel may pause us right here
        if unsent is self._unsent and not unsent.size:
            self._unsent = None
            self.unregisterProducer()
            site.unsent_done(self)
            if self._finish_when_sent:
                super().finish()

    def finish(self) -> None:
        if self._unsent is not None:
            self._finish_when_sent = True
            return
        super().finish()

    def drop_unsent(self) -> int:
        """Forget the unsent answer (its connection is going); the bytes it held."""
        unsent, self._unsent = self._unsent, None
        if unsent is None:
            return 0
        unsent.paused = True
        size = unsent.size
        unsent.chunks.clear()
        unsent.size = 0
        return size

    def connectionLost(self, reason: Failure) -> None:
        size = self.drop_unsent()
        if self._guarded is not None:
            self._guarded.unsent_forgotten(self, size)
        super().connectionLost(reason)

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
    path = request.path  # the query is not in it
    # The usual path is plain ASCII with nothing escaped: nothing to decode.
    if b"%" in path or not path.isascii():
        try:
            unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            return "request path is not UTF-8 once percent-decoded"
    host = request.getHeader(b"host")
    if host is not None and not host.isascii():
        try:
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            return "Host header is not UTF-8"
    return None


class GuardedChannel(HTTPChannel):
    """An HTTPChannel that must read each request whole within ``read_timeout_s``
    of its first byte (see the module doc), and tells its site when it closes."""

    read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S
    _reading = False  # a request is being read: its deadline is on the site's list
    _counted = False

    def dataReceived(self, data: bytes) -> None:
        # Bytes that arrive while a request is answered wait in Twisted's buffer
        # and come back through here once it is done: the clock starts then.
        if not self._reading and not self._handlingRequest and self.read_timeout_s:
            site = getattr(self, "site", None)
            if isinstance(site, GuardedSite):
                self._reading = True
                site.read_started(self, self.read_timeout_s)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._stop_read_clock()
        super().allContentReceived()

    def read_too_slow(self) -> None:
        """The site's sweep found this request's read past its deadline."""
        self._reading = False
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
        if self._reading:
            self._reading = False
            site = getattr(self, "site", None)
            if isinstance(site, GuardedSite):
                site.read_stopped(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._stop_read_clock()
        site = getattr(self, "site", None)
        if self._counted and isinstance(site, GuardedSite):
            self._counted = False
            site.connection_closed()
        super().connectionLost(reason)


def _sweep_interval(timeout_s: float) -> float:
    """How often the read deadlines are checked: a request read too slowly is
    answered 408 at most a quarter of its deadline (and 1 s) late."""
    return max(0.01, min(1.0, timeout_s / 4))


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
    max_unsent_bytes: int | None = DEFAULT_MAX_UNSENT_BYTES
    unsent_bytes = 0  # answers not yet handed to the sockets
    evicted_connections = 0  # since start: aborted for holding unsent answers too long

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unsent: dict[BoundedRequest, None] = {}  # oldest first
        # The read deadlines of the requests being read, checked by one sweep
        # rather than a timer per request (set and cancelled for every call).
        self._reading: dict[GuardedChannel, float] = {}
        self._sweep: IDelayedCall | None = None

    # -- read deadlines -----------------------------------------------------------

    def read_started(self, channel: GuardedChannel, timeout_s: float) -> None:
        self._reading[channel] = self.reactor.seconds() + timeout_s
        if self._sweep is None:
            self._sweep = self.reactor.callLater(_sweep_interval(timeout_s), self._sweep_reads, timeout_s)

    def read_stopped(self, channel: GuardedChannel) -> None:
        self._reading.pop(channel, None)

    def _sweep_reads(self, timeout_s: float) -> None:
        self._sweep = None
        now = self.reactor.seconds()
        for channel in [c for c, deadline in self._reading.items() if deadline <= now]:
            del self._reading[channel]
            channel.read_too_slow()
        if self._reading:
            self._sweep = self.reactor.callLater(_sweep_interval(timeout_s), self._sweep_reads, timeout_s)

    def stopFactory(self) -> None:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        super().stopFactory()

    def unsent_started(self, request: BoundedRequest) -> None:
        self._unsent[request] = None

    def unsent_added(self, request: BoundedRequest, size: int) -> None:
        self.unsent_bytes += size
        # The connections that held their answers longest go first.
        while self.max_unsent_bytes and self.unsent_bytes > self.max_unsent_bytes:
            oldest = next((r for r in self._unsent if r is not request), None)
            if oldest is None:
                break
            self._evict(oldest)

    def unsent_sent(self, size: int) -> None:
        self.unsent_bytes -= size

    def unsent_done(self, request: BoundedRequest) -> None:
        self._unsent.pop(request, None)

    def unsent_forgotten(self, request: BoundedRequest, size: int) -> None:
        self._unsent.pop(request, None)
        self.unsent_bytes -= size

    def _evict(self, request: BoundedRequest) -> None:
        self._unsent.pop(request, None)
        channel = request.channel
        size = request.drop_unsent()
        self.unsent_bytes -= size
        self.evicted_connections += 1
        if self.evicted_connections == 1 or self.evicted_connections % 100 == 0:
            self._logger.warn(
                "aborted a connection holding {size} bytes of answer it did not read "
                "({count} so far): answers waiting for slow readers are capped at {cap} bytes",
                size=size,
                count=self.evicted_connections,
                cap=self.max_unsent_bytes,
            )
        transport = getattr(channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

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
    max_unsent_bytes: int | None = DEFAULT_MAX_UNSENT_BYTES,
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
    site.max_unsent_bytes = max_unsent_bytes
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
