"""Whether a tail stored everything: a container's last log entries (``docker
logs --tail N --timestamps``, per stream) held against the streams' cursors.

Docker 20.10's ``logs -f`` sometimes exits 0 before it has sent everything when
a container exits while the tail lags behind. Docker sends entries in file
order, so the last one being stored means all are (``all_stored``); otherwise,
or when unsure, the LogFollower reads the rest with one more tail. While a
tail delivers nothing, ``newer_entry`` tells whether the engine's log moved on
without it (stall.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from fluster_worker.logs.docker_cli import DockerLogsCli
from fluster_worker.logs.lines import StreamParser
from fluster_worker.logs.resume import CHECK_LINES, StreamCursor

__all__ = ["LastEntries", "all_stored", "newer_entry"]

log = Logger()


class LastEntries:
    """Reads a container's last entries. ``fetch(n)``, when given, fetches the
    last ``n`` timestamped entries per stream ({1: stdout bytes, 2: stderr
    bytes}, as ``docker logs --tail n --timestamps`` prints them) without a
    process, e.g. through the Docker API on a thread pool; else the CLI is
    spawned."""

    def __init__(
        self,
        cli: DockerLogsCli,
        fetch: Callable[[int], Deferred[dict[int, bytes]]] | None,
        container_id: str,
    ) -> None:
        self._cli = cli
        self._fetch = fetch
        self._container_id = container_id

    async def read(self, count: int) -> dict[int, bytes] | None:
        """The last ``count`` entries per stream, or None when unknown."""
        if self._fetch is not None:
            try:
                return await self._fetch(count)
            except Exception:
                log.failure("reading the last log entries of {cid} failed", cid=self._container_id)
                return None
        return await self._cli.last_entries(count)

    async def stored(self, streams: Mapping[int, StreamCursor], max_line_bytes: int) -> bool:
        """Whether the container's last ``CHECK_LINES`` entries are stored;
        anything unclear answers False (one more tail then reads the rest)."""
        output = await self.read(CHECK_LINES)
        return output is not None and all_stored(output, streams, max_line_bytes)


def all_stored(output: Mapping[int, bytes], streams: Mapping[int, StreamCursor], max_line_bytes: int) -> bool:
    """Whether the last entries in ``output`` ({fd: raw bytes}) are stored. The
    last ``CHECK_LINES`` entries must end each stream the way the stored lines
    do (same timestamps and data, and no more lines with the last timestamp
    than stored). Anything unclear answers False."""
    for fd, raw in output.items():
        parser = StreamParser(max_line_bytes)
        stamps, lines = parser.feed(raw)
        more_stamps, more_lines = parser.finish()
        window = list(zip(stamps + more_stamps, lines + more_lines, strict=True))
        if not window:
            continue
        stream = streams.get(fd)
        if stream is None or not stream.ends_like(window):
            return False
    return True


def newer_entry(output: Mapping[int, bytes], streams: Mapping[int, StreamCursor], max_line_bytes: int) -> bool:
    """Whether ``output`` holds an entry newer than the stored ones."""
    for fd, raw in output.items():
        parser = StreamParser(max_line_bytes)
        stamps = parser.feed(raw)[0] + parser.finish()[0]
        stream = streams.get(fd)
        if stream is not None and stamps and (stream.last_ts is None or stamps[-1] > stream.last_ts):
            return True
    return False
