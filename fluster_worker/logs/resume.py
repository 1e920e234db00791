"""StreamCursor: where a LogFollower (tail.py) is in one stream of a container's
output, so that a restarted ``docker logs`` neither loses nor repeats a line.

The cursor remembers the timestamp of the last line stored and how many stored
lines of the stream carry it. After a restart (``restart``), re-delivered lines
older than that timestamp are skipped, then as many lines with exactly that
timestamp as were stored; everything after is new (``accept``). The same
happens when a tail goes back in time by itself (Docker 20.10 re-reads a
rotated log file), and a line with the stamp and bytes of the line stored just
before it is that line again. It also keeps
the newest stored lines, to tell whether Docker's last entries are stored
(``ends_like``).

A follower that resumes from lines stored by an earlier process (a restarted
worker) cannot trust their timestamps: a stored line may have been moved a few
milliseconds later so that a poller sees it (served.py). So such a stream starts
counting instead (``resume``): the tail starts at a fixed ``--since`` and the
first ``count`` lines Docker sends of this stream, the stored lines stamped at
or after that moment, are skipped (and remembered as if stored now, with
Docker's own timestamps); from the first new line on, the cursor works as above.
This holds as long as no stored line was moved by more than the margin between
that moment and the oldest stream's last stored line.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Collection

from fluster_worker.logs.joblog import JobLog
from fluster_worker.logs.lines import StreamParser

CHECK_LINES = 16  # entries compared when the container has exited


class StreamCursor:
    """One stream (stdout or stderr) of a followed container."""

    __slots__ = (
        "source", "parser", "last_ts", "count", "skip_ts", "skip_left", "recent", "resume_count", "skip_count"
    )

    def __init__(self, source: str, max_line_bytes: int) -> None:
        self.source = source
        self.parser = StreamParser(max_line_bytes)
        self.last_ts: int | None = None  # timestamp of the last stored line
        self.count = 0  # stored lines of this stream with that timestamp
        self.skip_ts: int | None = None  # after a restart: skip up to (skip_ts, skip_left)
        self.skip_left = 0
        self.recent: list[tuple[int, bytes]] = []  # the newest stored lines
        # Counting (see the module doc): lines to skip from the resume moment on.
        self.resume_count: int | None = None
        self.skip_count = 0

    @property
    def counting(self) -> bool:
        """Still skipping lines an earlier process stored (the tail must start
        at the resume moment)."""
        return self.resume_count is not None

    def resume(self, count: int) -> None:
        """Skip the first ``count`` lines of every tail until they are past."""
        self.resume_count = count if count > 0 else None
        self.skip_count = 0

    def restart(self, max_line_bytes: int) -> None:
        """A new tail starts: parse afresh, and skip what is stored already."""
        self.parser = StreamParser(max_line_bytes)
        if self.resume_count is not None:
            self.skip_count = self.resume_count
            self.last_ts, self.count, self.recent = None, 0, []
            self.skip_ts = None
            return
        self.skip_ts = self.last_ts
        self.skip_left = self.count

    def accept(self, stamps: list[int], lines: list[bytes]) -> tuple[list[int], list[bytes]]:
        """The lines of a parsed read that were not stored before; the cursor
        moves past them (the caller stores them)."""
        if not lines:
            return stamps, lines
        if self.skip_count > 0:
            n = min(self.skip_count, len(lines))
            self._track(stamps[:n], lines[:n])
            self.skip_count -= n
            if self.skip_count == 0:
                self.resume_count = None  # past what was stored: as usual from here
            stamps, lines = stamps[n:], lines[n:]
            if not lines:
                return stamps, lines
        if self.skip_ts is None and self._in_order(stamps, lines):
            self._track(stamps, lines)  # the common case: all new, in order
            return stamps, lines
        kept_stamps: list[int] = []
        kept_lines: list[bytes] = []
        previous = self.recent[-1] if self.recent else None
        for ts, line in zip(stamps, lines, strict=True):
            if self.skip_ts is None and self.last_ts is not None and ts < self.last_ts:
                # Docker went back: Docker 20.10's ``logs --follow`` reads a rotated
                # json-file log again. Skip what is stored, as after a restart.
                self.skip_ts, self.skip_left = self.last_ts, self.count
            if self.skip_ts is not None:
                if ts < self.skip_ts:
                    self.skip_left = self.count  # (back again: the stored lines at skip_ts come again)
                    continue
                if ts == self.skip_ts and self.skip_left > 0:
                    self.skip_left -= 1
                    continue
                self.skip_ts = None  # the first line not stored before
            if (ts, line) == previous:
                continue  # the line stored last, sent again (see _in_order)
            kept_stamps.append(ts)
            kept_lines.append(line)
            previous = (ts, line)
            if ts == self.last_ts:
                self.count += 1
            else:
                self.last_ts, self.count = ts, 1
        self._remember(kept_stamps, kept_lines)
        return kept_stamps, kept_lines

    def _in_order(self, stamps: list[int], lines: list[bytes]) -> bool:
        """No stamp goes back and none repeats. Docker stamps every line on its
        own, in nanoseconds: a line with the stamp and the bytes of the line
        before it in its stream is that line again (a rotated file re-read from
        exactly there), not a new one."""
        if self.last_ts is not None and stamps[0] <= self.last_ts:
            if stamps[0] < self.last_ts or (self.recent and self.recent[-1] == (stamps[0], lines[0])):
                return False
        following = itertools.islice(stamps, 1, None)
        return not any(map(operator.ge, stamps, following))

    def _track(self, stamps: list[int], lines: list[bytes]) -> None:
        """The cursor moves past stored lines."""
        last = stamps[-1]
        same = 1
        while same < len(stamps) and stamps[-1 - same] == last:
            same += 1
        if same == len(stamps) and last == self.last_ts:
            self.count += same
        else:
            self.count = same
        self.last_ts = last
        self._remember(stamps, lines)

    def _remember(self, stamps: list[int], lines: list[bytes]) -> None:
        self.recent = (self.recent + list(zip(stamps[-CHECK_LINES:], lines[-CHECK_LINES:], strict=True)))[-CHECK_LINES:]

    def ends_like(self, window: list[tuple[int, bytes]]) -> bool:
        """Whether Docker's last entries of this stream (``window``: timestamp,
        data) end the way the stored lines do: the same timestamps and data, and
        no more lines with the last timestamp than stored. An empty window is
        fine (no output)."""
        if not window:
            return True
        k = min(len(window), len(self.recent))
        if k == 0 or window[-k:] != self.recent[-k:]:
            return False
        return sum(1 for ts, _ in window if ts == self.last_ts) <= self.count


async def resume_streams(job_log: JobLog, streams: Collection[StreamCursor], margin_ns: int) -> int | None:
    """Resume ``streams`` from what ``job_log`` holds (a restarted worker): the
    fixed ``--since`` the tail starts at, ``margin_ns`` before the oldest
    stream's last stored line, each stream counting the lines stored from that
    moment on (see the module doc); None when no stream has a stored line."""
    stored = []
    for stream in streams:
        point = await job_log.resume_point(stream.source)
        if point is not None:
            stored.append(point[0])
    if not stored:
        return None
    since = max(min(stored) - margin_ns, 0)
    for stream in streams:
        stream.resume(await job_log.lines_since(stream.source, since))
    return since


def tail_since(streams: Collection[StreamCursor], resume_since: int | None, margin_ns: int) -> int | None:
    """Where a (re)started tail starts (``--since``, ns): the fixed resume
    moment while a stream still counts, else ``margin_ns`` before the oldest of
    the streams' last stored lines; None (from the start) when none has one."""
    if resume_since is not None and any(s.counting for s in streams):
        return resume_since
    known = [s.last_ts for s in streams if s.last_ts is not None]
    if known:
        return max(min(known) - margin_ns, 0)
    return None
