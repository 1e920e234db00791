"""JobLog: one job's log, open for appending; the batching writer.

Appends are buffered on the reactor thread (no I/O, no per-line syscalls) and
written in batches through the BlockingPool by one writer operation at a time per
job, in order: a batch holds whatever was appended during ``batch_delay_s``
(20 ms) or while the previous one was being written, so batches grow with the
load; a flush, a close or 4 MiB pending start a batch at once. ``flush()`` fires
once everything appended before it is written and fdatasync'ed. Seqs are given
at write time (from the job's files, so a reopened job continues its numbering),
in append order across sources. Before it is written, a batch goes past the
log's ServedMark (served.py), so that no line lands behind what a poller saw.

The format on disk, the cap (head, marker, rolling tail) and crash recovery are
described in layout.py and disk.py; the query order and costs in query.py.

Lifecycle: OPEN (appends accepted) -> CLOSING (``close()``: the pending lines are
written and synced, the files closed) -> CLOSED; or DELETED (``discard()``, for
``LogStore.delete``: pending lines are discarded). Appends to a JobLog that is
not OPEN are dropped with one warning. The LogStore (store.py) makes JobLogs and
hears when one starts and finishes closing (``LogOwner``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.common.threads import BlockingPool
from fluster_worker.common.waiters import Once
from fluster_worker.logs.batch import FlushWaiters, PendingLines
from fluster_worker.logs.disk import JobFiles
from fluster_worker.logs.ingest import IngestBudget
from fluster_worker.logs.layout import JobView
from fluster_worker.logs.lines import truncate_line
from fluster_worker.logs.model import SOURCES, LogLine, LogStats
from fluster_worker.logs.served import ServedMark

T = TypeVar("T")

_URGENT_BYTES = 4 * 2**20  # pending bytes that are written without waiting for the delay

_OPEN, _CLOSING, _CLOSED, _DELETED = "open", "closing", "closed", "deleted"


class LogWriteError(OSError):
    """Lines could not be written to disk."""


class LogOwner(Protocol):
    """What a JobLog needs from the LogStore that made it."""

    reactor: Any
    pool: BlockingPool
    max_line_bytes: int
    batch_delay_s: float
    ingest: IngestBudget

    def log_closing(self, job_log: JobLog, closed: Once[None]) -> None:
        """``job_log`` started closing; ``closed`` fires once it is closed."""

    def log_closed(self, job_log: JobLog, closed: Once[None]) -> None:
        """``job_log`` is closed (its files are synced and closed)."""


class JobLog:
    """One job's log, open for appending. Made by ``LogStore.open``."""

    log = Logger()

    def __init__(self, owner: LogOwner, job_id: str, files: JobFiles, gate: Once[None] | None) -> None:
        """``gate``, when given, holds the writer back until it fires (the job's
        previous JobLog is still closing or being deleted)."""
        self.job_id = job_id
        self._owner = owner
        self._reactor = owner.reactor
        self._pool = owner.pool
        #: The reactor time this log's follower may parse with (shared: ingest.py).
        self.ingest = owner.ingest
        self._files = files
        self._gate = gate
        self._state = _OPEN
        self._loaded = False
        self._busy = False
        self._scheduled: IDelayedCall | None = None
        self._pending = PendingLines()
        self._in_flight_bytes = 0
        self._appended = 0  # lines appended so far (the append order numbers them)
        self._written = 0  # ... of which written
        self._synced = 0  # ... of which synced
        self._committed_lines = 0  # lines on disk, this run's and earlier ones
        self._waiters = FlushWaiters()
        self._closed: Once[None] = Once()
        self._ready: Once[None] = Once()
        self._idle: list[Deferred[None]] = []
        self._broken: LogWriteError | None = None
        self._gate_waiting = False
        self._warned = False
        self._mark = ServedMark()
        #: Lines that could not be written (a full disk), and the last such error.
        self.lost_lines = 0
        self.write_error = ""

    # -- appending --------------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        """Bytes appended but not yet on disk (for the tail's back-pressure)."""
        return self._pending.bytes + self._in_flight_bytes

    def append(self, source: str, data: str, timestamp_ns: int | None = None) -> None:
        """Append ``data`` (one line, or several separated by newlines; one final
        newline is ignored) to ``source``; ``timestamp_ns`` None means now."""
        if source not in SOURCES:
            raise ValueError(f"unknown log source {source!r}: use {', '.join(SOURCES)}")
        if timestamp_ns is None:
            # A float of seconds since the epoch holds microseconds, not nanoseconds.
            timestamp_ns = round(self._reactor.seconds() * 1_000_000) * 1000
        if data.endswith("\n"):
            data = data[:-1]
        limit = self._owner.max_line_bytes
        lines = [truncate_line(line.removesuffix("\r").encode("utf-8", "replace"), limit) for line in data.split("\n")]
        self.append_batch(source, [timestamp_ns] * len(lines), lines)

    def append_batch(self, source: str, timestamps_ns: list[int], lines: list[bytes]) -> None:
        """Append lines to ``source``, in order. Each line is valid UTF-8 without a
        newline (the tail's parser guarantees it); ``timestamps_ns`` runs parallel."""
        if not lines:
            return
        if self._state != _OPEN:
            if not self._warned:
                self._warned = True
                self.log.warn(
                    "log of {job_id} is {state}: dropping lines appended to it",
                    job_id=self.job_id,
                    state=self._state,
                )
            return
        self._pending.add(self._appended, source, timestamps_ns, lines)
        self._appended += len(lines)
        self._kick()

    def flush(self, *, sync: bool = True) -> Deferred[None]:
        """Fires once every line appended before the call is written (and, with
        ``sync``, fdatasync'ed). Fails with LogWriteError if some could not be."""
        target = self._appended
        if self._state == _DELETED or (target <= self._written and (not sync or target <= self._synced)):
            return succeed(None)
        d = self._waiters.add(target, sync)
        self._kick()
        return d

    def close(self) -> Deferred[None]:
        """Write and sync what is pending, close the files. Later appends are
        dropped; the LogStore can open the job again."""
        if self._state == _OPEN:
            self._state = _CLOSING
            self._owner.log_closing(self, self._closed)
            self._kick()
        return self._closed.wait()

    def ready(self) -> Deferred[None]:
        """Fires once the job's files are open (reopened and repaired if they
        existed): from then on ``view()`` shows them."""
        self._kick()
        return self._ready.wait()

    def resume_point(self, source: str) -> Deferred[tuple[int, int] | None]:
        """(last timestamp_ns, number of the newest lines having it) of ``source``
        once everything appended is written; None if it has no lines."""

        async def run() -> tuple[int, int] | None:
            await self.ready()
            await self.flush(sync=False)
            if self._broken is not None:
                return None
            return await self._pool.run(self._files.resume_point, source)

        return Deferred.fromCoroutine(run())

    def lines_since(self, source: str, since_ns: int) -> Deferred[int]:
        """How many stored lines of ``source`` carry a timestamp >= ``since_ns``,
        once everything appended is written."""

        async def run() -> int:
            await self.ready()
            await self.flush(sync=False)
            if self._broken is not None:
                return 0
            return await self._pool.run(self._files.lines_since, source, since_ns)

        return Deferred.fromCoroutine(run())

    @property
    def line_count(self) -> int:
        return self._committed_lines + self._appended - self._written

    @property
    def committed_lines(self) -> int:
        """Lines on disk, this run's and earlier ones."""
        return self._committed_lines

    @property
    def shifted_lines(self) -> int:
        """Lines stored later than stamped, to sort after what was served."""
        return self._mark.shifted_lines

    def served(self, read: Callable[[], list[LogLine]]) -> list[LogLine]:
        """Run a query's ``read`` (on a pool thread) and raise the served mark to
        the newest millisecond it returns (served.py)."""
        return self._mark.served(read)

    def view(self) -> JobView:
        return self._files.view()

    def stats(self) -> Deferred[LogStats]:
        async def run() -> LogStats:
            await self.ready()
            await self.flush(sync=False)
            lines, size, dropped = await self._pool.run(self._files.stats)
            return LogStats(sum(lines.values()), lines, size, dropped)

        return Deferred.fromCoroutine(run())

    # -- the writer --------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(
            self._pending.lines
            or self._waiters
            or not self._loaded
            or self._state != _OPEN
            or (self._gate is not None and not self._gate.happened)
        )

    def _kick(self) -> None:
        """Schedule the writer's next step: at once when someone waits (a flush,
        a close, the first load) or much is pending, else after ``batch_delay_s``
        so that a steady trickle of appends is written in few, larger batches."""
        if self._busy or self._state in (_CLOSED, _DELETED) or self._gate_waiting or not self._has_work():
            return
        urgent = (
            bool(self._waiters) or self._state != _OPEN or not self._loaded or (self._pending.bytes >= _URGENT_BYTES)
        )
        if self._scheduled is not None:
            if urgent and self._scheduled.active() and self._scheduled.getTime() > self._reactor.seconds():
                self._scheduled.reset(0)
            return
        self._scheduled = self._reactor.callLater(0 if urgent else self._owner.batch_delay_s, self._step)

    def _step(self) -> None:
        self._scheduled = None
        if self._busy or self._state in (_CLOSED, _DELETED):
            return
        if self._gate is not None and not self._gate.happened:
            if not self._gate_waiting:
                self._gate_waiting = True
                self._gate.wait().addCallback(lambda _: self._gate_opened())
            return
        if not self._loaded:
            self._run("open", self._files.load, self._after_load, self._load_failed)
        elif self._broken is not None:
            self._drop_pending(self._broken)
            if self._state == _CLOSING:
                self._run("close", self._files.close, self._after_close, lambda _: self._after_close(None))
        elif self._pending.lines:
            self._write_batch()
        elif self._waiters.need_sync(self._synced):
            written = self._written
            self._run("sync", self._files.sync, lambda _: self._after_sync(written), self._sync_failed)
        elif self._state == _CLOSING:
            self._run("close", self._files.close, self._after_close, lambda _: self._after_close(None))

    def _gate_opened(self) -> None:
        self._gate_waiting = False
        self._kick()

    def _run(
        self,
        what: str,
        f: Callable[[], T],
        then: Callable[[T], None],
        otherwise: Callable[[LogWriteError], None],
    ) -> None:
        self._busy = True

        def done(result: T | Failure) -> None:
            self._busy = False
            if isinstance(result, Failure):
                self.log.failure("log of {job_id}: {what} failed", result, job_id=self.job_id, what=what)
                otherwise(LogWriteError(f"{what} of the log of {self.job_id} failed: {result.getErrorMessage()}"))
            else:
                then(result)
            self._waiters.fire(self._written, self._synced)
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
            self._kick()

        self._pool.run(f).addBoth(done)

    def _after_load(self, _: None) -> None:
        self._loaded = True
        self._committed_lines = sum(s.entries for s in self._files.view().segments)
        newest = self._files.newest_timestamp()
        if newest is not None:
            self._mark.raise_to(newest // 1_000_000)  # see served.py
        self._ready.fire(None)

    def _load_failed(self, error: LogWriteError) -> None:
        self._loaded = True
        self._broken = error
        self._ready.fire(None)

    def _write_batch(self) -> None:
        count = self._pending.lines
        first = self._appended - count
        end = first + count
        self._in_flight_bytes = self._pending.bytes
        sync = self._state == _CLOSING or self._waiters.any_sync
        # Seqs continue the job's numbering; the writer is idle, so reading it is safe.
        base = self._files.next_seq - first
        batches = self._pending.take(base)

        def write() -> None:
            with self._mark.lock:
                self._mark.shift(batches)
                self._files.write(batches)
                self._files.next_seq = base + end
            if sync:
                self._files.sync()

        def written(_: None) -> None:
            self._written = end
            self._committed_lines += count
            if sync:
                self._synced = end
            self._in_flight_bytes = 0

        def lost(error: LogWriteError) -> None:
            # The batch is lost (a disk error): the waiters that covered it learn
            # it, and so does whoever reads lost_lines at the job's end.
            self._files.next_seq = base + end
            self._written = self._synced = end
            self._in_flight_bytes = 0
            self.lost_lines += count
            self.write_error = str(error)
            self._waiters.fail(error, up_to=end)

        self._run("write", write, written, lost)

    def _after_sync(self, written: int) -> None:
        self._synced = max(self._synced, written)

    def _sync_failed(self, error: LogWriteError) -> None:
        self.write_error = str(error)
        self._synced = self._written
        self._waiters.fail(error, up_to=self._written)

    def _after_close(self, _: None) -> None:
        self._state = _CLOSED
        self._owner.log_closed(self, self._closed)
        self._closed.fire(None)

    def _drop_pending(self, error: LogWriteError) -> None:
        self.lost_lines += self._pending.lines
        self.write_error = str(error)
        self._written = self._synced = self._appended
        self._pending.clear()
        self._waiters.fail(error, up_to=self._appended)

    def discard(self) -> Deferred[None]:
        """For ``LogStore.delete``: drop what is pending, wait for the writer,
        close the files."""
        self._state = _DELETED
        self._pending.clear()
        self._waiters.release_all()
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        self._ready.fire(None)

        async def run() -> None:
            if self._busy:
                idle: Deferred[None] = Deferred()
                self._idle.append(idle)
                await idle
            await self._pool.run(self._files.close)
            self._closed.fire(None)

        return Deferred.fromCoroutine(run())
