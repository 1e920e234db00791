"""What the pages, the JSON API and the metrics read of a worker.

They read it through the small protocols below (the JobManager's read-only
queries and the LogStore's query API), so they are unit-tested against
``fluster_worker.testing.dashboard``. The JSON shapes are in ``job_json`` and
``worker_json``; query parameters in ``queries``; job ids in URLs in ``urls``;
JSON answers in ``answers``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fluster_worker.common.threads import BlockingPool
from fluster_worker.config import WorkerConfig
from fluster_worker.jobs.model import JobRecord
from fluster_worker.logs.model import LogLine, LogQuery


class ManagerView(Protocol):
    """The JobManager's read-only queries (and kill, for the dashboard)."""

    def find(self, job_id: str) -> JobRecord | None: ...

    def records(self) -> list[JobRecord]: ...

    def job_count(self) -> int: ...

    def running_count(self) -> int: ...

    def kill(self, job_id: str, term_timeout_ms: int) -> Awaitable[None]: ...

    def add_listener(self, listener: Callable[[JobRecord], None]) -> None: ...


class LogView(Protocol):
    def query(self, job_id: str, q: LogQuery) -> Awaitable[list[LogLine]]: ...


class WorkerView(Protocol):
    @property
    def config(self) -> WorkerConfig: ...

    @property
    def worker_id(self) -> str: ...

    @property
    def manager(self) -> ManagerView: ...

    @property
    def logs(self) -> LogView: ...

    @property
    def reactor(self) -> Any: ...

    @property
    def cpu_pool(self) -> BlockingPool:
        """Where large bodies are parsed and large answers encoded."""

    def advertised_address(self) -> str: ...


@dataclass(frozen=True)
class Facts:
    """What does not change while the worker runs, read once at start."""

    started_s: float
    memory_total_bytes: int
