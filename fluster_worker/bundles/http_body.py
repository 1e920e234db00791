"""A download's response body: streamed to a writer in batches, the connection
paused while the disk lags behind and stopped past a size limit (BodySink), or
dropped unread (``discard_body``); and one line for a failed HTTP request."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from fluster_worker.bundles import unzip
from fluster_worker.bundles.sources import BundleError

__all__ = ["HIGH_WATER", "BodySink", "discard_body", "http_reason"]

HIGH_WATER = 8 * 1024 * 1024  # body bytes waiting for the disk before pausing the socket


def http_reason(error: BaseException) -> str:
    """One line for a failed HTTP request (twisted wraps causes in ``reasons``)."""
    reasons = getattr(error, "reasons", None)
    if reasons and isinstance(reasons[0], Failure) and reasons[0].value is not None:
        error = reasons[0].value
    if isinstance(error, (CancelledError, ConnectingCancelledError)):
        return "timed out"
    return unzip.oneline(str(error) or type(error).__name__)


class BodySink(Protocol):
    """Takes a response body for a writer that consumes it in batches (``next``):
    pauses the connection while HIGH_WATER bytes wait, stops it past ``limit``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._received = 0
        self._paused = False
        self._end: Failure | None = None
        self._error: Exception | None = None
        self._wakeup: Deferred[None] | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._received += len(data)
        if self._received > self._limit:
            self.stop(BundleError(f"bundle is larger than {self._limit} bytes"))
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self._wake()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._end = reason
        self._wake()

    def stop(self, error: Exception) -> None:
        """Drop the connection unless the body is complete; ``next`` raises ``error``."""
        if self._error is None and self._end is None:
            self._error = error
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
        self._wake()

    async def next(self) -> list[bytes] | None:
        """The chunks received since the last call; None at the end of the body."""
        while True:
            if self._error is not None:
                raise self._error
            if self._chunks:
                batch, self._chunks, self._buffered = self._chunks, [], 0
                return batch
            if self._end is not None:
                if self._end.check(ResponseDone, PotentialDataLoss):
                    return None
                reason = http_reason(self._end.value) if self._end.value else "unknown"
                raise BundleError(f"download interrupted ({reason})")
            self._wakeup = Deferred()
            await self._wakeup

    def drained(self) -> None:
        """The writer caught up: resume a paused connection."""
        if self._paused and self._buffered < HIGH_WATER and self._error is None:
            self._paused = False
            if self._end is None:
                self.transport.resumeProducing()  # type: ignore[union-attr]

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.callback(None)


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def discard_body(response: Any) -> None:
    """Drop an unwanted response body without reading it."""
    try:
        response.deliverBody(_Discard())
    except Exception:
        pass
