"""Job logs: live tail of containers (``docker logs -f``), storage on disk with
caps and an index, and FetchLogs queries.

* ``LogStore`` / ``JobLog`` (store.py): append, flush, close, delete, query.
* ``LogFollower`` (tail.py): a running container's output into its JobLog,
  without gaps or duplicates across restarts of the tail.
* disk.py: the on-disk format; query.py: FetchLogs semantics, regex handling;
  lines.py: parsing ``docker logs --timestamps`` output.
"""

from fluster_worker.logs.lines import StreamParser, parse_timestamp
from fluster_worker.logs.model import (
    DEFAULT_MAX_LINE_BYTES,
    MAX_REGEX_CHARS,
    SOURCES,
    InvalidLogQuery,
    LogLine,
    LogQuery,
    LogQueryTimeout,
    LogStats,
)
from fluster_worker.logs.store import DEFAULT_MAX_STREAM_BYTES, JobLog, LogStore, LogWriteError
from fluster_worker.logs.tail import FollowStopped, LogFollower, LogTailError

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "DEFAULT_MAX_STREAM_BYTES",
    "MAX_REGEX_CHARS",
    "SOURCES",
    "FollowStopped",
    "InvalidLogQuery",
    "JobLog",
    "LogFollower",
    "LogLine",
    "LogQuery",
    "LogQueryTimeout",
    "LogStats",
    "LogStore",
    "LogTailError",
    "LogWriteError",
    "StreamParser",
    "parse_timestamp",
]
