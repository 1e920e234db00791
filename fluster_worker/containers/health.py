"""EngineHealth: whether the Docker engine answers, as the events stream sees it.

The exit watcher's events thread is the one long-lived connection to the engine,
so it is the one that notices an outage: a failed (re)connect means the engine
is down, a (re)connect means it is up again. Everything else reads the state
here, on the reactor thread: the node conditions (health, RunJob, heartbeats),
the job pipeline (a job waits for the engine before it builds), the log
followers (they do not give up while the engine is away) and the exit watcher
itself, which uses the outages to tell a container the engine stopped from one
that exited on its own.

States: "unknown" (before the first connect) -> "up" <-> "down". An outage
starts when the stream is lost (``stream_lost``), even if the next connect
succeeds at once (an engine restarted within the reconnect delay).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fluster_worker.common.waiters import Waiters

__all__ = ["EngineHealth", "Outage"]

log = Logger()

EngineListener = Callable[[bool, str], None]


@dataclass(frozen=True)
class Outage:
    """The latest loss of the events stream: from ``start_ms`` to ``end_ms``
    (0 while it lasts), epoch milliseconds."""

    start_ms: int
    end_ms: int = 0


class EngineHealth:
    """The engine's reachability (reactor thread only)."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.state = "unknown"
        self.reason = "the Docker engine has not answered yet"
        self.live_restore = False
        self.outage: Outage | None = None
        self.breaks = 0  # streams lost so far
        self._listeners: list[EngineListener] = []
        self._ready: Waiters[None] = Waiters()

    @property
    def up(self) -> bool:
        return self.state == "up"

    def went_away(self, breaks: int) -> bool:
        """Whether the engine went away since it had lost ``breaks`` streams."""
        return self.breaks != breaks or not self.up

    def add_listener(self, listener: EngineListener) -> None:
        """``listener(up, reason)`` runs on every change between up and down."""
        self._listeners.append(listener)

    def ready(self) -> Deferred[None]:
        """A new Deferred that fires once the engine is up (at once if it is)."""
        return succeed(None) if self.up else self._ready.wait()

    # -- what the events thread reports (through the reactor thread) ------------

    def connected(self, live_restore: bool) -> None:
        self.live_restore = live_restore
        now = self._now_ms()
        if self.outage is not None and not self.outage.end_ms:
            self.outage = Outage(self.outage.start_ms, now)
            log.info(
                "docker events: connected again after {seconds:.1f} s",
                seconds=(now - self.outage.start_ms) / 1000.0,
            )
        self._change("up", "")
        self._ready.fire(None)

    def connect_failed(self, reason: str) -> None:
        if self.outage is None or self.outage.end_ms:
            self.outage = Outage(self._now_ms())
        self._change("down", f"Docker engine unreachable: {reason}")

    def stream_lost(self) -> None:
        self.breaks += 1
        if self.outage is None or self.outage.end_ms:
            self.outage = Outage(self._now_ms())

    # -- internals --------------------------------------------------------------

    def _change(self, state: str, reason: str) -> None:
        if state == self.state and reason == self.reason:
            return
        changed = state != self.state
        self.state = state
        self.reason = reason
        if changed and state == "down":
            log.warn("{reason}", reason=reason)
        for listener in list(self._listeners):
            try:
                listener(self.up, reason)
            except Exception:
                log.failure("engine health listener failed")

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)
