"""Devices handed to containers (GPU ids, TPU device nodes), like host ports: a job
holds its devices from the moment they are granted until it ends, and no two jobs
ever hold the same one.

``DeviceAllocator.acquire(count)`` queues the request and fires once ``count``
devices are free, strictly in arrival order: a request that does not fit yet
blocks the ones behind it, so a large request is never starved by small ones.
A request for more devices than exist fails at once (``DevicesUnavailable``);
cancelling a waiting request takes it out of the line. ``hold(ids)`` marks ids
as taken without queueing (a job re-adopted after a restart keeps its devices).

Runs on the reactor thread (no lock), like the PortAllocator.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail, succeed

__all__ = ["DeviceAllocator", "DevicesUnavailable"]


class DevicesUnavailable(Exception):
    """A request that can never be met (more devices than exist); one line."""


@dataclass
class _Request:
    count: int
    waiter: Deferred[tuple[str, ...]]


class DeviceAllocator:
    """Hands out the ids of one kind of device (``kind`` names it in messages)."""

    def __init__(self, kind: str, ids: Sequence[str] = ()) -> None:
        self.kind = kind
        self._ids: tuple[str, ...] = ()
        self._held: set[str] = set()
        self._queue: deque[_Request] = deque()
        self._granting = False
        self.set_ids(ids)

    # -- what there is ---------------------------------------------------------

    def set_ids(self, ids: Sequence[str]) -> None:
        """The devices to hand out, in the order they are handed out (once known,
        at start). Held ids stay held; queued requests that no longer fit fail."""
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.kind} ids repeat: {list(ids)[:16]}")
        self._ids = tuple(ids)
        for request in [r for r in self._queue if r.count > len(self._ids)]:
            self._queue.remove(request)
            request.waiter.errback(DevicesUnavailable(self._too_many(request.count)))
        self._grant()

    @property
    def ids(self) -> tuple[str, ...]:
        return self._ids

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    @property
    def free(self) -> tuple[str, ...]:
        return tuple(i for i in self._ids if i not in self._held)

    @property
    def waiting(self) -> int:
        """Requests in line."""
        return len(self._queue)

    # -- taking and giving back ------------------------------------------------

    def acquire(self, count: int) -> Deferred[tuple[str, ...]]:
        """``count`` device ids, once free and every earlier request is served.
        Cancel the Deferred to leave the line (ids granted before are kept: the
        caller must ``release`` what it got)."""
        if count < 0:
            return fail(ValueError(f"cannot acquire {count} {self.kind} devices"))
        if count > len(self._ids):
            return fail(DevicesUnavailable(self._too_many(count)))
        if count == 0:
            return succeed(())
        request = _Request(count, Deferred(lambda d: self._leave(request)))
        self._queue.append(request)
        self._grant()
        return request.waiter

    def hold(self, ids: Iterable[str]) -> None:
        """Mark ``ids`` as taken, at once and whatever is queued: a job re-adopted
        after a restart keeps the devices its container already has. Ids this
        allocator does not hand out are held too (until released)."""
        self._held.update(ids)

    def release(self, ids: Iterable[str]) -> None:
        """Give ids back (ids not held are ignored) and serve the line."""
        for device in ids:
            self._held.discard(device)
        self._grant()

    # -- internals ---------------------------------------------------------------

    def _too_many(self, count: int) -> str:
        return f"{count} {self.kind} devices requested, this worker has {len(self._ids)}"

    def _leave(self, request: _Request) -> None:
        if request in self._queue:
            self._queue.remove(request)
            self._grant()  # the head may have been what blocked the rest

    def _grant(self) -> None:
        # Firing a waiter runs its callbacks, which may acquire or release:
        # the outer loop serves whatever they change.
        if self._granting:
            return
        self._granting = True
        try:
            while self._queue:
                head = self._queue[0]
                free = self.free
                if head.count > len(free):
                    return
                self._queue.popleft()
                chosen = free[: head.count]
                self._held.update(chosen)
                head.waiter.callback(chosen)
        finally:
            self._granting = False
