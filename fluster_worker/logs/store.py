"""LogStore: every job's log on disk; JobLog: one job's log, open for appending.

Appends are buffered on the reactor thread (no I/O, no per-line syscalls) and
written in batches through the BlockingPool by one writer operation at a time per
job, in order: a batch holds whatever was appended during ``batch_delay_s``
(20 ms) or while the previous one was being written, so batches grow with the
load; a flush, a close or 4 MiB pending start a batch at once. ``flush()`` fires once everything
appended before it is written and fdatasync'ed. Seqs are given at write time
(from the job's files, so a reopened job continues its numbering), in append
order across sources.

The format on disk, the cap (head, marker, rolling tail) and crash recovery are
described in disk.py; the query order and costs in query.py.

Nothing is served behind a poller's back. Clients poll FetchLogs with
``start_ms`` = the timestamp_ms of the last entry they saw (exclusive), but a
line can reach the store after lines with later timestamps were served: stdout
and stderr come through separate pipes, and the lines of one millisecond may
arrive in two reads with a query in between. Stored in its (timestamp_ms, seq)
place such a line would sit behind the client's cursor and never be seen. So an
open JobLog keeps a served high-water mark, the highest timestamp_ms any query
of it has returned, and a batch stores each line stamped at or before that
millisecond at the next one instead (``(mark + 1) ms``, no sub-millisecond
part; seqs, hence the order among those lines, unchanged): it sorts after
everything already served. Only lines stamped at or before a millisecond some
query already returned are moved, and by little: how late they arrived (the
delay between the two pipes, or between two reads, plus a batch delay).
``JobLog.shifted_lines`` counts them. A query's read and its update of the
mark, and a batch's adjustment and write, hold the JobLog's ``serve_lock``
(both run on pool threads), so no batch lands between a read and the mark it
sets; a regex scan thus holds back that job's writes for at most its budget.
Queries read the files after a flush of everything appended before them, so
what a ``flush()`` made durable, and anything written since, is in the answer.
A closed job's log no longer changes and has no mark; a JobLog opened again
starts a new one. ``resume_point`` reports stored timestamps, so a LogFollower
started on a log holding moved lines (the worker never does that: a new attempt
starts from an empty log, and a restarted worker removes old containers) could
skip lines Docker stamped within the shift.

Lifecycle of a JobLog: OPEN (appends accepted) -> CLOSING (``close()``: the
pending lines are written and synced, the files closed) -> CLOSED; or DELETED
(``LogStore.delete``: pending lines are discarded and the directory removed).
Appends to a JobLog that is not OPEN are dropped with one warning. Opening a job
whose JobLog is closing or being deleted waits for that to finish before reading
the files.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.common.threads import BlockingPool
from fluster_worker.common.waiters import Once
from fluster_worker.logs.disk import (
    LINE_OVERHEAD,
    JobFiles,
    JobView,
    job_directory,
    read_view,
    remove_job_directory,
)
from fluster_worker.logs.lines import truncate_line
from fluster_worker.logs.model import (
    DEFAULT_MAX_LINE_BYTES,
    SOURCES,
    LogLine,
    LogQuery,
    LogStats,
)
from fluster_worker.logs.query import ReadStats, compile_query, run_query

T = TypeVar("T")


DEFAULT_MAX_STREAM_BYTES = 100 * 2**20
DEFAULT_QUERY_BUDGET_S = 5.0
DEFAULT_BATCH_DELAY_S = 0.02
_URGENT_BYTES = 4 * 2**20  # pending bytes that are written without waiting for the delay
_MS = 1_000_000

_OPEN, _CLOSING, _CLOSED, _DELETED = "open", "closing", "closed", "deleted"


class LogWriteError(OSError):
    """Lines could not be written to disk."""


class _Waiter:
    __slots__ = ("target", "sync", "deferred")

    def __init__(self, target: int, sync: bool) -> None:
        self.target = target
        self.sync = sync
        self.deferred: Deferred[None] = Deferred()


class JobLog:
    """One job's log, open for appending. Made by ``LogStore.open``."""

    log = Logger()

    def __init__(self, store: LogStore, job_id: str, files: JobFiles, gate: Once[None] | None) -> None:
        self.job_id = job_id
        self._store = store
        self._reactor = store.reactor
        self._pool = store.pool
        self._files = files
        self._gate = gate
        self._state = _OPEN
        self._loaded = False
        self._busy = False
        self._scheduled: IDelayedCall | None = None
        # Appended lines not yet handed to the writer, per source:
        # (number of the first one in append order, timestamps, data).
        self._pending: dict[str, list[tuple[int, list[int], list[bytes]]]] = {s: [] for s in SOURCES}
        self._pending_lines = 0
        self._pending_bytes = 0
        self._in_flight_bytes = 0
        self._appended = 0  # lines appended so far (the append order numbers them)
        self._written = 0  # ... of which written
        self._synced = 0  # ... of which synced
        self._committed_lines = 0  # lines on disk, this run's and earlier ones
        self._waiters: list[_Waiter] = []
        self._closed: Once[None] = Once()
        self._ready: Once[None] = Once()
        self._idle: list[Deferred[None]] = []
        self._broken: LogWriteError | None = None
        self._gate_waiting = False
        self._warned = False
        # The served high-water mark (see the module doc): the highest
        # timestamp_ms a query of this log returned, None before any. Read and
        # written only while holding serve_lock, on pool threads.
        self.serve_lock = threading.Lock()
        self._served_ms: int | None = None
        self.shifted_lines = 0  # lines stored later than stamped, to sort after what was served

    # -- appending --------------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        """Bytes appended but not yet on disk (for the tail's back-pressure)."""
        return self._pending_bytes + self._in_flight_bytes

    def append(self, source: str, data: str, timestamp_ns: int | None = None) -> None:
        """Append ``data`` (one line, or several separated by newlines; one final
        newline is ignored) to ``source``; ``timestamp_ns`` None means now."""
        if source not in self._pending:
            raise ValueError(f"unknown log source {source!r}: use {', '.join(SOURCES)}")
        if timestamp_ns is None:
            # A float of seconds since the epoch holds microseconds, not nanoseconds.
            timestamp_ns = round(self._reactor.seconds() * 1_000_000) * 1000
        if data.endswith("\n"):
            data = data[:-1]
        limit = self._store.max_line_bytes
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
        self._pending[source].append((self._appended, timestamps_ns, lines))
        self._appended += len(lines)
        self._pending_lines += len(lines)
        self._pending_bytes += sum(map(len, lines)) + LINE_OVERHEAD * len(lines)
        self._kick()

    def flush(self, *, sync: bool = True) -> Deferred[None]:
        """Fires once every line appended before the call is written (and, with
        ``sync``, fdatasync'ed). Fails with LogWriteError if some could not be."""
        target = self._appended
        if self._state == _DELETED or (target <= self._written and (not sync or target <= self._synced)):
            return succeed(None)
        waiter = _Waiter(target, sync)
        self._waiters.append(waiter)
        self._kick()
        return waiter.deferred

    def close(self) -> Deferred[None]:
        """Write and sync what is pending, close the files. Later appends are
        dropped; the LogStore can open the job again."""
        if self._state == _OPEN:
            self._state = _CLOSING
            self._store._closing(self.job_id, self, self._closed)
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

    @property
    def line_count(self) -> int:
        return self._committed_lines + self._appended - self._written

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
            self._pending_lines
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
            bool(self._waiters) or self._state != _OPEN or not self._loaded or (self._pending_bytes >= _URGENT_BYTES)
        )
        if self._scheduled is not None:
            if urgent and self._scheduled.active() and self._scheduled.getTime() > self._reactor.seconds():
                self._scheduled.reset(0)
            return
        self._scheduled = self._reactor.callLater(0 if urgent else self._store.batch_delay_s, self._step)

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
        elif self._pending_lines:
            self._write_batch()
        elif any(w.sync and w.target > self._synced for w in self._waiters):
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
            self._fire_waiters()
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
            self._kick()

        self._pool.run(f).addBoth(done)

    def _after_load(self, _: None) -> None:
        self._loaded = True
        self._committed_lines = sum(s.entries for s in self._files.view().segments)
        self._ready.fire(None)

    def _load_failed(self, error: LogWriteError) -> None:
        self._loaded = True
        self._broken = error
        self._ready.fire(None)

    def _write_batch(self) -> None:
        pending = self._pending
        self._pending = {s: [] for s in SOURCES}
        count = self._pending_lines
        first = self._appended - count
        end = first + count
        self._pending_lines = 0
        self._in_flight_bytes, self._pending_bytes = self._pending_bytes, 0
        sync = self._state == _CLOSING or any(w.sync for w in self._waiters)
        # Seqs continue the job's numbering; the writer is idle, so reading it is safe.
        base = self._files.next_seq - first
        batches: dict[str, tuple[list[int], array, list[bytes]]] = {}  # type: ignore[type-arg]
        for source, chunks in pending.items():
            if not chunks:
                continue
            if len(chunks) == 1:
                start, stamps, lines = chunks[0]
                seqs = array("q", range(base + start, base + start + len(lines)))
            else:
                stamps, lines, seqs = [], [], array("q")
                for start, chunk_stamps, chunk_lines in chunks:
                    stamps.extend(chunk_stamps)
                    lines.extend(chunk_lines)
                    seqs.extend(range(base + start, base + start + len(chunk_lines)))
            batches[source] = (stamps, seqs, lines)

        def write() -> None:
            with self.serve_lock:
                self._shift_served(batches)
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
            # The batch is lost (a disk error): the waiters that covered it learn it.
            self._files.next_seq = base + end
            self._written = self._synced = end
            self._in_flight_bytes = 0
            self._fail_waiters(error, up_to=end)

        self._run("write", write, written, lost)

    def _shift_served(self, batches: dict[str, tuple[list[int], array, list[bytes]]]) -> None:  # type: ignore[type-arg]
        """Restamp the lines of ``batches`` that would sort behind what queries
        have served (see the module doc). Runs with serve_lock held."""
        if self._served_ms is None:
            return
        floor = (self._served_ms + 1) * _MS
        for source, (stamps, seqs, lines) in list(batches.items()):
            if stamps and min(stamps) < floor:
                shifted = [floor if ts < floor else ts for ts in stamps]
                self.shifted_lines += sum(1 for ts in stamps if ts < floor)
                batches[source] = (shifted, seqs, lines)

    def served(self, read: Callable[[], list[LogLine]]) -> list[LogLine]:
        """Run a query's ``read`` (on a pool thread) and raise the served mark to
        the newest millisecond it returns, both under serve_lock."""
        with self.serve_lock:
            lines = read()
            if lines:
                newest = lines[-1].timestamp_ms  # answers are in timestamp order
                if self._served_ms is None or newest > self._served_ms:
                    self._served_ms = newest
            return lines

    def _after_sync(self, written: int) -> None:
        self._synced = max(self._synced, written)

    def _sync_failed(self, error: LogWriteError) -> None:
        self._synced = self._written
        self._fail_waiters(error, up_to=self._written)

    def _after_close(self, _: None) -> None:
        self._state = _CLOSED
        self._store._closed(self.job_id, self)
        self._closed.fire(None)

    def _drop_pending(self, error: LogWriteError) -> None:
        self._written = self._synced = self._appended
        self._pending = {s: [] for s in SOURCES}
        self._pending_lines = self._pending_bytes = 0
        self._fail_waiters(error, up_to=self._appended)

    def _fail_waiters(self, error: LogWriteError, up_to: int) -> None:
        failed = [w for w in self._waiters if w.target <= up_to]
        self._waiters = [w for w in self._waiters if w.target > up_to]
        for w in failed:
            w.deferred.errback(error)

    def _fire_waiters(self) -> None:
        ready = [w for w in self._waiters if w.target <= self._written and (not w.sync or w.target <= self._synced)]
        if ready:
            self._waiters = [w for w in self._waiters if w not in ready]
            for w in ready:
                w.deferred.callback(None)

    def _discard(self) -> Deferred[None]:
        """For delete: drop what is pending, wait for the writer, close the files."""
        self._state = _DELETED
        self._pending = {s: [] for s in SOURCES}
        self._pending_lines = self._pending_bytes = 0
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.deferred.callback(None)
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


class LogStore:
    """Every job's log under ``root`` (``root/<job_id>/``, see disk.py)."""

    log = Logger()

    def __init__(
        self,
        root: Path,
        pool: BlockingPool,
        reactor: Any,
        *,
        max_stream_bytes: int = DEFAULT_MAX_STREAM_BYTES,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        query_budget_s: float = DEFAULT_QUERY_BUDGET_S,
        batch_delay_s: float = DEFAULT_BATCH_DELAY_S,
    ) -> None:
        if max_stream_bytes < 1024:
            raise ValueError("max_stream_bytes must be at least 1024")
        self.root = Path(root)
        self.pool = pool
        self.reactor = reactor
        self.max_stream_bytes = max_stream_bytes
        self.max_line_bytes = max_line_bytes
        self.query_budget_s = query_budget_s
        self.batch_delay_s = batch_delay_s
        self.bytes_read = 0  # by queries, since start
        self._logs: dict[str, JobLog] = {}
        self._gates: dict[str, Once[None]] = {}
        self._counts: dict[str, int] = {}

    def open(self, job_id: str) -> JobLog:
        """The job's log, created or reopened (raises ValueError for a job id that
        is not a plain file name)."""
        directory = job_directory(self.root, job_id)
        existing = self._logs.get(job_id)
        if existing is not None:
            return existing
        job_log = JobLog(self, job_id, JobFiles(directory, self.max_stream_bytes), self._gates.get(job_id))
        self._logs[job_id] = job_log
        return job_log

    def query(self, job_id: str, q: LogQuery) -> Deferred[list[LogLine]]:
        """FetchLogs (see LogQuery). Fails with InvalidLogQuery for a query that
        cannot be run, LogQueryTimeout when a regex scan passes its budget. An
        unknown job has no lines."""

        async def run() -> list[LogLine]:
            plan = compile_query(q)
            try:
                directory = job_directory(self.root, job_id)
            except ValueError:
                return []
            job_log = self._logs.get(job_id)
            gate = self._gates.get(job_id)
            if job_log is None and gate is not None:
                await gate.wait()
                job_log = self._logs.get(job_id)
            stats = ReadStats()

            def read(live: JobLog | None) -> list[LogLine]:
                # A segment can vanish between taking a view and opening its files
                # (the cap drops the oldest tail segment; a delete): take a new view.
                for _ in range(3):
                    view = live.view() if live is not None else read_view(directory)
                    if view is None:
                        return []
                    try:
                        return run_query(view, plan, stats, self.query_budget_s)
                    except FileNotFoundError:
                        continue
                return []

            def read_live(live: JobLog) -> list[LogLine]:
                return live.served(lambda: read(live))

            try:
                if job_log is None:
                    return await self.pool.run(read, None)
                await job_log.ready()
                try:
                    await job_log.flush(sync=False)
                except LogWriteError:
                    pass  # answer with what is on disk
                return await self.pool.run(read_live, job_log)
            finally:
                self.bytes_read += stats.bytes

        return Deferred.fromCoroutine(run())

    def delete(self, job_id: str) -> Deferred[None]:
        """Remove the job's logs (an open JobLog stops taking lines)."""

        async def run() -> None:
            directory = job_directory(self.root, job_id)
            while job_id in self._gates:
                await self._gates[job_id].wait()
            gate: Once[None] = Once()
            self._gates[job_id] = gate
            try:
                job_log = self._logs.pop(job_id, None)
                if job_log is not None:
                    await job_log._discard()
                await self.pool.run(remove_job_directory, directory)
                self._counts.pop(job_id, None)
            finally:
                del self._gates[job_id]
                gate.fire(None)

        return Deferred.fromCoroutine(run())

    def close_all(self) -> Deferred[None]:
        """Close every open JobLog (worker shutdown): pending lines are written
        and synced."""

        async def run() -> None:
            for job_log in list(self._logs.values()):
                await job_log.close()

        return Deferred.fromCoroutine(run())

    def line_count(self, job_id: str) -> int:
        """Lines stored for the job: exact for open logs, and for logs closed or
        queried since the worker started; 0 for others (see ``stats``)."""
        job_log = self._logs.get(job_id)
        if job_log is not None:
            return job_log.line_count
        return self._counts.get(job_id, 0)

    def stats(self, job_id: str) -> Deferred[LogStats | None]:
        """Lines, bytes and dropped lines per source; None for an unknown job."""

        async def run() -> LogStats | None:
            job_log = self._logs.get(job_id)
            if job_log is not None:
                return await job_log.stats()
            try:
                directory = job_directory(self.root, job_id)
            except ValueError:
                return None
            view = await self.pool.run(read_view, directory)
            if view is None:
                return None
            lines = {s: 0 for s in SOURCES}
            size = {s: 0 for s in SOURCES}
            dropped = {s: 0 for s in SOURCES}
            for segment in view.segments:
                lines[segment.source] += segment.entries
                size[segment.source] += segment.data_bytes + segment.entries * (LINE_OVERHEAD - 1)
            for drop in view.drops:
                dropped[drop.source] += drop.lines
            self._counts[job_id] = sum(lines.values())
            return LogStats(sum(lines.values()), lines, size, dropped)

        return Deferred.fromCoroutine(run())

    def _closing(self, job_id: str, job_log: JobLog, closed: Once[None]) -> None:
        if self._logs.get(job_id) is job_log:
            del self._logs[job_id]
            self._gates[job_id] = closed

    def _closed(self, job_id: str, job_log: JobLog) -> None:
        self._counts[job_id] = job_log._committed_lines
        if self._gates.get(job_id) is job_log._closed:
            del self._gates[job_id]
