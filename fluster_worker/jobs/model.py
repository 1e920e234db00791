"""The job core's own words: what a job request asks for (JobRequest), what the
worker keeps of a job (JobRecord, JobSpec), its lifecycle as an explicit state
machine (JobState), and the errors the core raises. No wire types here: the web
layer (``fluster_worker.web.wire``) translates."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

# Re-exported: the rule lives with the file names it makes (common.jobnames).
from fluster_worker.common.jobnames import valid_job_id as valid_job_id


class JobState(enum.IntEnum):
    """A job's state; the values are the wire's (JOB_STATE_<NAME>)."""

    UNSPECIFIED = 0
    PENDING = 1
    BUILDING = 2
    RUNNING = 3
    SUCCEEDED = 4
    FAILED = 5
    KILLED = 6
    WORKER_FAILED = 7
    UNSCHEDULABLE = 8

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.KILLED, JobState.WORKER_FAILED, JobState.UNSCHEDULABLE}
)

# Every legal move; anything else is a bug and raises IllegalTransition.
# BUILDING -> PENDING: a restarted worker puts a job whose build its previous
# process left unfinished back in line. WORKER_FAILED: a job the worker lost.
_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset(
        {JobState.BUILDING, JobState.FAILED, JobState.KILLED, JobState.WORKER_FAILED}
    ),
    JobState.BUILDING: frozenset(
        {JobState.PENDING, JobState.RUNNING, JobState.FAILED, JobState.KILLED, JobState.WORKER_FAILED}
    ),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.KILLED, JobState.WORKER_FAILED}
    ),
}


class IllegalTransition(Exception):
    pass


# -- errors the core raises (the web layer maps each to a Connect code) ------------


class JobError(Exception):
    """A request the job core refuses; ``message`` is one line for the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidJobRequest(JobError):
    """The request itself is wrong (a bad id, size, name...)."""


class JobNotFound(JobError):
    pass


class JobAlreadyExists(JobError):
    pass


class PreconditionFailed(JobError):
    """Not possible in the present state of the job or the worker: a kill after
    the job finished, a device this worker does not have."""


class ResourcesExhausted(JobError):
    """The worker has no room for it now (ports, queue, disk)."""


class WorkerUnavailable(JobError):
    """The worker cannot take it now (starting, engine down); try again later."""


# -- what a RunJob asks for ---------------------------------------------------------


@dataclass(frozen=True)
class DeviceRequest:
    """``resources.device``: ``kind`` is "cpu", "gpu" or "tpu" ("" for none)."""

    kind: str = ""
    variant: str = ""
    count: int = 0
    topology: str = ""


@dataclass(frozen=True)
class JobRequest:
    """A RunJob, unvalidated, in the core's terms. ``job_id`` "" asks for a
    generated id."""

    job_id: str = ""
    attempt_id: int = 0
    entrypoint: bytes = b""
    bundle_url: str = ""
    env_vars: dict[str, str] = field(default_factory=dict)
    extras: tuple[str, ...] = ()
    pip_packages: tuple[str, ...] = ()
    workspace: str = ""
    cpu: int = 0
    memory: str = ""
    disk: str = ""
    device: DeviceRequest = DeviceRequest()
    timeout_seconds: int = 0
    port_names: tuple[str, ...] = ()


@dataclass
class BuildInfo:
    started_ms: int = 0
    finished_ms: int = 0
    from_cache: bool = False
    image_tag: str = ""
    # The sha256 of the bundle its container mounts at /app ("" : none, or a
    # record of an older worker): a restarted worker keeps it in the cache.
    bundle_digest: str = ""


@dataclass
class Usage:
    memory_mb: int = 0
    memory_peak_mb: int = 0
    disk_mb: int = 0
    cpu_millicores: int = 0
    cpu_percent: int = 0
    process_count: int = 0


@dataclass
class StopRequest:
    """A stop the worker asked of a job's container (a kill, its timeout, a drain
    at shutdown), kept in the record so that a restarted worker finishes it and
    names it. ``state`` is the JobState name the job ends in when the stop is
    what ended it; ``signalled_ms`` is when a signal first reached the running
    container (0: none yet; a container that exits on its own before that keeps
    its own outcome)."""

    state: str
    error: str
    requested_ms: int
    grace_ms: int
    signalled_ms: int = 0


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
    # resources.device, checked against what this worker has: "gpu" or "tpu"
    # ("" for none); the GPU count; the variant and topology as asked.
    device_kind: str = ""
    device_count: int = 0
    device_variant: str = ""
    device_topology: str = ""
    disk: str = ""  # resources.disk as asked ("" : the worker's --max-job-disk)
    disk_bytes: int | None = None  # the limit of its writable space; None: unlimited


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
    # The device ids the job holds (GPU ids, TPU device paths) from the moment they
    # are granted until it ends; kept so a re-adopted job holds them again.
    devices: list[str] = field(default_factory=list)
    # Epoch ms at which the timeout ends the job (0: none), fixed when it starts.
    deadline_ms: int = 0
    # Arrival order among this worker's jobs: a restarted worker starts the jobs
    # left waiting in this order.
    arrival: int = 0
    stop: StopRequest | None = None

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
        if data.get("stop") is not None:
            data["stop"] = StopRequest(**data["stop"])
        return cls(**data)
