"""One image build in flight (``InFlight``): the callers waiting for it, its log
lines, and its abort. Used by ImageBuilder (builder.py).

Each caller gets its own Deferred; cancelling it detaches that caller only. When
the last one detaches, ``abandoned`` runs (the builder then aborts the build).
``abort`` sets ``aborted`` (the build stops at its next step) and shuts down the
socket its docker build streams on, if known (``response``, set by the builder's
response hook on the pool thread), so that a read blocked on a silent build
returns and the pool thread is free at once.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

__all__ = ["InFlight", "shut_down"]

log = Logger()


@dataclass
class InFlight:
    """One build of one tag, and the callers waiting for it."""

    tag: str
    waiters: list[tuple[Deferred[bool], Callable[[str], None]]] = field(default_factory=list)
    # Called when the last waiter detaches.
    abandoned: Callable[[InFlight], None] = lambda build: None
    aborted: threading.Event = field(default_factory=threading.Event)
    # The HTTP response of its docker build once there is one (set on the pool thread).
    response: Any = None

    def attach(self, log: Callable[[str], None]) -> Deferred[bool]:
        def detach(d: Deferred[bool]) -> None:
            self.waiters[:] = [(w, f) for (w, f) in self.waiters if w is not d]
            if not self.waiters:
                self.abandoned(self)

        d: Deferred[bool] = Deferred(canceller=detach)
        self.waiters.append((d, log))
        return d

    def abort(self) -> None:
        """Stop the build: at its next step, or now by shutting down the connection
        its docker build streams on (the pool thread's read then returns)."""
        self.aborted.set()
        shut_down(self.response)

    def emit(self, lines: Sequence[str]) -> None:
        for line in lines:
            for _, write in list(self.waiters):  # a log callback may cancel its waiter
                try:
                    write(line)
                except Exception:
                    log.failure("build log callback failed for {tag}", tag=self.tag)

    def finish(self, result: bool | BaseException) -> None:
        waiters, self.waiters = self.waiters, []
        for d, _ in waiters:
            if isinstance(result, BaseException):
                d.errback(result)
            else:
                d.callback(result)


def shut_down(response: Any) -> None:
    """Shut down the socket under a streaming HTTP response (any thread): a read
    blocked on it returns. Best effort: nothing when it cannot be found."""
    if response is None:
        return
    raw = getattr(response, "raw", None)
    connection = getattr(raw, "_connection", None) or getattr(raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is None:
        fp = getattr(raw, "_fp", None)
        sock = getattr(getattr(getattr(fp, "fp", None), "raw", None), "_sock", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
