"""The two queues of a JobLog's writer (joblog.py), on the reactor thread.

* PendingLines: lines appended but not yet handed to the writer, numbered in
  append order across sources; ``take`` turns them into one batch per source
  with the seqs they are stored with.
* FlushWaiters: the ``flush()`` calls waiting for lines to be written (and,
  with ``sync``, fdatasync'ed), each with a Deferred of its own.
"""

from __future__ import annotations

from array import array

from twisted.internet.defer import Deferred

from fluster_worker.logs.layout import LINE_OVERHEAD
from fluster_worker.logs.model import SOURCES
from fluster_worker.logs.served import Batches


class PendingLines:
    """Appended lines not yet handed to the writer."""

    def __init__(self) -> None:
        # Per source: (number of the first line in append order, timestamps, data).
        self._chunks: dict[str, list[tuple[int, list[int], list[bytes]]]] = {s: [] for s in SOURCES}
        self.lines = 0
        self.bytes = 0  # what they will cost on disk

    def add(self, number: int, source: str, timestamps_ns: list[int], lines: list[bytes]) -> None:
        """Lines numbered ``number``, ``number + 1``, ... in append order."""
        self._chunks[source].append((number, timestamps_ns, lines))
        self.lines += len(lines)
        self.bytes += sum(map(len, lines)) + LINE_OVERHEAD * len(lines)

    def clear(self) -> None:
        self._chunks = {s: [] for s in SOURCES}
        self.lines = self.bytes = 0

    def take(self, base: int) -> Batches:
        """Everything pending, per source, as (timestamps, seqs, data); line
        number N gets seq ``base + N``. Leaves nothing pending."""
        chunks_by_source = self._chunks
        self.clear()
        batches: Batches = {}
        for source, chunks in chunks_by_source.items():
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
        return batches


class _Waiter:
    __slots__ = ("target", "sync", "deferred")

    def __init__(self, target: int, sync: bool) -> None:
        self.target = target
        self.sync = sync
        self.deferred: Deferred[None] = Deferred()


class FlushWaiters:
    """``flush()`` calls waiting for the first ``target`` appended lines."""

    def __init__(self) -> None:
        self._waiters: list[_Waiter] = []

    def __bool__(self) -> bool:
        return bool(self._waiters)

    def add(self, target: int, sync: bool) -> Deferred[None]:
        waiter = _Waiter(target, sync)
        self._waiters.append(waiter)
        return waiter.deferred

    @property
    def any_sync(self) -> bool:
        """Whether someone waits for an fdatasync."""
        return any(w.sync for w in self._waiters)

    def need_sync(self, synced: int) -> bool:
        """Whether someone waits for lines beyond ``synced`` to be synced."""
        return any(w.sync and w.target > synced for w in self._waiters)

    def fire(self, written: int, synced: int) -> None:
        """Release those whose lines are written (and synced, if they asked)."""
        ready = [w for w in self._waiters if w.target <= written and (not w.sync or w.target <= synced)]
        if ready:
            self._waiters = [w for w in self._waiters if w not in ready]
            for w in ready:
                w.deferred.callback(None)

    def fail(self, error: Exception, up_to: int) -> None:
        """Fail those whose lines are among the first ``up_to``: they are lost."""
        failed = [w for w in self._waiters if w.target <= up_to]
        self._waiters = [w for w in self._waiters if w.target > up_to]
        for w in failed:
            w.deferred.errback(error)

    def release_all(self) -> None:
        """Fire everyone (the log is deleted: nothing is left to wait for)."""
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.deferred.callback(None)
