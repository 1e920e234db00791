"""The SIGKILL deadline of one container termination, on a clock, kept as
ContainerRuntime keeps it (for the fake runtime of testing/containers.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall


class GraceDeadline:
    """The SIGKILL deadline of one termination, counted from the terminate call:
    armed once the SIGTERM is delivered, only ever brought forward."""

    def __init__(self, clock: Any, grace_seconds: float, expire: Callable[[], None]) -> None:
        self._clock = clock
        self._expire = expire
        self._deadline = clock.seconds() + max(0.0, grace_seconds)
        self._timer: IDelayedCall | None = None
        self._done = False

    def arm(self) -> None:
        if not self._done and self._timer is None:
            self._timer = self._clock.callLater(max(0.0, self._deadline - self._clock.seconds()), self._fire)

    def shorten(self, grace_seconds: float) -> None:
        deadline = self._clock.seconds() + max(0.0, grace_seconds)
        if self._done or deadline >= self._deadline:
            return
        self._deadline = deadline
        if self._timer is not None and self._timer.active():
            self._timer.reset(max(0.0, deadline - self._clock.seconds()))

    def cancel(self) -> None:
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def _fire(self) -> None:
        self._done = True
        self._expire()


__all__ = ["GraceDeadline"]
