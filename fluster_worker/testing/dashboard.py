"""Test doubles for the dashboard, its API and the metrics (``fluster_worker.web.app``).

- `FakeLogs`: the LogStore's read side in memory (``query`` with the LogQuery
  semantics the pages use, ``line_count``, ``bytes_read``).
- `FakeManager`: a JobManager's queries, listeners and ``kill`` over ``jobs``; `changed` fires
  the listeners as the real manager does on every state or phase change.
- `FakeWorker`: what ``build_app`` reads from a Worker, on a ``task.Clock``.
- `make_record`: JobRecords in any state, with a plausible timeline.
- `FakeRegistration`: ``connected`` / ``last_heartbeat_ms``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from fluster_worker.common.threads import BlockingPool
from fluster_worker.config import WorkerConfig
from fluster_worker.jobs.model import (
    BuildInfo,
    JobNotFound,
    JobRecord,
    JobSpec,
    JobState,
    PreconditionFailed,
    Usage,
)
from fluster_worker.logs.model import SOURCES, InvalidLogQuery, LogLine, LogQuery

T0_MS = 1_700_000_000_000  # a fixed "now" for records and clocks


class FakeLogs:
    def __init__(self) -> None:
        self.lines: dict[str, list[LogLine]] = {}
        self.queries: list[tuple[str, LogQuery]] = []
        self.bytes_read = 0

    def add(self, job_id: str, source: str, data: str, timestamp_ms: int | None = None) -> LogLine:
        lines = self.lines.setdefault(job_id, [])
        seq = lines[-1].seq + 1 if lines else 0
        ts = timestamp_ms if timestamp_ms is not None else T0_MS + seq * 10
        line = LogLine(ts * 1_000_000, source, data, seq)
        lines.append(line)
        return line

    def line_count(self, job_id: str) -> int:
        return len(self.lines.get(job_id, ()))

    def query(self, job_id: str, q: LogQuery) -> Deferred[list[LogLine]]:
        self.queries.append((job_id, q))
        if q.sources is not None and not q.sources <= set(SOURCES):
            return fail(InvalidLogQuery(f"unknown source {sorted(q.sources)[0]!r}"))
        try:
            pattern = re.compile(q.regex) if q.regex else None
        except re.error as e:
            return fail(InvalidLogQuery(f"invalid regex: {e}"))
        lines = [x for x in self.lines.get(job_id, []) if q.sources is None or x.source in q.sources]
        if q.start_line < 0:
            lines = lines[q.start_line:]
        elif q.start_line > 0:
            lines = lines[q.start_line:]
        if q.start_ms > 0:
            lines = [x for x in lines if x.timestamp_ms > q.start_ms]
        if q.end_ms > 0:
            lines = [x for x in lines if x.timestamp_ms <= q.end_ms]
        if q.after_seq is not None:
            lines = [x for x in lines if x.seq > q.after_seq]
        if pattern is not None:
            lines = [x for x in lines if pattern.search(x.data)]
        if q.max_lines > 0:
            lines = lines[: q.max_lines]
        return succeed(lines)


class FakeManager:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.jobs: dict[str, JobRecord] = {}
        self.listeners: list[Callable[[JobRecord], None]] = []
        self.kills: list[tuple[str, int]] = []
        #: When set, kill() waits on a new Deferred appended here.
        self.hold_kills = False
        self.pending_kills: list[Deferred[None]] = []

    def add(self, record: JobRecord) -> JobRecord:
        self.jobs[record.job_id] = record
        self.changed(record)
        return record

    def add_listener(self, listener: Callable[[JobRecord], None]) -> None:
        self.listeners.append(listener)

    def changed(self, record: JobRecord) -> None:
        for listener in list(self.listeners):
            listener(record)

    def running_count(self) -> int:
        return sum(1 for r in self.jobs.values() if r.state is JobState.RUNNING)

    # The JobManager's queries over the same records (what the pages and the
    # WorkerService read).

    def find(self, job_id: str) -> JobRecord | None:
        return self.jobs.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        record = self.jobs.get(job_id)
        if record is None:
            raise JobNotFound(f"job {job_id} not found")
        return record

    def records(self) -> list[JobRecord]:
        return list(self.jobs.values())

    def job_count(self) -> int:
        return len(self.jobs)

    async def result(self, job_id: str) -> bytes:
        self.get(job_id)
        return b""

    def kill(self, job_id: str, term_timeout_ms: int) -> Deferred[None]:
        record = self.jobs.get(job_id)
        if record is None:
            return fail(JobNotFound(f"job {job_id} not found"))
        if record.state.terminal:
            return fail(PreconditionFailed(f"job {job_id} already finished"))
        self.kills.append((job_id, term_timeout_ms))

        def done(_: object) -> None:
            if not record.state.terminal:
                record.move(JobState.KILLED, int(self._clock.seconds() * 1000), "killed")
                self.changed(record)

        if self.hold_kills:
            d: Deferred[None] = Deferred()
            self.pending_kills.append(d)
            d.addCallback(done)
            return d
        done(None)
        return succeed(None)


@dataclass
class FakeRegistration:
    connected: bool = True
    last_heartbeat_ms: int | None = T0_MS - 4000


@dataclass
class FakeWorker:
    config: WorkerConfig = field(
        default_factory=lambda: WorkerConfig(
            state_dir=Path("/nonexistent/state"), cache_dir=Path("/nonexistent/cache"), advertise_cpu=4
        )
    )
    worker_id: str = "fake-worker"
    reactor: Clock = field(default_factory=Clock)
    logs: FakeLogs = field(default_factory=FakeLogs)
    address: str = "10.1.2.3:8080"
    registration: Any = None
    conditions: Any = None  # a NodeConditions, when a test gives one
    disk: Any = None  # something with ``free_bytes``
    manager: FakeManager = field(init=False)
    #: Never started: the fake's requests are small enough to parse inline.
    cpu_pool: BlockingPool = field(init=False)

    def __post_init__(self) -> None:
        if self.reactor.seconds() == 0:
            self.reactor.advance(T0_MS / 1000)
        self.manager = FakeManager(self.reactor)
        self.cpu_pool = BlockingPool(self.reactor, "fake-cpu")  # type: ignore[arg-type]

    def advertised_address(self) -> str:
        return self.address


def make_record(
    job_id: str,
    state: JobState = JobState.RUNNING,
    *,
    submitted_ms: int = T0_MS - 60_000,
    error: str = "",
    exit_code: int = 0,
    from_cache: bool = False,
    ports: dict[str, int] | None = None,
    attempt_id: int = 0,
    worker_id: str = "fake-worker",
    spec: JobSpec | None = None,
) -> JobRecord:
    """A record that went through the real phases up to ``state``."""
    record = JobRecord(
        job_id=job_id,
        attempt_id=attempt_id,
        worker_id=worker_id,
        spec=spec or JobSpec(bundle_url="file:///bundles/b.zip", cpu=1, memory="512m", memory_bytes=512 * 2**20),
        submitted_at_ms=submitted_ms,
        ports=dict(ports or {}),
    )
    record.phases.append(("pending", submitted_ms))
    t = submitted_ms
    if state is JobState.PENDING:
        return record
    if state in (JobState.UNSCHEDULABLE,):
        record.state = state
        record.error = error
        record.finished_at_ms = t + 10
        record.phases.append((state.name.lower(), t + 10))
        return record
    t += 100
    record.move(JobState.BUILDING, t, "building")
    t += 50
    record.phase("downloading bundle", t)
    t += 400
    record.phase("building image", t)
    if state is JobState.BUILDING:
        return record
    build_ms = 200 if from_cache else 4000
    record.build = BuildInfo(
        started_ms=t, finished_ms=t + build_ms, from_cache=from_cache, image_tag="fluster-job:abc123"
    )
    t += build_ms
    record.phase("preparing container", t)
    t += 300
    record.move(JobState.RUNNING, t, "running")
    record.usage = Usage(
        memory_mb=120, memory_peak_mb=150, cpu_percent=37, cpu_millicores=370, process_count=3, disk_mb=2
    )
    if state is JobState.RUNNING:
        return record
    t += 5000
    record.exit_code = exit_code
    record.error = error
    record.move(state, t, state.name.lower())
    return record
