"""LogStore: every job's log on disk. It opens each job's JobLog (joblog.py: the
batching writer), answers FetchLogs queries (query.py) and deletes logs.

Queries read the files after a flush of everything appended before them, so
what a ``flush()`` made durable, and anything written since, is in the answer;
a query of an open log goes through that log's served mark (served.py), so a
poller never misses a line that arrives late.

Per job, at most one JobLog is open. Opening a job whose JobLog is closing or
being deleted waits for that to finish before reading the files: the store
keeps a gate per such job (fired when the close or the delete is done), and a
new JobLog's writer, a query of a job without an open JobLog, and a delete, wait
on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from fluster_worker.common.threads import BlockingPool
from fluster_worker.common.waiters import Once
from fluster_worker.logs.disk import JobFiles
from fluster_worker.logs.ingest import IngestBudget
from fluster_worker.logs.joblog import JobLog, LogWriteError
from fluster_worker.logs.layout import LINE_OVERHEAD, job_directory, read_view, remove_job_directory
from fluster_worker.logs.model import (
    DEFAULT_MAX_LINE_BYTES,
    SOURCES,
    LogLine,
    LogQuery,
    LogStats,
)
from fluster_worker.logs.query import Page, compile_query, run_query
from fluster_worker.logs.runs import ReadStats

DEFAULT_MAX_STREAM_BYTES = 100 * 2**20
DEFAULT_QUERY_BUDGET_S = 5.0
DEFAULT_BATCH_DELAY_S = 0.02

__all__ = ["DEFAULT_MAX_STREAM_BYTES", "JobLog", "LogStore", "LogWriteError"]


class LogStore:
    """Every job's log under ``root`` (``root/<job key>/``, see layout.py)."""

    log = Logger()

    def __init__(
        self,
        root: Path,
        pool: BlockingPool,
        reactor: Any,
        *,
        max_stream_bytes: int = DEFAULT_MAX_STREAM_BYTES,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        query_budget_s: float = DEFAULT_QUERY_BUDGET_S,
        batch_delay_s: float = DEFAULT_BATCH_DELAY_S,
        page: Page | None = None,
        ingest: IngestBudget | None = None,
    ) -> None:
        """``ingest`` is the reactor time the followers of these logs may parse
        with (ingest.py; one per worker, made here by default)."""
        if max_stream_bytes < 1024:
            raise ValueError("max_stream_bytes must be at least 1024")
        self.root = Path(root)
        self.pool = pool
        self.reactor = reactor
        self.max_stream_bytes = max_stream_bytes
        self.max_line_bytes = max_line_bytes
        self.query_budget_s = query_budget_s
        self.batch_delay_s = batch_delay_s
        self.page = page or Page()  # the most one query answers (query.py)
        self.ingest = ingest if ingest is not None else IngestBudget(reactor)
        self.bytes_read = 0  # by queries, since start
        self._logs: dict[str, JobLog] = {}
        self._gates: dict[str, Once[None]] = {}
        self._counts: dict[str, int] = {}

    def open(self, job_id: str) -> JobLog:
        """The job's log, created or reopened (raises ValueError for a job id that
        is not a plain file name)."""
        directory = job_directory(self.root, job_id)
        existing = self._logs.get(job_id)
        if existing is not None:
            return existing
        job_log = JobLog(self, job_id, JobFiles(directory, self.max_stream_bytes), self._gates.get(job_id))
        self._logs[job_id] = job_log
        return job_log

    def query(self, job_id: str, q: LogQuery) -> Deferred[list[LogLine]]:
        """FetchLogs (see LogQuery), at most ``page``. Fails with InvalidLogQuery for a query that
        cannot be run, LogQueryTimeout when a regex scan passes its budget. An
        unknown job has no lines."""

        async def run() -> list[LogLine]:
            plan = compile_query(q)
            try:
                directory = job_directory(self.root, job_id)
            except ValueError:
                return []
            job_log = self._logs.get(job_id)
            gate = self._gates.get(job_id)
            if job_log is None and gate is not None:
                await gate.wait()
                job_log = self._logs.get(job_id)
            stats = ReadStats()

            def read(live: JobLog | None) -> list[LogLine]:
                # A segment can vanish between taking a view and opening its files
                # (the cap drops the oldest tail segment; a delete): take a new view.
                for _ in range(3):
                    view = live.view() if live is not None else read_view(directory)
                    if view is None:
                        return []
                    try:
                        return run_query(view, plan, stats, self.query_budget_s, page=self.page)
                    except FileNotFoundError:
                        continue
                return []

            def read_live(live: JobLog) -> list[LogLine]:
                return live.served(lambda: read(live))

            try:
                if job_log is None:
                    return await self.pool.run(read, None)
                await job_log.ready()
                try:
                    await job_log.flush(sync=False)
                except LogWriteError:
                    pass  # answer with what is on disk
                return await self.pool.run(read_live, job_log)
            finally:
                self.bytes_read += stats.bytes

        return Deferred.fromCoroutine(run())

    def delete(self, job_id: str) -> Deferred[None]:
        """Remove the job's logs (an open JobLog stops taking lines)."""

        async def run() -> None:
            directory = job_directory(self.root, job_id)
            while job_id in self._gates:
                await self._gates[job_id].wait()
            gate: Once[None] = Once()
            self._gates[job_id] = gate
            try:
                job_log = self._logs.pop(job_id, None)
                if job_log is not None:
                    await job_log.discard()
                await self.pool.run(remove_job_directory, directory)
                self._counts.pop(job_id, None)
            finally:
                del self._gates[job_id]
                gate.fire(None)

        return Deferred.fromCoroutine(run())

    def close_all(self) -> Deferred[None]:
        """Close every open JobLog (worker shutdown): pending lines are written
        and synced."""

        async def run() -> None:
            for job_log in list(self._logs.values()):
                await job_log.close()

        return Deferred.fromCoroutine(run())

    def line_count(self, job_id: str) -> int:
        """Lines stored for the job: exact for open logs, and for logs closed or
        queried since the worker started; 0 for others (see ``stats``)."""
        job_log = self._logs.get(job_id)
        if job_log is not None:
            return job_log.line_count
        return self._counts.get(job_id, 0)

    def stats(self, job_id: str) -> Deferred[LogStats | None]:
        """Lines, bytes and dropped lines per source; None for an unknown job."""

        async def run() -> LogStats | None:
            job_log = self._logs.get(job_id)
            if job_log is not None:
                return await job_log.stats()
            try:
                directory = job_directory(self.root, job_id)
            except ValueError:
                return None
            view = await self.pool.run(read_view, directory)
            if view is None:
                return None
            lines = {s: 0 for s in SOURCES}
            size = {s: 0 for s in SOURCES}
            dropped = {s: 0 for s in SOURCES}
            for segment in view.segments:
                lines[segment.source] += segment.entries
                size[segment.source] += segment.data_bytes + segment.entries * (LINE_OVERHEAD - 1)
            for drop in view.drops:
                dropped[drop.source] += drop.lines
            self._counts[job_id] = sum(lines.values())
            return LogStats(sum(lines.values()), lines, size, dropped)

        return Deferred.fromCoroutine(run())

    # -- LogOwner: what JobLogs tell their store ----------------------------------

    def log_closing(self, job_log: JobLog, closed: Once[None]) -> None:
        if self._logs.get(job_log.job_id) is job_log:
            del self._logs[job_log.job_id]
            self._gates[job_log.job_id] = closed

    def log_closed(self, job_log: JobLog, closed: Once[None]) -> None:
        self._counts[job_log.job_id] = job_log.committed_lines
        if self._gates.get(job_log.job_id) is closed:
            del self._gates[job_log.job_id]
