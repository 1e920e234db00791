"""The SIGKILL deadline of one container termination, on a clock: armed once
the SIGTERM is delivered, only ever brought forward (a later kill with a
shorter grace, a stopping worker). ContainerRuntime's terminations and the fake
runtime of ``fluster_worker.testing.containers`` both keep theirs in one."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["GraceDeadline"]


class GraceDeadline:
    """The SIGKILL deadline of one termination, counted from the terminate call:
    set when the SIGTERM has been delivered (``arm``), and only ever brought
    forward (``shorten``)."""

    def __init__(self, reactor: IReactorTime, grace_seconds: float, expire: Callable[[], None]) -> None:
        self._reactor = reactor
        self._expire = expire
        self._deadline = reactor.seconds() + max(0.0, grace_seconds)
        self._timer: IDelayedCall | None = None
        self._done = False

    def arm(self) -> None:
        if not self._done and self._timer is None:
            self._timer = self._reactor.callLater(max(0.0, self._deadline - self._reactor.seconds()), self._fire)

    def shorten(self, grace_seconds: float) -> None:
        deadline = self._reactor.seconds() + max(0.0, grace_seconds)
        if self._done or deadline >= self._deadline:
            return
        self._deadline = deadline
        if self._timer is not None and self._timer.active():
            self._timer.reset(max(0.0, deadline - self._reactor.seconds()))

    def cancel(self) -> None:
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def _fire(self) -> None:
        self._done = True
        self._expire()
