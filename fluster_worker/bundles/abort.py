"""Abort: stops a bundle operation nobody waits for any more (a fetch, an
unpack, a wait for a lock), on pool threads and on the reactor alike."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from twisted.internet.defer import Deferred

__all__ = ["Abort"]

T = TypeVar("T")


class Abort:
    """Stops an operation nobody waits for any more: an Event for pool threads, and
    hooks (cancel a Deferred, drop a connection) for work on the reactor."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._hooks: list[Callable[[], object]] = []

    def is_set(self) -> bool:
        return self.event.is_set()

    def set(self) -> None:
        self.event.set()
        for hook in list(self._hooks):
            hook()

    @contextmanager
    def hooked(self, hook: Callable[[], object]) -> Iterator[None]:
        """Run ``hook`` if the operation is (or gets) aborted while in this block."""
        if self.is_set():
            hook()
        self._hooks.append(hook)
        try:
            yield
        finally:
            self._hooks.remove(hook)

    async def wait(self, d: Deferred[T]) -> T:
        """Await ``d``, cancelling it on abort."""
        with self.hooked(d.cancel):
            return await d
