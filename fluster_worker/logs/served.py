"""ServedMark: nothing is served behind a poller's back.

Clients poll FetchLogs with ``start_ms`` = the timestamp_ms of the last entry
they saw (exclusive), but a line can reach the store after lines with later
timestamps were served: stdout and stderr come through separate pipes, and the
lines of one millisecond may arrive in two reads with a query in between. Stored
in its (timestamp_ms, seq) place such a line would sit behind the client's
cursor and never be seen. So an open JobLog keeps a served high-water mark, the
highest timestamp_ms any query of it has returned, and a batch stores each line
stamped at or before that millisecond at the next one instead (``(mark + 1)
ms``, no sub-millisecond part; seqs, hence the order among those lines,
unchanged): it sorts after everything already served. Only lines stamped at or
before a millisecond some query already returned are moved, and by little: how
late they arrived (the delay between the two pipes, or between two reads, plus a
batch delay). ``shifted_lines`` counts them.

A query's read and its update of the mark, and a batch's adjustment and write,
hold the mark's ``lock`` (both run on pool threads), so no batch lands between a
read and the mark it sets; a regex scan thus holds back that job's writes for at
most its budget. A closed job's log no longer changes and has no mark; a JobLog
opened again starts with its mark at its newest stored line (a worker restarted
under a running job: a client may have seen every stored line, so a line
resumed from Docker that is stamped earlier sorts after them). A LogFollower
that resumes from stored lines counts them rather than trusting their (maybe
moved) timestamps: see resume.py.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable

from fluster_worker.logs.model import LogLine

_MS = 1_000_000

# Per source: timestamps (ns), seqs, data; what JobFiles.write takes.
Batches = dict[str, tuple[list[int], array, list[bytes]]]  # type: ignore[type-arg]


class ServedMark:
    """The served high-water mark of one open JobLog (see the module doc)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # The highest timestamp_ms a query of this log returned, None before any.
        # Read and written only while holding ``lock``, on pool threads.
        self._served_ms: int | None = None
        self.shifted_lines = 0  # lines stored later than stamped, to sort after what was served

    def shift(self, batches: Batches) -> None:
        """Restamp the lines of ``batches`` that would sort behind what queries
        have served. The caller holds ``lock`` until the batch is written."""
        if self._served_ms is None:
            return
        floor = (self._served_ms + 1) * _MS
        for source, (stamps, seqs, lines) in list(batches.items()):
            if stamps and min(stamps) < floor:
                shifted = [floor if ts < floor else ts for ts in stamps]
                self.shifted_lines += sum(1 for ts in stamps if ts < floor)
                batches[source] = (shifted, seqs, lines)

    def raise_to(self, timestamp_ms: int) -> None:
        """Raise the mark to ``timestamp_ms`` (a reopened log: everything stored
        may have been served)."""
        with self.lock:
            if self._served_ms is None or timestamp_ms > self._served_ms:
                self._served_ms = timestamp_ms

    def served(self, read: Callable[[], list[LogLine]]) -> list[LogLine]:
        """Run a query's ``read`` (on a pool thread) and raise the mark to the
        newest millisecond it returns, both under ``lock``."""
        with self.lock:
            lines = read()
            if lines:
                newest = lines[-1].timestamp_ms  # answers are in timestamp order
                if self._served_ms is None or newest > self._served_ms:
                    self._served_ms = newest
            return lines
