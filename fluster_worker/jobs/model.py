"""Job records and the job lifecycle as an explicit state machine."""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from fluster_worker.web.rpc import cluster_pb2 as pb


class JobState(enum.IntEnum):
    """The wire's JobState values (JOB_STATE_<NAME>)."""

    UNSPECIFIED = pb.JOB_STATE_UNSPECIFIED
    PENDING = pb.JOB_STATE_PENDING
    BUILDING = pb.JOB_STATE_BUILDING
    RUNNING = pb.JOB_STATE_RUNNING
    SUCCEEDED = pb.JOB_STATE_SUCCEEDED
    FAILED = pb.JOB_STATE_FAILED
    KILLED = pb.JOB_STATE_KILLED
    WORKER_FAILED = pb.JOB_STATE_WORKER_FAILED
    UNSCHEDULABLE = pb.JOB_STATE_UNSCHEDULABLE

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.KILLED, JobState.WORKER_FAILED, JobState.UNSCHEDULABLE}
)

# Every legal move; anything else is a bug and raises IllegalTransition.
# WORKER_FAILED is where a restarted worker puts jobs that its previous
# process left unfinished.
_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset(
        {JobState.BUILDING, JobState.FAILED, JobState.KILLED, JobState.WORKER_FAILED}
    ),
    JobState.BUILDING: frozenset(
        {JobState.RUNNING, JobState.FAILED, JobState.KILLED, JobState.WORKER_FAILED}
    ),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.KILLED, JobState.WORKER_FAILED}
    ),
}


class IllegalTransition(Exception):
    pass


_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def valid_job_id(job_id: str) -> bool:
    """Job ids name files and containers: letters, digits, '.', '_', '-', at most 200,
    not starting with a dot or dash (so never '.', '..' or an option)."""
    return _JOB_ID.fullmatch(job_id) is not None


@dataclass
class BuildInfo:
    started_ms: int = 0
    finished_ms: int = 0
    from_cache: bool = False
    image_tag: str = ""


@dataclass
class Usage:
    memory_mb: int = 0
    memory_peak_mb: int = 0
    disk_mb: int = 0
    cpu_millicores: int = 0
    cpu_percent: int = 0
    process_count: int = 0


@dataclass
class JobSpec:
    """What RunJob asked for, validated. Kept for the record and the dashboard;
    the entry point's bytes live in a file, never here."""

    bundle_url: str = ""
    cpu: int = 0
    memory: str = ""
    memory_bytes: int | None = None
    timeout_seconds: int = 0
    port_names: list[str] = field(default_factory=list)
    env_vars: dict[str, str] = field(default_factory=dict)
    extras: list[str] = field(default_factory=list)
    pip_packages: list[str] = field(default_factory=list)
    workspace: str = ""


@dataclass
class JobRecord:
    job_id: str
    attempt_id: int
    worker_id: str
    spec: JobSpec
    submitted_at_ms: int
    state: JobState = JobState.PENDING
    status_message: str = "queued"
    exit_code: int = 0
    error: str = ""
    started_at_ms: int = 0
    finished_at_ms: int = 0
    ports: dict[str, int] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    build: BuildInfo = field(default_factory=BuildInfo)
    # (phase, epoch ms) in order: the dashboard's timeline.
    phases: list[tuple[str, int]] = field(default_factory=list)
    container_id: str = ""
    has_result: bool = False

    def move(self, new: JobState, at_ms: int, message: str = "") -> None:
        if new not in _TRANSITIONS.get(self.state, frozenset()):
            raise IllegalTransition(f"job {self.job_id}: {self.state.name} -> {new.name}")
        self.state = new
        self.status_message = message or new.name.lower()
        self.phases.append((new.name.lower(), at_ms))
        if new is JobState.RUNNING:
            self.started_at_ms = at_ms
        if new.terminal:
            self.finished_at_ms = at_ms

    def phase(self, message: str, at_ms: int) -> None:
        """A step inside a state (e.g. "downloading bundle" while BUILDING)."""
        self.status_message = message
        self.phases.append((message, at_ms))

    def to_status(self, worker_address: str = "", result: bytes = b"") -> pb.JobStatus:
        status = pb.JobStatus(
            job_id=self.job_id,
            state=int(self.state),  # type: ignore[arg-type]
            exit_code=self.exit_code,
            error=self.error,
            started_at_ms=self.started_at_ms,
            finished_at_ms=self.finished_at_ms,
            status_message=self.status_message,
            worker_id=self.worker_id,
            worker_address=worker_address,
            serialized_result=result,
            current_attempt_id=self.attempt_id,
        )
        for name, port in self.ports.items():
            status.ports[name] = port
        u = self.usage
        status.resource_usage.CopyFrom(
            pb.ResourceUsage(
                memory_mb=u.memory_mb,
                disk_mb=u.disk_mb,
                cpu_millicores=u.cpu_millicores,
                memory_peak_mb=u.memory_peak_mb,
                cpu_percent=u.cpu_percent,
                process_count=u.process_count,
            )
        )
        b = self.build
        status.build_metrics.CopyFrom(
            pb.BuildMetrics(
                build_started_ms=b.started_ms,
                build_finished_ms=b.finished_ms,
                from_cache=b.from_cache,
                image_tag=b.image_tag,
            )
        )
        status.attempts.append(
            pb.JobAttempt(
                attempt_id=self.attempt_id,
                worker_id=self.worker_id,
                state=int(self.state),  # type: ignore[arg-type]
                exit_code=self.exit_code,
                error=self.error,
                started_at_ms=self.started_at_ms,
                finished_at_ms=self.finished_at_ms,
                is_worker_failure=self.state is JobState.WORKER_FAILED,
            )
        )
        if self.state in (JobState.FAILED, JobState.WORKER_FAILED):
            status.failure_count = 1
        return status

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.name
        data["phases"] = [list(p) for p in self.phases]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        data = dict(data)
        data["state"] = JobState[data["state"]]
        data["spec"] = JobSpec(**data["spec"])
        data["usage"] = Usage(**data["usage"])
        data["build"] = BuildInfo(**data["build"])
        data["phases"] = [(str(p[0]), int(p[1])) for p in data["phases"]]
        return cls(**data)
