"""GuardedSite: the worker's HTTP Site, and what any connection may cost
before a handler runs.

- At most ``max_connections`` connections are open at once; one more is
  answered ``503`` and closed.
- Each request must be read within its deadline (``channel.GuardedChannel``);
  the site keeps the deadlines of the requests being read and sweeps them.
- All answers not yet sent (large answers go out a slice at a time as the peer
  reads: ``request.BoundedRequest``) count against ``max_unsent_bytes``: when a
  new one would pass it, the connections that have been holding unsent answers
  the longest are aborted. A client that asks for pages and never reads them
  costs the worker at most that much memory, not a page per connection.
- Request bodies are capped (``request.BoundedRequest``), and every answer
  carries the site's fixed headers (``channel.FixedHeaders``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.http import datetimeToString
from twisted.web.resource import IResource
from twisted.web.server import Site

from fluster_worker.common.http import quiet_channel
from fluster_worker.web.rpc.channel import DEFAULT_READ_TIMEOUT_S, FixedHeaders, GuardedChannel
from fluster_worker.web.rpc.request import DEFAULT_MAX_BODY_BYTES, BoundedRequest

DEFAULT_MAX_CONNECTIONS = 512
#: How long a keep-alive connection may stay idle between requests (Twisted's default).
DEFAULT_IDLE_TIMEOUT_S = 60.0
#: Answers not yet handed to the sockets, over all connections.
DEFAULT_MAX_UNSENT_BYTES = 256 * 2**20


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
    """A Site with a cap on open connections, a read deadline per request, a
    cap on unsent answers, and the headers every answer carries (its fixed
    headers, a Date made once a second); its connections do not log ``Timing
    out client`` when an idle keep-alive connection (a controller's, a polling
    client's) is closed."""

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
    fixed_headers: FixedHeaders | None = None
    _date_second = -1
    _date_line = b""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unsent: dict[BoundedRequest, None] = {}  # oldest first
        # The read deadlines of the requests being read, checked by one sweep
        # rather than a timer per request (set and cancelled for every call);
        # a channel takes itself off when its request is read.
        self.reading: dict[GuardedChannel, float] = {}
        self._sweep: IDelayedCall | None = None

    def date_line(self) -> bytes:
        """The ``Date`` header line of an answer written now (made once a second)."""
        now = int(self.reactor.seconds())
        if now != self._date_second:
            self._date_second = now
            self._date_line = b"Date: " + datetimeToString(now) + b"\r\n"
        return self._date_line

    # -- read deadlines -----------------------------------------------------------

    def read_started(self, channel: GuardedChannel, timeout_s: float) -> None:
        self.reading[channel] = self.reactor.seconds() + timeout_s
        if self._sweep is None:
            self._sweep = self.reactor.callLater(_sweep_interval(timeout_s), self._sweep_reads, timeout_s)

    def _sweep_reads(self, timeout_s: float) -> None:
        self._sweep = None
        now = self.reactor.seconds()
        for channel in [c for c, deadline in self.reading.items() if deadline <= now]:
            del self.reading[channel]
            channel.read_too_slow()
        if self.reading:
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
            channel.guard = self
            channel.fixed_headers = self.fixed_headers
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
    fixed_headers: Mapping[bytes, bytes] | None = None,
) -> GuardedSite:
    """A Site for ``resource`` whose request bodies are capped at ``max_body_bytes``,
    with at most ``max_connections`` connections (None: no cap), a read deadline
    of ``read_timeout_s`` per request (None: none), and ``fixed_headers`` on
    every answer."""

    class _Request(BoundedRequest):
        pass

    _Request.max_body_bytes = max_body_bytes
    site = GuardedSite(resource, requestFactory=_Request, timeout=idle_timeout_s)
    site.max_unsent_bytes = max_unsent_bytes
    site.fixed_headers = FixedHeaders(fixed_headers) if fixed_headers else None
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
