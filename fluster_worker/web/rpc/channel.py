"""GuardedChannel: one connection of the worker's site.

- A request must be read whole, headers and body, within ``read_timeout_s`` of
  its first byte, or the connection is answered ``408`` and closed: a client
  that sends slowly (slowloris) holds a connection for that long at most. The
  clock runs only while a request is being read (not while it is answered, not
  while the connection idles between requests: Twisted's ``timeOut`` is for
  that). The deadlines are kept and swept by the site (``site.GuardedSite``),
  not a timer per request.
- Every answer carries the site's fixed headers (``FixedHeaders``: the security
  headers), encoded once rather than set on each request, and a ``Date`` made
  once a second by the site (``request.BoundedRequest`` sets neither); a header
  an answer sets itself wins over the fixed one of the same name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

DEFAULT_READ_TIMEOUT_S = 60.0
_NO_LINES: dict[bytes, bytes] = {}


class ChannelGuard(Protocol):
    """What a channel asks of its site (``site.GuardedSite``)."""

    #: The requests being read and their deadlines: a channel takes itself off.
    reading: dict[GuardedChannel, float]

    def read_started(self, channel: GuardedChannel, timeout_s: float) -> None: ...
    def date_line(self) -> bytes: ...
    def connection_closed(self) -> None: ...


class FixedHeaders:
    """Headers every answer of a site carries, checked and encoded once."""

    def __init__(self, headers: Mapping[bytes, bytes]) -> None:
        checked = Headers()  # Twisted's checks, and its spelling of the names
        for name, value in headers.items():
            checked.setRawHeaders(name, [value])
        self.lines: dict[bytes, bytes] = {
            name: b"".join(name + b": " + value + b"\r\n" for value in values)
            for name, values in checked.getAllRawHeaders()
        }
        self._end = b"".join(self.lines.values()) + b"\r\n"

    def end(self, own: set[bytes] | None) -> bytes:
        """The fixed lines and the blank line that ends the headers, without the
        lines of the names in ``own`` (set by the answer itself)."""
        if not own:
            return self._end
        return b"".join(line for name, line in self.lines.items() if name not in own) + b"\r\n"


class GuardedChannel(HTTPChannel):
    """An HTTPChannel with a read deadline per request and fixed headers on
    every answer (see the module doc); tells its site when it closes."""

    guard: ChannelGuard | None = None  # its site, set when the site builds it
    fixed_headers: FixedHeaders | None = None
    read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S
    _reading = False  # a request is being read: its deadline is on the site's list
    _counted = False

    def dataReceived(self, data: bytes) -> None:
        # Bytes that arrive while a request is answered wait in Twisted's buffer
        # and come back through here once it is done: the clock starts then.
        if not self._reading and not self._handlingRequest and self.read_timeout_s and self.guard is not None:
            self._reading = True
            self.guard.read_started(self, self.read_timeout_s)
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

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        guard = self.guard
        if guard is None or not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        fixed = self.fixed_headers
        names = fixed.lines if fixed is not None else _NO_LINES
        own: set[bytes] | None = None
        sequence = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            if name in names or name == b"Date":
                own = own or set()
                own.add(name)
            for value in values:
                sequence.extend((name, b": ", value, b"\r\n"))
        if own is None or b"Date" not in own:
            sequence.append(guard.date_line())
        sequence.append(fixed.end(own) if fixed is not None else b"\r\n")
        assert self.transport is not None
        self.transport.writeSequence(sequence)

    def _stop_read_clock(self) -> None:
        if self._reading:
            self._reading = False
            if self.guard is not None:
                self.guard.reading.pop(self, None)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._stop_read_clock()
        if self._counted and self.guard is not None:
            self._counted = False
            self.guard.connection_closed()
        super().connectionLost(reason)
