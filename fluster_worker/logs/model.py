"""The values the log package hands out and takes in: lines, queries, errors."""

from __future__ import annotations

from dataclasses import dataclass

#: The sources a job's log can hold (LogEntry.source in the wire contract).
SOURCES: tuple[str, ...] = ("stdout", "stderr", "build", "error")

#: The longest line stored as is; longer lines keep their first bytes and a marker.
DEFAULT_MAX_LINE_BYTES = 1 << 20

#: The longest regex a query may carry.
MAX_REGEX_CHARS = 1024


@dataclass(frozen=True)
class LogLine:
    """One stored line. ``seq`` numbers the lines of a job in arrival order
    (0, 1, 2, ...; unique per job, never reused); it breaks ties between lines of
    the same millisecond and is the paging cursor (``LogQuery.after_seq``)."""

    timestamp_ns: int
    source: str
    data: str
    seq: int

    @property
    def timestamp_ms(self) -> int:
        return self.timestamp_ns // 1_000_000


class InvalidLogQuery(ValueError):
    """A query that cannot be answered as asked (bad regex, bad source...). The
    message is one line naming the cause; the RPC answers invalid_argument."""


class LogQueryTimeout(InvalidLogQuery):
    """A regex scan ran out of its time budget before finishing. Raised rather than
    answering a silently incomplete list; narrowing the query (start_line, start_ms,
    end_ms, sources, max_lines) makes it cheaper."""


@dataclass(frozen=True)
class LogQuery:
    """FetchLogs' filter (wire contract section 5) plus two additions of ours.

    Applied in this order to the entries of the job in (timestamp_ms, seq) order:

    0. ``sources`` (ours): only entries of these sources (None = all).
    1. ``start_line`` N >= 0 skips the first N entries; N < 0 keeps the last |N|.
    2. ``start_ms`` > 0 keeps entries with timestamp_ms > start_ms; ``end_ms`` > 0
       keeps entries with timestamp_ms <= end_ms; ``after_seq`` (ours, the cursor)
       keeps the entries that come after the entry with that seq in the order.
    3. ``regex`` (non-empty): re2 search (not full match) on the data.
    4. ``max_lines`` > 0: at most that many entries, the first ones (and never
       more than a page: LogStore's ``page``, 100,000 entries and 16 MiB of line
       data by default; ``max_bytes`` > 0 asks for fewer bytes), except that
       the cut never splits a millisecond: if the entry after it has the
       timestamp_ms of the last one kept, the entries of that millisecond are
       dropped from the answer, or, when they are all of it, the answer is all
       the entries of that millisecond (more than ``max_lines``). So a poller
       that passes the timestamp_ms of the last entry it got as ``start_ms``
       misses none (see query.py). Not with ``after_seq``: its pages are exact.

    Paging: pass the ``seq`` of the last entry of a page as ``after_seq`` to get the
    next page; unlike ``start_ms`` this neither skips nor repeats entries that share
    a millisecond."""

    regex: str = ""
    start_line: int = 0
    start_ms: int = 0
    end_ms: int = 0
    max_lines: int = 0
    max_bytes: int = 0
    sources: frozenset[str] | None = None
    after_seq: int | None = None


@dataclass(frozen=True)
class LogStats:
    """What the dashboard and the metrics want to know about one job's log."""

    lines: int  # stored lines, all sources
    lines_by_source: dict[str, int]
    bytes_by_source: dict[str, int]  # on disk: data + newline + 24 bytes of index per line
    dropped_lines_by_source: dict[str, int]  # lost to the per-stream cap
