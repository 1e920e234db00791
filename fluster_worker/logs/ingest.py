"""IngestBudget: how much of the reactor's time parsing container output may take.

Every LogFollower of a worker parses ``docker logs`` output on the reactor
thread, which also serves the RPC. Ten jobs printing as fast as they can would
otherwise keep it parsing for as long as their pipes have data, and every call
(GetJobStatus, RunJob from the controller with its deadline) would wait behind
them. So the followers share one budget, a token bucket of reactor seconds: it
refills at ``share`` of the wall-clock time, up to ``burst_s``. A follower
spends what each chunk took to parse and store; while the bucket is empty it
stops reading its pipes (``pauseProducing``: the ``docker logs`` process then
blocks on its full pipe, and the container's output waits in the engine's log
file, nothing is lost) until the bucket has refilled. A turn of the reactor
therefore parses at most ``burst_s`` plus one chunk per pipe that was ready.

When the reactor has nothing else to do the bucket is rarely empty: ``share``
(0.5) leaves it half of its time at worst, and refills come every few ms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from fluster_worker.common.waiters import Waiters

DEFAULT_SHARE = 0.5
DEFAULT_BURST_S = 0.003
_MIN_WAIT_S = 0.0005


class IngestBudget:
    """Reactor seconds for log parsing, shared by a worker's followers."""

    def __init__(
        self,
        reactor: Any,
        share: float = DEFAULT_SHARE,
        burst_s: float = DEFAULT_BURST_S,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not 0 < share <= 1 or burst_s <= 0:
            raise ValueError("share must be in (0, 1] and burst_s positive")
        self._reactor = reactor
        self._share = share
        self._burst = burst_s
        self._clock = clock
        self._tokens = burst_s
        self._at = clock()
        self._waiters: Waiters[None] = Waiters()
        self._timer: IDelayedCall | None = None
        #: How often a follower had to wait (for the metrics and the bench).
        self.waits = 0

    @property
    def clock(self) -> Callable[[], float]:
        """What followers time their parsing with."""
        return self._clock

    def spend(self, seconds: float) -> None:
        self._refill()
        self._tokens -= seconds

    @property
    def exhausted(self) -> bool:
        self._refill()
        return self._tokens < 0

    def wait(self) -> Deferred[None]:
        """Fires once the bucket is no longer empty (at once if it is not)."""
        d = self._waiters.wait()
        self.waits += 1
        self._schedule()
        return d

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._share)
        self._at = now

    def _schedule(self) -> None:
        if self._timer is not None and self._timer.active():
            return
        self._refill()
        # At least a little later: a deficit of a rounding error must not make a
        # timer that fires at once, forever.
        delay = max(_MIN_WAIT_S, -self._tokens / self._share)
        self._timer = self._reactor.callLater(delay, self._release)

    def _release(self) -> None:
        self._timer = None
        self._refill()
        if self._tokens < -_MIN_WAIT_S * self._share:
            self._schedule()  # the clock and the reactor's timer disagree
            return
        self._waiters.fire(None)
