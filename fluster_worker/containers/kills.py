"""Who signalled a container, as the events stream tells it: the kills we sent
(``expect``: their kill events are ours) and those we did not (``foreign``:
someone ran ``docker stop``, or the engine is stopping and signals every
container). ExitWatcher (events.py) decides with them whether an exit was the
engine's, and whether a SIGKILL exit may be a memory-limit kill."""

from __future__ import annotations

import signal as _signal

from twisted.internet.interfaces import IReactorTime

from fluster_worker.containers.health import EngineHealth

__all__ = ["KILL_MEMORY_S", "KillLog"]

# A kill we sent shows up as a kill event within this time; one we did not send
# still counts for an exit this long after it (the engine's stop timeout is 10 s).
KILL_MEMORY_S = 30.0


class KillLog:
    """The kills of one worker id's containers (reactor thread only)."""

    def __init__(self, reactor: IReactorTime, health: EngineHealth) -> None:
        self._reactor = reactor
        self._health = health
        # Kills we sent (container -> [(signal number, until)]) and kills we did
        # not (container -> (when, how many streams were lost by then)).
        self._expected: dict[str, list[tuple[str, float]]] = {}
        self._foreign: dict[str, tuple[float, int]] = {}
        # Containers we sent a SIGKILL (their 137 is ours).
        self._sigkills_sent: set[str] = set()

    def expect(self, container_id: str, signal_name: str) -> None:
        """We are about to signal the container: its kill event is ours."""
        try:
            number = str(int(_signal.Signals[signal_name]))
        except KeyError:
            return
        if signal_name == "SIGKILL":
            self._sigkills_sent.add(container_id)
        until = self._reactor.seconds() + KILL_MEMORY_S
        self._expected.setdefault(container_id, []).append((number, until))

    def foreign(self, container_id: str) -> tuple[float, int] | None:
        """When someone else killed the container, and how many streams were
        lost by then; None if nobody did (that we know of)."""
        return self._foreign.get(container_id)

    def sigkill_sent(self, container_id: str) -> bool:
        return container_id in self._sigkills_sent

    def forget(self, container_id: str) -> None:
        """The container is being removed."""
        self._sigkills_sent.discard(container_id)

    def released(self, container_id: str) -> None:
        """The container's exit was reported: its kills are over."""
        self._foreign.pop(container_id, None)
        self._expected.pop(container_id, None)
        self._sigkills_sent.discard(container_id)

    def seen(self, container_id: str, number: str) -> None:
        """The stream reported a kill of the container with signal ``number``."""
        now = self._reactor.seconds()
        expected = [(n, until) for n, until in self._expected.get(container_id, []) if until >= now]
        for i, (n, _) in enumerate(expected):
            if n == number:
                del expected[i]
                break
        else:
            self._foreign.setdefault(container_id, (now, self._health.breaks))
        if expected:
            self._expected[container_id] = expected
        else:
            self._expected.pop(container_id, None)
        # Forget old ones, but not those the engine went away after (their exit
        # may only be found once it is back).
        for cid, (at, breaks) in list(self._foreign.items()):
            if now - at > KILL_MEMORY_S and (not self._health.went_away(breaks) or now - at > 3600):
                del self._foreign[cid]
