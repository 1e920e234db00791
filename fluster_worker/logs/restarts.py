"""When a LogFollower's ``docker logs`` starts again after it ended: at once
after a tail that stored something, then backing off (0.1 s doubling to 5 s)
over tails that stored nothing and ended badly; after ``max_failures`` of them
in a row, not at all (the follower gives up). While the engine is away
(``engine_ready`` has not fired) the restart waits for it instead, and the
failures start again from zero: an engine restart is no reason to give up a
container's logs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from fluster_worker.common.backoff import Backoff

__all__ = ["TailRestarts"]

log = Logger()

# Restarts of a dead `docker logs`: at once, then 0.1 s doubling up to 5 s.
_RESTART = Backoff(initial_s=0.1, max_s=5.0, factor=2.0, jitter=0.0)


class TailRestarts:
    """The failures in a row of one follower's tails, and its pending restart
    (a timer, or a wait for the engine) that calls ``restart``."""

    def __init__(
        self,
        reactor: Any,
        max_failures: int,
        engine_ready: Callable[[], Deferred[None]] | None,
        restart: Callable[[], None],
        container_id: str,
    ) -> None:
        self._reactor = reactor
        self._max_failures = max_failures
        self._engine_ready = engine_ready
        self._restart = restart
        self._container_id = container_id
        self._engine_wait: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self.failures = 0

    def succeeded(self) -> None:
        """A tail stored something: its end is no failure."""
        self.failures = 0

    def schedule(self, progress: bool) -> bool:
        """Restart after a tail ended (one that stored nothing, ``progress``
        False, counts as a failure); False, with nothing scheduled, when
        there were more than ``max_failures`` in a row."""
        if not progress:
            self.failures += 1
        if self._engine_ready is not None:
            ready = self._engine_ready()
            if not ready.called:
                # The engine is away: no failure of the tail; wait for it.
                log.info("docker logs for {cid}: waiting for the engine", cid=self._container_id)
                self.failures = 0
                self._engine_wait = ready
                ready.addCallbacks(self._engine_back, lambda f: None)
                return True
        if self.failures > self._max_failures:
            return False
        delay = 0.0 if self.failures == 0 else _RESTART.base(self.failures - 1)
        self._timer = self._reactor.callLater(delay, self._fire)
        return True

    def cancel(self) -> None:
        """Drop the pending restart, if any."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._engine_wait is not None:
            wait, self._engine_wait = self._engine_wait, None
            wait.cancel()

    def _engine_back(self, _: object) -> None:
        if self._engine_wait is None:
            return  # cancelled meanwhile
        self._engine_wait = None
        self._restart()

    def _fire(self) -> None:
        self._timer = None
        self._restart()
