"""The on-disk format of one job's log, and reading it without a writer.
Everything here blocks: it runs in the BlockingPool. The writer is JobFiles
(disk.py); the queries are in query.py.

Layout (``<root>/<job key>/``, see ``common.jobnames``), per source (stdout, stderr, build, error):

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
the segments by (timestamp_ms, seq) (see query.py). Segment 0 is the head; tail
segments 1, 2, ... hold the newest lines once the head is full (the cap, see
disk.py); tail segments up to ``through`` in ``.drop`` were deleted.

Whole entries: a batch writes the .dat first, then the .idx, so after a crash
an index may end in entries whose lines are not (entirely) in the .dat. An entry
is whole when its line lies entirely in the .dat (its end byte is a ``\\n``, ends
and seqs increase); ``valid_entries`` finds the last one. JobFiles repairs a
segment to it on open; ``read_view`` (for a job no writer has open) skips what
lies beyond it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path

from fluster_worker.common.jobnames import job_key
from fluster_worker.logs.model import SOURCES

ENTRY = 24  # bytes of one index entry
LINE_OVERHEAD = 1 + ENTRY  # bytes a line costs beyond its data: newline + index entry
TAIL_SEGMENTS = 4  # tail segments kept per source
_NATIVE_LE = sys.byteorder == "little"
SEGMENT_NAME = re.compile(r"(stdout|stderr|build|error)\.(\d{1,9})\.(idx|dat)")


def job_directory(root: Path, job_id: str) -> Path:
    """``root/<job_key(job_id)>`` (common.jobnames: a plain child name, derived
    injectively from the id); ValueError for an invalid id."""
    return root / job_key(job_id)


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
class Drop:
    lines: int = 0
    bytes: int = 0
    first_seq: int = -1
    first_ts_ns: int = 0
    last_seq: int = -1
    through: int = 0  # highest tail segment number deleted


def segment_paths(directory: Path, source: str, number: int) -> tuple[Path, Path]:
    return directory / f"{source}.{number}.idx", directory / f"{source}.{number}.dat"


def list_segments(directory: Path) -> dict[str, list[int]]:
    """Segment numbers per source, by their index files."""
    found: dict[str, list[int]] = {s: [] for s in SOURCES}
    for name in os.listdir(directory):
        m = SEGMENT_NAME.fullmatch(name)
        if m and m.group(3) == "idx":
            found[m.group(1)].append(int(m.group(2)))
    for numbers in found.values():
        numbers.sort()
    return found


def read_drop(directory: Path, source: str) -> Drop:
    try:
        raw = (directory / f"{source}.drop").read_text()
    except FileNotFoundError:
        return Drop()
    try:
        values = json.loads(raw)
        return Drop(**{k: int(values[k]) for k in Drop.__dataclass_fields__})
    except (ValueError, KeyError, TypeError):
        return Drop()  # a torn meta file: the marker loses its numbers, nothing else


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
