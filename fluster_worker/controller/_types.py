"""Structural types shared by the controller modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred

T = TypeVar("T")


class BlockingRunner(Protocol):
    """What we need of ``fluster_worker.common.threads.BlockingPool``: run a blocking
    callable off the reactor thread."""

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]: ...


class Timer(Protocol):
    """What we use of IDelayedCall."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class Clock(Protocol):
    """What we use of IReactorTime (the reactor, or ``task.Clock`` in tests). A
    structural type because mypy runs without the zope.interface plugin."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, f: Callable[..., object], /, *args: object) -> Any:
        """Returns an IDelayedCall (used as a `Timer`)."""
