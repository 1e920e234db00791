"""A job's log as sorted runs, for query.py: each segment of the job (layout.py)
is a run sorted by (timestamp, seq), read through its fixed-width index; a
source whose cap dropped lines adds a run of one virtual marker line,
``[fluster: N lines (M bytes) of stdout dropped]``, at the timestamp and seq of
the first dropped line. ``ReadStats`` counts what the reads cost."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fluster_worker.logs.layout import ENTRY, JobView, from_disk, segment_paths


@dataclass
class ReadStats:
    bytes: int = 0
    reads: int = 0


class Run:
    """A sorted run of lines: a segment's index and data, or one virtual line."""

    source: str
    length: int
    stamps: Sequence[int]  # for bisect: timestamp_ns of each line
    seqs: Sequence[int]

    def read(self, start: int, stop: int) -> tuple[Sequence[int], Sequence[int], list[bytes]]:
        raise NotImplementedError

    def keys(self, start: int, stop: int) -> tuple[Sequence[int], Sequence[int]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Column(Sequence[int]):
    """One field of a segment's index, read entry by entry (for bisect)."""

    def __init__(self, run: _SegmentRun, field: int) -> None:
        self._run = run
        self._field = field

    def __len__(self) -> int:
        return self._run.length

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            raise TypeError("no slices")
        if i < 0:
            i += self._run.length
        return self._run.entry(i)[self._field]


class _SegmentRun(Run):
    def __init__(self, view: JobView, source: str, number: int, length: int, stats: ReadStats) -> None:
        self.source = source
        self.length = length
        self._stats = stats
        idx_path, dat_path = segment_paths(view.directory, source, number)
        self._idx = os.open(idx_path, os.O_RDONLY)
        try:
            self._dat = os.open(dat_path, os.O_RDONLY)
        except BaseException:
            os.close(self._idx)
            raise
        self.stamps = _Column(self, 0)
        self.seqs = _Column(self, 1)

    def _pread(self, fd: int, size: int, offset: int) -> bytes:
        raw = os.pread(fd, size, offset)
        self._stats.bytes += len(raw)
        self._stats.reads += 1
        if len(raw) != size:
            raise OSError(f"short read of a log segment of {self.source}")
        return raw

    def entry(self, i: int) -> tuple[int, int, int]:
        e = from_disk(self._pread(self._idx, ENTRY, i * ENTRY))
        return e[0], e[1], e[2]

    def _entries(self, start: int, stop: int) -> Any:
        first = max(start - 1, 0)  # the end of the line before ``start`` is its start
        return first, from_disk(self._pread(self._idx, (stop - first) * ENTRY, first * ENTRY))

    def keys(self, start: int, stop: int) -> tuple[Sequence[int], Sequence[int]]:
        if start >= stop:
            return [], []
        entries = from_disk(self._pread(self._idx, (stop - start) * ENTRY, start * ENTRY))
        return entries[0::3], entries[1::3]

    def read(self, start: int, stop: int) -> tuple[Sequence[int], Sequence[int], list[bytes]]:
        if start >= stop:
            return [], [], []
        first, entries = self._entries(start, stop)
        ends = entries[2::3]
        if first < start:
            begin = ends[0]
            ends = ends[1:]
            entries = entries[3:]
        else:
            begin = 0
        data = self._pread(self._dat, ends[-1] - begin, begin)
        lines = []
        position = 0
        for end in ends:
            end -= begin
            lines.append(data[position : end - 1])
            position = end
        return entries[0::3], entries[1::3], lines

    def close(self) -> None:
        os.close(self._idx)
        os.close(self._dat)


class _MarkerRun(Run):
    def __init__(self, source: str, lines: int, size: int, seq: int, timestamp_ns: int) -> None:
        self.source = source
        self.length = 1
        self.stamps = [timestamp_ns]
        self.seqs = [seq]
        text = f"[fluster: {lines} lines ({size} bytes) of {source} dropped]"
        self._data = text.encode()

    def keys(self, start: int, stop: int) -> tuple[Sequence[int], Sequence[int]]:
        return self.stamps[start:stop], self.seqs[start:stop]

    def read(self, start: int, stop: int) -> tuple[Sequence[int], Sequence[int], list[bytes]]:
        return self.stamps[start:stop], self.seqs[start:stop], [self._data][start:stop]


def open_runs(view: JobView, sources: Sequence[str], stats: ReadStats) -> list[Run]:
    runs: list[Run] = []
    try:
        for segment in view.segments:
            if segment.source in sources and segment.entries:
                runs.append(_SegmentRun(view, segment.source, segment.number, segment.entries, stats))
        for drop in view.drops:
            if drop.source in sources and drop.first_seq >= 0:
                runs.append(_MarkerRun(drop.source, drop.lines, drop.bytes, drop.first_seq, drop.first_ts_ns))
    except BaseException:
        for run in runs:
            run.close()
        raise
    return runs
