"""NodeConditions: the named problems of this node, each with a severity and a
one-line reason, as a kubelet keeps node conditions.

Severities:

- ``warning``: shown (dashboard, metrics, the JSON API), work goes on (low disk).
- ``unavailable``: new work is refused with ``unavailable`` (the engine is down).
- ``exhausted``: new work is refused with ``resource_exhausted`` (below the disk floor).

The node is healthy while no condition is ``unavailable`` or ``exhausted``.
Listeners hear every change of health (healthy -> unhealthy and back).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["BLOCKING", "Condition", "NodeConditions"]

WARNING = "warning"
UNAVAILABLE = "unavailable"
EXHAUSTED = "exhausted"
BLOCKING = frozenset({UNAVAILABLE, EXHAUSTED})
_SEVERITIES = frozenset({WARNING, UNAVAILABLE, EXHAUSTED})

HealthListener = Callable[[bool], None]


@dataclass(frozen=True)
class Condition:
    name: str  # "engine", "disk", ...
    severity: str
    reason: str  # one line, with the numbers of the moment
    since_ms: int
    cause: str = ""  # the same, without them: a metric label that stays put

    @property
    def label(self) -> str:
        return self.cause or self.reason

    @property
    def blocking(self) -> bool:
        return self.severity in BLOCKING


class NodeConditions:
    """The current conditions (reactor thread only)."""

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._conditions: dict[str, Condition] = {}
        self._listeners: list[HealthListener] = []

    def set(self, name: str, severity: str, reason: str, cause: str = "") -> None:
        """Raise (or update) condition ``name``; ``cause``: ``reason`` without the
        figures that change from one check to the next."""
        if severity not in _SEVERITIES:
            raise ValueError(f"unknown severity {severity!r}")
        old = self._conditions.get(name)
        if old is not None and old.severity == severity and old.reason == reason:
            return
        since = old.since_ms if old is not None and old.severity == severity else self._now_ms()
        was_healthy = self.healthy
        self._conditions[name] = Condition(name, severity, reason, since, cause)
        if old is None or old.severity != severity:
            self.log.warn("node condition {name} ({severity}): {reason}", name=name, severity=severity, reason=reason)
        self._notify(was_healthy)

    def clear(self, name: str) -> None:
        if name not in self._conditions:
            return
        was_healthy = self.healthy
        old = self._conditions.pop(name)
        self.log.info("node condition {name} cleared (was: {reason})", name=name, reason=old.reason)
        self._notify(was_healthy)

    def get(self, name: str) -> Condition | None:
        return self._conditions.get(name)

    def current(self) -> list[Condition]:
        """Every condition, blocking ones first."""
        return sorted(self._conditions.values(), key=lambda c: (not c.blocking, c.name))

    def blocking(self) -> Condition | None:
        """The first condition that refuses new work, if any (the engine first)."""
        for condition in self.current():
            if condition.blocking:
                return condition
        return None

    @property
    def healthy(self) -> bool:
        # Read by every HealthCheck: no sorting when there is nothing to sort.
        return not self._conditions or self.blocking() is None

    def summary(self) -> str:
        """The reasons, on one line ("" when there are none)."""
        return "; ".join(c.reason for c in self.current())

    def add_listener(self, listener: HealthListener) -> None:
        """``listener(healthy)`` runs whenever health changes."""
        self._listeners.append(listener)

    def _notify(self, was_healthy: bool) -> None:
        healthy = self.healthy
        if healthy == was_healthy:
            return
        for listener in list(self._listeners):
            try:
                listener(healthy)
            except Exception:
                self.log.failure("node health listener failed")

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)
