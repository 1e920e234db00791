"""Devices handed to containers (GPU ids, TPU device nodes), like host ports: a job
holds its devices from the moment they are taken until it ends, and no two jobs
ever hold the same one.

``take(count)`` hands out free ids in inventory order, or None when fewer are
free (the caller's line decides who waits: ``fluster_worker.jobs.admission``).
``hold(ids)`` marks ids as taken whatever they are (a job re-adopted after a
restart keeps the devices its container has). Listeners hear every release.

Runs on the reactor thread (no lock), like the PortAllocator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

__all__ = ["DeviceAllocator", "DevicesUnavailable"]


class DevicesUnavailable(Exception):
    """A request that can never be met (more devices than exist); one line."""


class DeviceAllocator:
    """The ids of one kind of device (``kind`` names it in messages)."""

    def __init__(self, kind: str, ids: Sequence[str] = ()) -> None:
        self.kind = kind
        self._ids: tuple[str, ...] = ()
        self._held: set[str] = set()
        self._listeners: list[Callable[[], None]] = []
        self.set_ids(ids)

    def set_ids(self, ids: Sequence[str]) -> None:
        """The devices to hand out, in the order they are handed out (known at
        start). Held ids stay held."""
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.kind} ids repeat: {list(ids)[:16]}")
        self._ids = tuple(ids)
        self._changed()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` after every release (and new inventory)."""
        self._listeners.append(listener)

    @property
    def ids(self) -> tuple[str, ...]:
        return self._ids

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    @property
    def free(self) -> tuple[str, ...]:
        return tuple(i for i in self._ids if i not in self._held)

    def check(self, count: int) -> None:
        """DevicesUnavailable unless ``count`` devices could ever be had here."""
        if count < 0 or count > len(self._ids):
            raise DevicesUnavailable(f"{count} {self.kind} devices requested, this worker has {len(self._ids)}")

    def take(self, count: int) -> tuple[str, ...] | None:
        """``count`` free ids, now held; None (holding none) when fewer are free.
        DevicesUnavailable for a count that can never be met."""
        self.check(count)
        free = self.free
        if count > len(free):
            return None
        chosen = free[:count]
        self._held.update(chosen)
        return chosen

    def hold(self, ids: Iterable[str]) -> None:
        """Mark ``ids`` as taken: a job re-adopted after a restart keeps the devices
        its container already has. Ids not in the inventory are held too."""
        self._held.update(ids)

    def release(self, ids: Iterable[str]) -> None:
        """Give ids back (ids not held are ignored)."""
        for device in ids:
            self._held.discard(device)
        self._changed()

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()
