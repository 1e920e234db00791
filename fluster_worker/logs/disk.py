"""The on-disk format of one job's log, and its writer. Everything here blocks:
it runs in the BlockingPool, one writer operation at a time per job.

Layout (``<root>/<job_id>/``), per source (stdout, stderr, build, error):

* ``<source>.<n>.dat``: the lines' UTF-8 data, each followed by ``\\n`` (so
  ``cat`` shows the log); nothing else.
* ``<source>.<n>.idx``: one fixed-width entry per line, three little-endian
  int64: ``timestamp_ns``, ``seq``, ``end`` (offset just past the line's
  ``\\n`` in the .dat). The line is ``dat[previous end : end - 1]``.
* ``<source>.drop``: JSON, present once the cap dropped lines:
  ``{"lines", "bytes", "first_seq", "first_ts_ns", "last_seq", "through"}``.

``seq`` numbers the lines of a job in arrival order across all sources. Within
a source, entries are in seq order and timestamps never decrease (a timestamp
smaller than its predecessor's, e.g. after a clock step, is stored as the
predecessor's), so each segment is sorted by (timestamp, seq): a time window is a
binary search, line N of a segment is entry N, and the job's order is a merge of
the segments by (timestamp_ms, seq) (see query.py).

Segments and the cap: segment 0 is the head. Once a source's head reaches
``cap / 2`` bytes (data + newline + 24 bytes of index per line), its later lines
go to tail segments 1, 2, ... of ``cap / 8`` bytes each; when a fifth tail
segment opens, the oldest is deleted and counted in ``.drop``. A source thus
holds at most about ``cap`` bytes (the head, and between 3/8 and 1/2 of the cap
of its newest lines), and reading shows head, a marker line, then the tail.

Crash safety: a batch writes the .dat first, then the .idx. On open, each
segment's index is cut to its last entry whose line lies entirely in the .dat
(its end byte is a ``\\n``, ends and seqs increase), the .idx to whole entries and
the .dat to that entry's end: a torn batch is dropped as a whole line at a time,
never half a line. ``sync`` (fdatasync of the files written since the last sync,
and of the directory after creating files) makes what was written durable.
"""

from __future__ import annotations

import json
import operator
import os
import re
import shutil
import sys
import threading
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

from fluster_worker.logs.model import SOURCES

ENTRY = 24  # bytes of one index entry
LINE_OVERHEAD = 1 + ENTRY  # bytes a line costs beyond its data: newline + index entry
TAIL_SEGMENTS = 4  # tail segments kept per source
_NATIVE_LE = sys.byteorder == "little"
_SEGMENT_NAME = re.compile(r"(stdout|stderr|build|error)\.(\d{1,9})\.(idx|dat)")
_JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")


def job_directory(root: Path, job_id: str) -> Path:
    """``root/job_id``, refusing anything that is not a plain child name."""
    if not isinstance(job_id, str) or _JOB_ID.fullmatch(job_id) is None:
        raise ValueError(f"invalid job id {str(job_id)[:64]!r}")
    path = root / job_id
    if path.parent != root or path.name != job_id:
        raise ValueError(f"invalid job id {job_id[:64]!r}")
    return path


def to_disk(values: array) -> bytes:  # type: ignore[type-arg]
    if not _NATIVE_LE:
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def from_disk(raw: bytes) -> array:  # type: ignore[type-arg]
    values = array("q")
    values.frombytes(raw)
    if not _NATIVE_LE:
        values.byteswap()
    return values


def read_entries(fd: int, first: int, count: int) -> array:  # type: ignore[type-arg]
    """Entries [first, first + count) of an index file, flattened (ts, seq, end, ...)."""
    raw = os.pread(fd, count * ENTRY, first * ENTRY)
    return from_disk(raw[: len(raw) - len(raw) % ENTRY])


def valid_entries(idx_fd: int, dat_fd: int) -> tuple[int, int]:
    """How many entries of a segment are whole (see the module doc), and the end
    of the last one. Reads only the entries it drops, plus two."""
    count = os.fstat(idx_fd).st_size // ENTRY
    dat_size = os.fstat(dat_fd).st_size
    while count > 0:
        pair = read_entries(idx_fd, max(count - 2, 0), min(count, 2))
        _, seq, end = pair[-3:]
        prev_seq, prev_end = (pair[1], pair[2]) if count >= 2 else (-1, 0)
        if prev_end < end <= dat_size and seq > prev_seq and os.pread(dat_fd, 1, end - 1) == b"\n":
            return count, end
        count -= 1
    return 0, 0


@dataclass(frozen=True)
class SegmentView:
    source: str
    number: int  # 0 = head
    entries: int
    data_bytes: int


@dataclass(frozen=True)
class DropView:
    source: str
    lines: int
    bytes: int
    first_seq: int
    first_ts_ns: int


@dataclass(frozen=True)
class JobView:
    """What a reader may read: committed entries only."""

    directory: Path
    segments: tuple[SegmentView, ...]
    drops: tuple[DropView, ...]


@dataclass
class _Drop:
    lines: int = 0
    bytes: int = 0
    first_seq: int = -1
    first_ts_ns: int = 0
    last_seq: int = -1
    through: int = 0  # highest tail segment number deleted


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
    drop: _Drop = field(default_factory=_Drop)
    last_ts: int = -(2**63)
    last_seq: int = -1


def segment_paths(directory: Path, source: str, number: int) -> tuple[Path, Path]:
    return directory / f"{source}.{number}.idx", directory / f"{source}.{number}.dat"


def list_segments(directory: Path) -> dict[str, list[int]]:
    """Segment numbers per source, by their index files."""
    found: dict[str, list[int]] = {s: [] for s in SOURCES}
    for name in os.listdir(directory):
        m = _SEGMENT_NAME.fullmatch(name)
        if m and m.group(3) == "idx":
            found[m.group(1)].append(int(m.group(2)))
    for numbers in found.values():
        numbers.sort()
    return found


def read_drop(directory: Path, source: str) -> _Drop:
    try:
        raw = (directory / f"{source}.drop").read_text()
    except FileNotFoundError:
        return _Drop()
    try:
        values = json.loads(raw)
        return _Drop(**{k: int(values[k]) for k in _Drop.__dataclass_fields__})
    except (ValueError, KeyError, TypeError):
        return _Drop()  # a torn meta file: the marker loses its numbers, nothing else


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
            m = _SEGMENT_NAME.fullmatch(name)
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

    def _write_drop(self, name: str, drop: _Drop) -> None:
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


def remove_job_directory(directory: Path) -> None:
    """Delete a job's log directory (not following symlinks out of it)."""
    if directory.is_symlink():
        directory.unlink()
    elif directory.exists():
        shutil.rmtree(directory)


def read_view(directory: Path) -> JobView | None:
    """The committed lines of a job that no writer has open (None: no such job).
    Torn tails (a crash mid-batch) are skipped, not repaired."""
    try:
        found = list_segments(directory)
    except (FileNotFoundError, NotADirectoryError):
        return None
    segments = []
    drops = []
    for name, numbers in found.items():
        drop = read_drop(directory, name)
        if drop.lines and drop.first_seq >= 0:
            drops.append(DropView(name, drop.lines, drop.bytes, drop.first_seq, drop.first_ts_ns))
        for number in numbers:
            if number and number <= drop.through:
                continue
            idx_path, dat_path = segment_paths(directory, name, number)
            try:
                idx_fd = os.open(idx_path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                dat_fd = os.open(dat_path, os.O_RDONLY)
            except FileNotFoundError:
                os.close(idx_fd)
                continue
            try:
                count, end = valid_entries(idx_fd, dat_fd)
            finally:
                os.close(idx_fd)
                os.close(dat_fd)
            if count:
                segments.append(SegmentView(name, number, count, end))
    return JobView(directory, tuple(segments), tuple(drops))
