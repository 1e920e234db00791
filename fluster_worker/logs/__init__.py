"""Job logs: live tail of containers (``docker logs -f``), storage on disk with
caps and an index, and FetchLogs queries.

* ``LogStore`` (store.py): opens each job's log, answers queries, deletes logs.
* ``JobLog`` (joblog.py): one job's log, open for appending; the batching
  writer (batch.py: pending lines and flush waiters); served.py: the served
  mark that keeps late lines from landing behind a poller's cursor.
* ``LogFollower`` (tail.py): a running container's output into its JobLog,
  without gaps or duplicates across restarts of the tail (resume.py: the
  per-stream cursor; docker_cli.py: the ``docker logs`` processes).
* layout.py: the on-disk format and reading it; disk.py: JobFiles, the files'
  writer and the cap; query.py: FetchLogs semantics, regex handling; runs.py:
  the segments as sorted runs; lines.py: parsing ``docker logs --timestamps``
  output.
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
from fluster_worker.logs.query import Page
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
    "Page",
    "StreamParser",
    "parse_timestamp",
]
