"""StallWatch: notices a ``docker logs --follow`` that stopped delivering while
the container's log moved on.

The engine's own log of a job is capped (json-file ``max-size``/``max-file``).
Docker 20.10's ``logs --follow`` loses its place in a log file that rotates
under it: it goes quiet for good, or sends a rotated file again (StreamCursor
drops those lines). Whenever a tail has delivered nothing for ``interval_s``
seconds, the watch asks ``behind()`` whether the engine holds entries newer
than what is stored; if so, ``on_stall()`` (the follower kills the tail, and
its restart resumes with ``--since``). A quiet job costs one cheap API call per
interval.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


class StallWatch:
    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        interval_s: float,
        behind: Callable[[], Deferred[bool]],
        on_stall: Callable[[], None],
    ) -> None:
        self._reactor = reactor
        self._interval = interval_s
        self._behind = behind
        self._on_stall = on_stall
        self._timer: IDelayedCall | None = None
        self._data_at = 0.0
        self._running = False

    def start(self) -> None:
        """A tail started: watch it."""
        self.stop()
        self._running = True
        self._data_at = self._reactor.seconds()
        self._schedule(self._interval)

    def saw_data(self) -> None:
        self._data_at = self._reactor.seconds()

    def stop(self) -> None:
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float) -> None:
        self._timer = self._reactor.callLater(max(delay, 0.0), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self._running:
            return
        quiet = self._reactor.seconds() - self._data_at
        if quiet < self._interval:
            self._schedule(self._interval - quiet)
            return
        data_at = self._data_at
        self._behind().addCallbacks(self._answer, self._failed, callbackArgs=(data_at,))

    def _answer(self, behind: bool, data_at: float) -> None:
        if not self._running:
            return
        if behind and self._data_at == data_at:  # still nothing delivered meanwhile
            self._running = False
            self._on_stall()
        else:
            self._schedule(self._interval)

    def _failed(self, failure: object) -> None:
        self.log.failure("checking a log tail for a stall failed", failure)  # type: ignore[arg-type]
        if self._running:
            self._schedule(self._interval)
