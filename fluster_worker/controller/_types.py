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
