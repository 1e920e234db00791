"""BoundedRequest: what one request may cost the worker.

- A request body past ``max_body_bytes`` is dropped as it arrives and flagged;
  the RPC answers resource_exhausted.
- A request whose path (or Host) is not UTF-8 once unquoted answers a plain 400
  before any resource sees it (Klein would log a traceback for it).
- A large answer (a FetchLogs page of up to 16 MiB) is handed to the socket a
  slice at a time as the peer reads it (``_Unsent``), counted against its site's
  cap on unsent answers (``site.GuardedSite``).
"""

from __future__ import annotations

import io
from collections import deque
from typing import Protocol
from urllib.parse import unquote_to_bytes

from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from twisted.web.server import Request

DEFAULT_MAX_BODY_BYTES = 32 * 2**20
#: A write at least this large goes out a slice at a time (_Unsent).
LARGE_WRITE = 256 * 1024
SLICE = 64 * 1024


class UnsentLedger(Protocol):
    """Counts the answers not yet handed to the sockets (``site.GuardedSite``)."""

    def unsent_started(self, request: BoundedRequest) -> None: ...
    def unsent_added(self, request: BoundedRequest, size: int) -> None: ...
    def unsent_sent(self, size: int) -> None: ...
    def unsent_done(self, request: BoundedRequest) -> None: ...
    def unsent_forgotten(self, request: BoundedRequest, size: int) -> None: ...


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
    _guarded: UnsentLedger | None = None  # the site counting this request's unsent bytes
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
        if self._unsent is None and len(data) < LARGE_WRITE:
            super().write(data)  # the usual answer: small, written at once
            return
        site: UnsentLedger | None = getattr(self.channel, "guard", None)  # GuardedChannel: its site
        if self._unsent is None and (
            site is None
            or self.method == b"HEAD"
            or self.code in NO_BODY_CODES
            or self.finished
            or self._disconnected
        ):
            super().write(data)
            return
        if self._unsent is None:
            assert site is not None
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
        """Twisted's ``Request.process`` less two things: no ``Server`` header
        (it told every caller Twisted's version) and no ``Date`` set here (the
        channel writes it, made once a second: ``GuardedChannel.writeHeaders``);
        and a path or Host that is not UTF-8 answers a plain 400."""
        self.site = self.channel.site  # type: ignore[attr-defined]
        problem = undecodable(self)
        if problem is not None:
            self._refuse_undecodable(problem)
            return
        if self.path == b"*" or getattr(self.channel, "guard", None) is None:
            super().process()  # ``OPTIONS *``, or a channel that writes no Date
            return
        self.prepath = []
        self.postpath = list(map(unquote_to_bytes, self.path[1:].split(b"/")))
        try:
            # (The worker's resources have no response encoders to look up.)
            self.render(self.site.getResourceFor(self))
        except BaseException:
            self.processingFailed(Failure())

    def _refuse_undecodable(self, problem: str) -> None:
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
