"""FetchLogs over the files of layout.py: validation, hostile regexes, and the
merge of a job's segments in (timestamp_ms, seq) order. Runs in the pool.

The job's order is the merge of its segments (each sorted by (timestamp, seq),
see layout.py) by (timestamp_ms, seq); a source whose cap dropped lines also holds
one virtual marker line, ``[fluster: N lines (M bytes) of stdout dropped]``,
between its head and its tail, at the timestamp and seq of the first dropped
line. Every filter of LogQuery is a cut of that order, found per segment by
binary search on the fixed-width index; ``start_line`` selects the entry of that
rank across segments (reading the keys of the first or last |N| entries of each
segment when N is within 4096 of an end, e.g. a tail, else by binary search on
(timestamp_ms, seq)). So a query reads the index entries it bisects plus the
lines it returns (and, with a regex, the lines it scans): O(answer), not O(log);
``LogStore.bytes_read`` counts what queries read. The ``sources`` filter only
opens those sources' segments; the ``after_seq`` cursor cuts after the key of
the entry with that seq (if the cap dropped it since: after the newest entry
that arrived before it).

``max_lines`` never splits a millisecond. Existing clients poll with
``start_ms`` = the timestamp_ms of the last entry they saw, which is exclusive:
an answer cut by ``max_lines`` in the middle of the entries sharing a
timestamp_ms X would make them skip the rest of X for good. So when the entry
after the cut (among the matching ones: after every other filter, regex
included) has the timestamp_ms of the answer's last entry, that partial last
millisecond group is dropped and the answer has fewer than ``max_lines``
entries; if that would leave nothing (one millisecond holds more than
``max_lines`` matching entries), the answer is that whole group instead, more
than ``max_lines`` entries (losing lines is worse). Finding out reads past the
cut only while the timestamp_ms stays that of the last entry (plus one entry),
so the cost stays O(answer + that group). Paging with ``after_seq`` is exact
within a millisecond, so pages asked for with a cursor are cut at
``max_lines`` exactly, as before.

Every answer is at most a page: ``page_lines`` entries and ``page_bytes`` of
line data (LogStore's, 100,000 and 16 MiB by default), whatever ``max_lines``
asks (0, negative or more), so no query makes the worker read, hold or encode an
unbounded answer. ``max_lines`` <= 0 means "a page". A page cut follows the
millisecond rule above as a ``max_lines`` cut does (a short page is not the end
of the log), except that a millisecond holding more than a page is cut at the
page: a poller by ``start_ms`` would skip the rest of it; ``start_line`` and
``after_seq`` page through it. The byte bound always lets one entry through (a
line is at most 1 MiB), so paging makes progress.

Regexes are untrusted: at most 1024 characters, compiled by RE2 (linear-time
matching, no backtracking, memory bounded by ``max_mem`` = 8 MiB, not kept in
re2's cache), searched (not full match) on each line's UTF-8 data. A scan runs
on a pool thread, which cannot be interrupted: it looks at the clock every 256
lines and, past its budget (LogStore's ``query_budget_s``, 5 s), raises
LogQueryTimeout rather than answer a list that silently misses matches.
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import re2

from fluster_worker.logs.layout import JobView
from fluster_worker.logs.model import (
    MAX_REGEX_CHARS,
    SOURCES,
    InvalidLogQuery,
    LogLine,
    LogQuery,
    LogQueryTimeout,
)
from fluster_worker.logs.runs import ReadStats, Run, open_runs

_BLOCK = 1024  # entries read at a time while scanning
_SMALL_RANK = 4096  # ranks this close to either end are selected by reading keys
_CHECK_EVERY = 256  # lines scanned between two looks at the clock
_MS = 1_000_000
_REGEX_MAX_MEM = 8 << 20
#: The default page: most entries, and most bytes of line data, one answer holds.
DEFAULT_PAGE_LINES = 100_000
DEFAULT_PAGE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Page:
    """The bounds of one answer."""

    lines: int = DEFAULT_PAGE_LINES
    bytes: int = DEFAULT_PAGE_BYTES

    def __post_init__(self) -> None:
        if self.lines < 1 or self.bytes < 1:
            raise ValueError("a page holds at least one entry and one byte")


@dataclass(frozen=True)
class Plan:
    """A validated query."""

    query: LogQuery
    regex: Any  # a compiled re2 pattern, or None
    sources: tuple[str, ...]


def compile_query(q: LogQuery) -> Plan:
    """Validate ``q``; raise InvalidLogQuery (one line) if it cannot be run."""
    if q.sources is None:
        sources = SOURCES
    else:
        unknown = sorted(set(q.sources) - set(SOURCES))
        if unknown:
            raise InvalidLogQuery(f"unknown log source {unknown[0][:40]!r}: use {', '.join(SOURCES)}")
        sources = tuple(s for s in SOURCES if s in q.sources)
    regex = compile_regex(q.regex) if q.regex else None
    return Plan(q, regex, sources)


def compile_regex(pattern: str) -> Any:
    if not isinstance(pattern, str):
        raise InvalidLogQuery("regex must be a string")
    if len(pattern) > MAX_REGEX_CHARS:
        raise InvalidLogQuery(f"regex is {len(pattern)} characters long; the limit is {MAX_REGEX_CHARS}")
    options = re2.Options()
    options.log_errors = False
    options.never_capture = True
    options.max_mem = _REGEX_MAX_MEM
    try:
        compiled = re2.compile(pattern, options)
    except Exception as e:  # re2.error, or anything else a hostile pattern provokes
        reason = e.args[0] if e.args else e
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise InvalidLogQuery(f"invalid regex: {' '.join(str(reason).split())[:200]}") from None
    finally:
        # re2 keeps the last 128 patterns compiled by re2.compile; untrusted
        # patterns must not pin up to 128 x max_mem of memory.
        re2.purge()
    return compiled


# -- cuts ----------------------------------------------------------------------------


def _count_le_ms(run: Run, ms: int) -> int:
    """Lines of ``run`` with timestamp_ms <= ms."""
    return bisect_left(run.stamps, (ms + 1) * _MS)


def _count_lt_key(run: Run, ms: int, seq: int) -> int:
    """Lines of ``run`` before the key (ms, seq)."""
    low = bisect_left(run.stamps, ms * _MS)
    high = bisect_left(run.stamps, (ms + 1) * _MS, low)
    return bisect_left(run.seqs, seq, low, high)


def _select(runs: list[Run], rank: int) -> list[int]:
    """Per run, how many of its lines are among the first ``rank`` of the merge."""
    total = sum(r.length for r in runs)
    if rank <= 0:
        return [0] * len(runs)
    if rank >= total:
        return [r.length for r in runs]
    if len(runs) == 1:
        return [rank]
    if rank <= _SMALL_RANK:
        keyed = [
            [(ts // _MS, seq, i) for ts, seq in zip(*r.keys(0, min(rank, r.length)), strict=True)]
            for i, r in enumerate(runs)
        ]
        counts = [0] * len(runs)
        for _, _, i in heapq.nsmallest(rank, (k for ks in keyed for k in ks)):
            counts[i] += 1
        return counts
    if total - rank <= _SMALL_RANK:
        keep = total - rank
        keyed = []
        for i, r in enumerate(runs):
            start = max(r.length - keep, 0)
            keyed.append([(ts // _MS, seq, i) for ts, seq in zip(*r.keys(start, r.length), strict=True)])
        counts = [r.length for r in runs]
        for _, _, i in heapq.nlargest(keep, (k for ks in keyed for k in ks)):
            counts[i] -= 1
        return counts
    # The key (ms, seq) of the line of this rank, by binary search on ms, then seq.
    low_ms = min(r.stamps[0] for r in runs) // _MS
    high_ms = max(r.stamps[r.length - 1] for r in runs) // _MS
    while low_ms < high_ms:
        mid = (low_ms + high_ms) // 2
        if sum(_count_le_ms(r, mid) for r in runs) > rank:
            high_ms = mid
        else:
            low_ms = mid + 1
    low_seq = 0
    high_seq = max(r.seqs[r.length - 1] for r in runs)
    while low_seq < high_seq:
        mid = (low_seq + high_seq) // 2
        if sum(_count_lt_key(r, low_ms, mid + 1) for r in runs) > rank:
            high_seq = mid
        else:
            low_seq = mid + 1
    return [_count_lt_key(r, low_ms, low_seq) for r in runs]


def _after(runs: list[Run], seq: int) -> list[int]:
    """Per run, how many of its lines come no later than the line ``seq``. If that
    line is gone (dropped by the cap), the latest line that arrived before it stands
    in for it."""
    key: tuple[int, int] | None = None
    for r in runs:
        i = bisect_left(r.seqs, seq)
        if i < r.length and r.seqs[i] == seq:
            key = (r.stamps[i] // _MS, seq)
            break
        if i > 0:
            candidate = (r.stamps[i - 1] // _MS, r.seqs[i - 1])
            key = candidate if key is None else max(key, candidate)
    if key is None:
        return [0] * len(runs)
    return [_count_lt_key(r, key[0], key[1] + 1) for r in runs]


# -- running -------------------------------------------------------------------------

_Row = tuple[int, int, int, bytes, str]  # timestamp_ms, seq, timestamp_ns, data, source


def _lines(run: Run, start: int, stop: int, first_block: int) -> Iterator[_Row]:
    """The lines [start, stop) of ``run``, read in blocks that double from
    ``first_block`` up to _BLOCK (a short answer reads little more than itself)."""
    source = run.source
    size = first_block
    while start < stop:
        end = min(start + size, stop)
        stamps, seqs, lines = run.read(start, end)
        for ts, seq, data in zip(stamps, seqs, lines, strict=True):
            yield ts // _MS, seq, ts, data, source
        start = end
        size = min(size * 2, _BLOCK)


class _Scan:
    """The matching entries of a merged stream of rows, in order, with the scan
    budget of a regex search."""

    def __init__(self, rows: Iterator[_Row], regex: Any, budget_s: float, clock: Callable[[], float]) -> None:
        self._rows = rows
        self._search = regex.search if regex is not None else None
        self._budget_s = budget_s
        self._clock = clock
        self._deadline = clock() + budget_s
        self._scanned = 0
        self._held: _Row | None = None  # a matching row read but not taken

    def next(self, within_ms: int | None = None) -> _Row | None:
        """The next matching row; None at the end, or (with ``within_ms``) at the
        first row, matching or not, of another millisecond (it is consumed)."""
        held, self._held = self._held, None
        if held is not None:
            return held if within_ms is None or held[0] == within_ms else None
        search = self._search
        for row in self._rows:
            if within_ms is not None and row[0] != within_ms:
                return None
            if search is None:
                return row
            self._scanned += 1
            found = search(row[3]) is not None
            if self._scanned % _CHECK_EVERY == 0 and self._clock() > self._deadline:
                raise LogQueryTimeout(
                    f"log search stopped after {self._budget_s:g} s having scanned {self._scanned} lines; "
                    "narrow it with start_line, start_ms, end_ms or max_lines"
                )
            if found:
                return row
        return None

    def take(self, limit: int, max_bytes: int) -> tuple[list[_Row], bool]:
        """Up to ``limit`` matching rows holding at most ``max_bytes`` of data (the
        first row whatever its size), and whether a row was left for the bytes."""
        out: list[_Row] = []
        size = 0
        while len(out) < limit:
            row = self.next()
            if row is None:
                break
            size += len(row[3])
            if size > max_bytes and out:
                self._held = row
                return out, True
            out.append(row)
        return out, False


def _whole_last_millisecond(out: list[_Row], scan: _Scan, page: Page) -> list[_Row]:
    """The group rule (see the module doc) for an answer ``out`` cut at max_lines
    or at the page."""
    last_ms = out[-1][0]
    following = scan.next(within_ms=last_ms)
    if following is None:
        return out  # the cut falls between two milliseconds
    first = len(out) - 1
    while first > 0 and out[first - 1][0] == last_ms:
        first -= 1
    if first > 0:
        return out[:first]  # drop the partial group
    # One millisecond holds more matching entries than max_lines: all of them,
    # up to a page.
    size = sum(len(row[3]) for row in out)
    row: _Row | None = following
    while row is not None and len(out) < page.lines:
        size += len(row[3])
        if size > page.bytes:
            break
        out.append(row)
        row = scan.next(within_ms=last_ms)
    return out


def _to_lines(rows: list[_Row]) -> list[LogLine]:
    return [LogLine(ts, source, data.decode("utf-8", "replace"), seq) for _, seq, ts, data, source in rows]


def run_query(
    view: JobView,
    plan: Plan,
    stats: ReadStats,
    budget_s: float,
    clock: Callable[[], float] = time.monotonic,
    page: Page | None = None,
) -> list[LogLine]:
    """Answer ``plan`` from the committed lines of ``view``, at most a ``page``."""
    q = plan.query
    page = page or Page()
    runs = open_runs(view, plan.sources, stats)
    try:
        if not runs:
            return []
        total = sum(r.length for r in runs)
        if q.start_line >= 0:
            starts = _select(runs, q.start_line)
        else:
            starts = _select(runs, total + q.start_line)
        if q.start_ms > 0:
            starts = [max(s, _count_le_ms(r, q.start_ms)) for s, r in zip(starts, runs, strict=True)]
        if q.after_seq is not None:
            starts = [max(s, c) for s, c in zip(starts, _after(runs, q.after_seq), strict=True)]
        stops = [r.length for r in runs]
        if q.end_ms > 0:
            stops = [_count_le_ms(r, q.end_ms) for r in runs]
        limit = min(q.max_lines, page.lines) if q.max_lines > 0 else page.lines
        max_bytes = min(q.max_bytes, page.bytes) if q.max_bytes > 0 else page.bytes
        # One entry more than the answer is read at once: the group rule looks at it.
        first_block = 64 if plan.regex is not None else min(limit + 1, _BLOCK)
        streams = [
            _lines(r, start, stop, first_block)
            for r, start, stop in zip(runs, starts, stops, strict=True)
            if start < stop
        ]
        if not streams:
            return []
        merged = streams[0] if len(streams) == 1 else heapq.merge(*streams)
        scan = _Scan(merged, plan.regex, budget_s, clock)
        out, full = scan.take(limit, max_bytes)
        if (full or len(out) == limit) and q.after_seq is None:
            out = _whole_last_millisecond(out, scan, page)
        return _to_lines(out)
    finally:
        for r in runs:
            r.close()
