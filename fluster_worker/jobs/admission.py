"""The line jobs wait in to start: each needs one slot (``--max-concurrent-jobs``)
and, for GPU and TPU jobs, its devices, granted together.

A job takes its place when it arrives (``enter``, before any await). Jobs are
admitted in arrival order, with one exception: a job whose devices are not free
lets later jobs go ahead as long as they need none of the same kind. So a GPU job
never holds a slot while it waits for GPUs, jobs without devices are not stuck
behind it, and among the jobs wanting the same kind of device the first come is
the first served (a large request is never starved by small ones). When no slot
is free nobody is admitted, so a freed slot goes to the earliest job that can
run: a GPU job whose GPUs are free is never overtaken by a later job.

The slots are the toolkit's DeferredSemaphore (its ``tokens`` say how many are
free), so a job that takes one directly (``acquire``/``release``) counts too;
everything here runs on the reactor thread.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredSemaphore

from fluster_worker.containers.devices import DeviceAllocator, DevicesUnavailable
from fluster_worker.jobs.devices import JobDevices
from fluster_worker.jobs.model import JobSpec

__all__ = ["Admission", "Ticket"]


class Ticket:
    """One job's place in line. ``wait()`` fires with the device ids (``()`` for
    none) once the job has its slot and devices; ``leave()`` gives both back, or
    leaves the line when they were never granted."""

    def __init__(self, line: Admission, allocator: DeviceAllocator | None, count: int) -> None:
        self._line = line
        self.allocator = allocator
        self.count = count
        self.ids: tuple[str, ...] | None = None
        self.has_slot = True  # once admitted (an adopted job may run over the limit)
        self._left = False
        self._waiter: Deferred[tuple[str, ...]] = Deferred(lambda _: self._line._drop(self))

    @property
    def admitted(self) -> bool:
        return self.ids is not None

    def wait(self) -> Deferred[tuple[str, ...]]:
        """The Deferred of the admission (await it once; cancel it to leave)."""
        return self._waiter

    def leave(self) -> None:
        if self._left:
            return
        self._left = True
        if self.ids is not None:
            self._line._release(self)
        else:
            self._waiter.addErrback(lambda _: None)  # cancelled, or the line failed it
            self._waiter.cancel()

    def _admit(self, ids: tuple[str, ...]) -> None:
        self.ids = ids
        self._waiter.callback(ids)


class Admission:
    def __init__(self, slots: DeferredSemaphore, devices: JobDevices) -> None:
        self._slots = slots
        self._line: list[Ticket] = []
        self._pumping = False
        self._devices = devices
        # While jobs wait and no slot is free, one acquire of ours waits in the
        # semaphore: whoever gives a slot back (this line or anyone else using
        # the semaphore) hands it to us, and the line moves. Its token is
        # ``_spare`` until a job takes it, or goes back if none can.
        self._pending: Deferred[DeferredSemaphore] | None = None
        self._spare = False
        for allocator in (devices.gpus, devices.tpus):
            allocator.add_listener(self._pump)
        devices.line = self

    def enter(self, spec: JobSpec) -> Ticket:
        """Take the place of a job with ``spec`` at the end of the line (admitted
        at once when nobody is ahead and a slot and its devices are free)."""
        allocator, count = self._devices.needs(spec)
        ticket = Ticket(self, allocator, count)
        self._line.append(ticket)
        self._pump()
        return ticket

    def adopt(self, spec: JobSpec, ids: list[str] | tuple[str, ...]) -> Ticket:
        """An admitted ticket for a job re-adopted after a restart: it holds the
        devices its container already has (``ids``) and a slot, without waiting
        (over the limit if the limit shrank meanwhile)."""
        allocator, _count = self._devices.needs(spec)
        ticket = Ticket(self, allocator, len(ids))
        if allocator is not None:
            allocator.hold(ids)
        ticket.has_slot = self._slots.tokens > 0
        if ticket.has_slot:
            self._slots.acquire()  # fires at once
        ticket._admit(tuple(ids) if allocator is not None else ())
        return ticket

    @property
    def waiting(self) -> int:
        return len(self._line)

    def waiting_for(self, kind: str) -> int:
        """Jobs in line that want devices of ``kind`` ("GPU", "TPU")."""
        return sum(1 for t in self._line if t.allocator is not None and t.allocator.kind == kind)

    # -- internals -----------------------------------------------------------

    def _drop(self, ticket: Ticket) -> None:
        if ticket in self._line:
            self._line.remove(ticket)
            self._pump()  # it may have been what held the others back

    def _release(self, ticket: Ticket) -> None:
        # Devices first: the freed slot must find them free (a GPU job ahead
        # gets it, not a later job without devices).
        if ticket.allocator is not None and ticket.ids:
            ticket.allocator.release(ticket.ids)
        if ticket.has_slot:
            self._slots.release()
        self._pump()

    def _pump(self) -> None:
        # Admitting fires a waiter, whose callbacks may enter, leave or release
        # (and so call here again): the outermost call serves whatever they
        # change, scanning from the front after each admission.
        if self._pumping:
            return
        self._pumping = True
        try:
            while (found := self._next()) is not None:
                ticket, outcome = found
                if isinstance(outcome, DevicesUnavailable):
                    ticket._waiter.errback(outcome)
                else:
                    ticket._admit(outcome)
            self._wait_for_a_slot()
        finally:
            self._pumping = False

    def _wait_for_a_slot(self) -> None:
        if self._spare:  # nobody in line could use it (their devices are busy)
            self._spare = False
            self._slots.release()
        if self._line and self._slots.tokens <= 0 and self._pending is None:
            self._pending = self._slots.acquire().addCallback(self._got_slot)
        elif not self._line and self._pending is not None:
            pending, self._pending = self._pending, None
            pending.addErrback(lambda _: None)
            pending.cancel()

    def _got_slot(self, token: DeferredSemaphore) -> DeferredSemaphore:
        self._pending = None
        self._spare = True
        self._pump()
        return token

    def _take_slot(self) -> None:
        if self._spare:
            self._spare = False
        else:
            self._slots.acquire()  # fires at once: a token is free

    def _has_slot(self) -> bool:
        return self._spare or self._slots.tokens > 0

    def _next(self) -> tuple[Ticket, tuple[str, ...] | DevicesUnavailable] | None:
        """The first ticket that can start, out of the line, with its slot and
        devices taken; None when none can."""
        blocked: set[str] = set()  # device kinds someone earlier waits for
        for ticket in self._line:
            if not self._has_slot():
                return None
            allocator = ticket.allocator
            ids: tuple[str, ...] = ()
            if allocator is not None:
                if allocator.kind in blocked:
                    continue
                try:
                    taken = allocator.take(ticket.count)
                except DevicesUnavailable as e:
                    self._line.remove(ticket)
                    return ticket, e
                if taken is None:
                    blocked.add(allocator.kind)
                    continue
                ids = taken
            self._take_slot()
            self._line.remove(ticket)
            return ticket, ids
        return None
