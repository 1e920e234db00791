"""JobFiles: one job's log files, open for appending (the format is in
layout.py). Everything here blocks: it runs in the BlockingPool, one writer
operation at a time per job.

Segments and the cap: segment 0 is the head. Once a source's head reaches
``cap / 2`` bytes (data + newline + 24 bytes of index per line), its later lines
go to tail segments 1, 2, ... of ``cap / 8`` bytes each; when a fifth tail
segment opens, the oldest is deleted and counted in ``.drop``. A source thus
holds at most about ``cap`` bytes (the head, and between 3/8 and 1/2 of the cap
of its newest lines), and reading shows head, a marker line, then the tail.

Crash safety: a batch writes the .dat first, then the .idx. On open, each
segment's index is cut to its last whole entry (layout.py), the .idx to whole
entries and the .dat to that entry's end: a torn batch is dropped as a whole
line at a time, never half a line. ``sync`` (fdatasync of the files written
since the last sync, and of the directory after creating files) makes what was
written durable.
"""

from __future__ import annotations

import json
import operator
import os
import threading
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

from fluster_worker.logs.layout import (
    ENTRY,
    LINE_OVERHEAD,
    SEGMENT_NAME,
    TAIL_SEGMENTS,
    Drop,
    DropView,
    JobView,
    SegmentView,
    list_segments,
    read_drop,
    read_entries,
    segment_paths,
    to_disk,
    valid_entries,
)
from fluster_worker.logs.model import SOURCES


@dataclass
class _Segment:
    number: int
    entries: int = 0
    data_bytes: int = 0
    dirty: bool = False  # written since its last sync

    @property
    def cost(self) -> int:
        return self.data_bytes + self.entries * ENTRY


@dataclass
class _Source:
    name: str
    segments: list[_Segment] = field(default_factory=list)
    drop: Drop = field(default_factory=Drop)
    last_ts: int = -(2**63)
    last_seq: int = -1


class JobFiles:
    """One job's log files, open for appending. Not thread-safe except for
    ``view()``: the owner runs one operation at a time."""

    def __init__(self, directory: Path, max_stream_bytes: int) -> None:
        self.directory = directory
        self.head_bytes = max(max_stream_bytes // 2, 1)
        self.tail_segment_bytes = max(max_stream_bytes // (2 * TAIL_SEGMENTS), 1)
        self.lock = threading.Lock()
        self.next_seq = 0
        self._sources: dict[str, _Source] = {s: _Source(s) for s in SOURCES}
        self._view = JobView(directory, (), ())
        self._new_files = False

    # -- opening ----------------------------------------------------------------

    def load(self) -> None:
        """Create the directory or reopen and repair what is there."""
        self.directory.mkdir(parents=True, exist_ok=True)
        found = list_segments(self.directory)
        self._remove_orphans(found)
        next_seq = 0
        for name, source in self._sources.items():
            source.drop = read_drop(self.directory, name)
            next_seq = max(next_seq, source.drop.last_seq + 1)
            for number in found[name]:
                if number and number <= source.drop.through:
                    self._unlink(name, number)  # a roll cut short by a crash
                    continue
                segment, last = self._open_segment(name, number, repair=True)
                source.segments.append(segment)
                if last is not None:
                    source.last_ts, source.last_seq = last
            next_seq = max(next_seq, source.last_seq + 1)
        self.next_seq = next_seq
        self._publish()

    def _remove_orphans(self, found: dict[str, list[int]]) -> None:
        for name in os.listdir(self.directory):
            m = SEGMENT_NAME.fullmatch(name)
            if m and m.group(3) == "dat" and int(m.group(2)) not in found[m.group(1)]:
                (self.directory / name).unlink(missing_ok=True)
            elif name.endswith(".tmp"):
                (self.directory / name).unlink(missing_ok=True)

    def _open_segment(self, source: str, number: int, repair: bool) -> tuple[_Segment, tuple[int, int] | None]:
        """Create a segment's files, or repair existing ones; also return the
        (timestamp, seq) of its last line. No file stays open: every write opens
        the files it appends to (a job's log holds no descriptors while idle)."""
        segment = _Segment(number)
        last = None
        with self._files(source, number) as (idx_fd, dat_fd):
            if repair:
                count, end = valid_entries(idx_fd, dat_fd)
                if os.fstat(idx_fd).st_size != count * ENTRY:
                    os.ftruncate(idx_fd, count * ENTRY)
                if os.fstat(dat_fd).st_size != end:
                    os.ftruncate(dat_fd, end)
                segment.entries, segment.data_bytes = count, end
                if count:
                    entry = read_entries(idx_fd, count - 1, 1)
                    last = (entry[0], entry[1])
            else:
                self._new_files = True
        return segment, last

    @contextmanager
    def _files(self, source: str, number: int) -> Iterator[tuple[int, int]]:
        idx_path, dat_path = segment_paths(self.directory, source, number)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        dat_fd = os.open(dat_path, flags, 0o640)
        try:
            idx_fd = os.open(idx_path, flags, 0o640)
            try:
                yield idx_fd, dat_fd
            finally:
                os.close(idx_fd)
        finally:
            os.close(dat_fd)

    def _unlink(self, source: str, number: int) -> None:
        for path in segment_paths(self.directory, source, number):
            path.unlink(missing_ok=True)

    # -- writing ----------------------------------------------------------------

    def write(self, batches: dict[str, tuple[list[int], array, list[bytes]]]) -> None:  # type: ignore[type-arg]
        """Append, per source: timestamps, seqs and data (valid UTF-8, no newline)."""
        for name, (stamps, seqs, lines) in batches.items():
            if lines:
                self._write_source(self._sources[name], stamps, seqs, lines)
        self._publish()

    def _write_source(self, source: _Source, stamps: list[int], seqs: array, lines: list[bytes]) -> None:  # type: ignore[type-arg]
        count = len(lines)
        # Timestamps never decrease within a source (see the module doc).
        stamps = list(accumulate(stamps, max, initial=source.last_ts))[1:]
        # sizes[k]: data bytes of lines [0, k); costs[k]: what they cost on disk.
        sizes = list(accumulate(map(len, lines), initial=0))
        costs = list(map(operator.add, sizes, range(0, (count + 1) * LINE_OVERHEAD, LINE_OVERHEAD)))
        start = 0
        while start < count:
            segment = self._current(source)
            limit = self.head_bytes if segment.number == 0 else self.tail_segment_bytes
            room = limit - segment.cost
            if room <= 0:
                self._roll(source)
                continue
            # Lines go in while the segment is below its limit before them: line k
            # does iff costs[k] - costs[start] < room (so at least line ``start``).
            stop = bisect_left(costs, costs[start] + room, start + 1, count)
            self._append(source.name, segment, stamps[start:stop], seqs[start:stop], lines[start:stop], sizes, start)
            start = stop
        source.last_ts = stamps[-1]
        source.last_seq = seqs[-1]
        self.next_seq = max(self.next_seq, seqs[-1] + 1)

    def _append(
        self,
        source: str,
        segment: _Segment,
        stamps: list[int],
        seqs: array,  # type: ignore[type-arg]
        lines: list[bytes],
        sizes: list[int],
        start: int,
    ) -> None:
        count = len(lines)
        base = segment.data_bytes - sizes[start]
        # end of line k = base + sizes[k + 1] + (k + 1 - start) newlines
        ends = array(
            "q",
            map(operator.add, sizes[start + 1 : start + count + 1], range(base + 1, base + count + 1)),
        )
        entries = array("q", bytes(ENTRY * count))
        entries[0::3] = array("q", stamps)
        entries[1::3] = seqs
        entries[2::3] = ends
        data = b"\n".join(lines)
        with self._files(source, segment.number) as (idx_fd, dat_fd):
            try:
                _write_all(dat_fd, data + b"\n" if len(data) < 1 << 16 else [data, b"\n"])
                _write_all(idx_fd, to_disk(entries))
            except BaseException:
                # e.g. a full disk: leave the segment as it was, so that the next
                # batch appends to a consistent index and data
                try:
                    os.ftruncate(dat_fd, segment.data_bytes)
                    os.ftruncate(idx_fd, segment.entries * ENTRY)
                except OSError:
                    pass
                raise
        segment.entries += count
        segment.data_bytes = ends[-1]
        segment.dirty = True

    def _current(self, source: _Source) -> _Segment:
        if not source.segments:
            source.segments.append(self._open_segment(source.name, 0, repair=False)[0])
        return source.segments[-1]

    def _roll(self, source: _Source) -> None:
        """Open the next tail segment; drop the oldest tail beyond the kept ones."""
        current = source.segments[-1]
        self._sync_segment(source.name, current)
        source.segments.append(self._open_segment(source.name, current.number + 1, repair=False)[0])
        tails = [s for s in source.segments if s.number > 0]
        if len(tails) <= TAIL_SEGMENTS:
            return
        oldest = tails[0]
        drop = source.drop
        idx_path, dat_path = segment_paths(self.directory, source.name, oldest.number)
        fd = os.open(idx_path, os.O_RDONLY)
        try:
            first = read_entries(fd, 0, 1)
            last = read_entries(fd, oldest.entries - 1, 1) if oldest.entries else first
        finally:
            os.close(fd)
        if drop.first_seq < 0 and first:
            drop.first_seq, drop.first_ts_ns = first[1], first[0]
        drop.lines += oldest.entries
        drop.bytes += oldest.cost
        if last:
            drop.last_seq = max(drop.last_seq, last[1])
        drop.through = oldest.number
        self._write_drop(source.name, drop)
        with self.lock:  # readers open files under the lock: none is half-deleted
            self._unlink(source.name, oldest.number)
            source.segments.remove(oldest)

    def _write_drop(self, name: str, drop: Drop) -> None:
        path = self.directory / f"{name}.drop"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(drop.__dict__))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._new_files = True

    def _publish(self) -> None:
        segments = tuple(
            SegmentView(name, s.number, s.entries, s.data_bytes)
            for name, source in self._sources.items()
            for s in source.segments
            if s.entries
        )
        drops = tuple(
            DropView(name, source.drop.lines, source.drop.bytes, source.drop.first_seq, source.drop.first_ts_ns)
            for name, source in self._sources.items()
            if source.drop.lines
        )
        with self.lock:
            self._view = JobView(self.directory, segments, drops)

    # -- syncing, reading state, closing ----------------------------------------------

    def sync(self) -> None:
        for name, source in self._sources.items():
            for segment in source.segments:
                self._sync_segment(name, segment)
        if self._new_files:
            self._new_files = False
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _sync_segment(self, source: str, segment: _Segment) -> None:
        if segment.dirty:
            with self._files(source, segment.number) as (idx_fd, dat_fd):
                os.fdatasync(dat_fd)
                os.fdatasync(idx_fd)
            segment.dirty = False

    def view(self) -> JobView:
        with self.lock:
            return self._view

    def resume_point(self, name: str) -> tuple[int, int] | None:
        """(last timestamp, how many of the source's newest lines have it)."""
        with self.lock:  # no segment is deleted meanwhile
            return self._resume_point(name)

    def _resume_point(self, name: str) -> tuple[int, int] | None:
        source = self._sources[name]
        if source.last_seq < 0:
            return None
        count = 0
        for segment in reversed(source.segments):
            if not segment.entries:
                continue
            idx_path, _ = segment_paths(self.directory, name, segment.number)
            fd = os.open(idx_path, os.O_RDONLY)
            try:
                position = segment.entries
                while position > 0:
                    first = max(position - 1024, 0)
                    entries = read_entries(fd, first, position - first)
                    stamps = entries[0::3]
                    for stamp in reversed(stamps):
                        if stamp != source.last_ts:
                            return source.last_ts, count
                        count += 1
                    position = first
            finally:
                os.close(fd)
        return source.last_ts, count

    def lines_since(self, name: str, since_ns: int) -> int:
        """How many stored lines of the source carry a timestamp >= ``since_ns``
        (the newest ones: timestamps never decrease within a source)."""
        with self.lock:  # no segment is deleted meanwhile
            count = 0
            for segment in reversed(self._sources[name].segments):
                if not segment.entries:
                    continue
                idx_path, _ = segment_paths(self.directory, name, segment.number)
                fd = os.open(idx_path, os.O_RDONLY)
                try:
                    position = segment.entries
                    while position > 0:
                        first = max(position - 1024, 0)
                        stamps = read_entries(fd, first, position - first)[0::3]
                        for stamp in reversed(stamps):
                            if stamp < since_ns:
                                return count
                            count += 1
                        position = first
                finally:
                    os.close(fd)
            return count

    def newest_timestamp(self) -> int | None:
        """The newest stored timestamp of any source (None: no lines)."""
        stamps = [s.last_ts for s in self._sources.values() if s.last_seq >= 0]
        return max(stamps) if stamps else None

    def stats(self) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """Lines, bytes and dropped lines per source."""
        with self.lock:
            lines = {n: sum(s.entries for s in src.segments) for n, src in self._sources.items()}
            size = {n: sum(s.cost for s in src.segments) for n, src in self._sources.items()}
            dropped = {n: src.drop.lines for n, src in self._sources.items()}
        return lines, size, dropped

    def close(self) -> None:
        self.sync()


def _write_all(fd: int, data: bytes | Iterable[bytes]) -> None:
    if isinstance(data, bytes):
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        return
    parts: Sequence[bytes] = list(data)
    for part in parts:
        _write_all(fd, part)
