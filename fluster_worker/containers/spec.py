"""What a job container is made from: ``ContainerSpec``, its bind ``Mount``s, and valid
unique Docker names (``container_name``).

Validated on construction (ValueError, one line), so ``ContainerRuntime.create`` can
hand any spec that exists to Docker. Pure: no Docker calls here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from fluster_worker.containers.resources import MIN_MEMORY_BYTES

__all__ = [
    "ATTEMPT_ID_LABEL",
    "JOB_ID_LABEL",
    "WORKER_ID_LABEL",
    "ContainerSpec",
    "Mount",
    "check_text",
    "container_name",
    "sanitize_name_part",
]

WORKER_ID_LABEL = "fluster.worker_id"
JOB_ID_LABEL = "fluster.job_id"
ATTEMPT_ID_LABEL = "fluster.attempt_id"

# Docker's rule for container names (at least two characters).
_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", re.ASCII)
_NAME_MAX = 200
_BAD_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_.-]+", re.ASCII)
_GPU_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9/_-]{0,127}", re.ASCII)
_USER_RE = re.compile(r"[0-9]{1,10}:[0-9]{1,10}", re.ASCII)


def sanitize_name_part(text: str, max_len: int = 40) -> str:
    """``text`` reduced to Docker's name characters [a-zA-Z0-9_.-]: every run of
    other characters becomes one "-", leading/trailing "-._" are stripped, the result is
    cut to ``max_len``; "x" when nothing is left. Not unique: see container_name."""
    cleaned = _BAD_NAME_CHARS.sub("-", text[: max_len * 4]).strip("-._")
    cleaned = cleaned[:max_len].rstrip("-._")
    return cleaned or "x"


def container_name(worker_id: str, job_id: str, attempt_id: int) -> str:
    """A valid, unique Docker name for one attempt of a job on one worker:
    ``fluster-<worker>-<job>-<attempt>-<hash>``, where the readable parts are sanitized
    and truncated and the hash (of the exact, unsanitized triple) keeps distinct
    attempts distinct even when their sanitized parts collide."""
    key = f"{len(worker_id)}:{worker_id}|{len(job_id)}:{job_id}|{attempt_id}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return "-".join(
        (
            "fluster",
            sanitize_name_part(worker_id, 32),
            sanitize_name_part(job_id, 64),
            str(attempt_id),
            digest,
        )
    )


def check_text(what: str, text: object, allow_empty: bool = True) -> None:
    """ValueError (one line) unless ``text`` is a string without NUL (and, unless
    ``allow_empty``, not empty)."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, not {type(text).__name__}")
    if "\x00" in text:
        raise ValueError(f"{what} contains a NUL character")
    if not allow_empty and not text:
        raise ValueError(f"{what} is empty")


@dataclass(frozen=True)
class Mount:
    """A bind mount of a host file or directory."""

    source: Path
    target: str
    read_only: bool = False

    def __post_init__(self) -> None:
        if not Path(self.source).is_absolute():
            raise ValueError(f"mount source {str(self.source)!r} is not an absolute path")
        check_text("mount target", self.target, allow_empty=False)
        if not self.target.startswith("/"):
            raise ValueError(f"mount target {self.target[:80]!r} is not an absolute path")


@dataclass(frozen=True)
class ContainerSpec:
    """Everything ``ContainerRuntime.create`` needs. Validated on construction
    (ValueError, one line): a spec that exists can be handed to Docker."""

    name: str  # Docker's [a-zA-Z0-9][a-zA-Z0-9_.-]+; build it with container_name()
    image: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # fluster.worker_id (added by the runtime), fluster.job_id, fluster.attempt_id
    labels: dict[str, str] = field(default_factory=dict)
    working_dir: str = "/app"
    mounts: list[Mount] = field(default_factory=list)
    ports: dict[int, int] = field(default_factory=dict)  # container port -> host port
    nano_cpus: int | None = None
    memory_bytes: int | None = None  # memory+swap is set to the same: no swap
    pids_limit: int = 4096
    # GPUs by id, through the engine's nvidia device request (the job sees only these).
    gpu_ids: tuple[str, ...] = ()
    # Device nodes passed through (TPU chips), at the same path inside; rwm.
    devices: tuple[str, ...] = ()
    group_add: tuple[int, ...] = ()  # extra groups of the job's user (device nodes' groups)
    shm_size_bytes: int | None = None  # /dev/shm; None is the engine's 64 MiB
    memlock_unlimited: bool = False  # RLIMIT_MEMLOCK unlimited (device DMA pins memory)
    user: str = ""  # "uid:gid"; "" is the image's (root)
    read_only_rootfs: bool = False
    # The engine's own json-file log: at most two files of this size (None: the engine's default).
    log_max_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or len(self.name) > _NAME_MAX or not (
            _NAME_RE.fullmatch(self.name)
        ):
            raise ValueError(
                f"invalid container name {str(self.name)[:80]!r}: "
                "expected [a-zA-Z0-9][a-zA-Z0-9_.-]+ (see container_name())"
            )
        check_text("image", self.image, allow_empty=False)
        if any(c.isspace() for c in self.image):
            raise ValueError(f"invalid image {self.image[:80]!r}: contains whitespace")
        if not isinstance(self.command, list):
            raise ValueError("command must be a list of strings")
        for arg in self.command:
            check_text("command argument", arg)
        for key, value in self.env.items():
            check_text("env name", key, allow_empty=False)
            check_text(f"env value of {key[:40]!r}", value)
            if "=" in key:
                raise ValueError(f"invalid env name {key[:40]!r}: contains '='")
        for key, value in self.labels.items():
            check_text("label name", key, allow_empty=False)
            check_text(f"label {key[:40]!r}", value)
        check_text("working_dir", self.working_dir, allow_empty=False)
        if not self.working_dir.startswith("/"):
            raise ValueError(f"working_dir {self.working_dir[:80]!r} is not an absolute path")
        for mount in self.mounts:
            if not isinstance(mount, Mount):
                raise ValueError(f"mounts must be Mount objects, not {type(mount).__name__}")
        for cport, hport in self.ports.items():
            for port in (cport, hport):
                if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                    raise ValueError(f"invalid port mapping {cport!r}->{hport!r}")
        if self.nano_cpus is not None and self.nano_cpus <= 0:
            raise ValueError(f"invalid nano_cpus {self.nano_cpus}: must be positive or None")
        if self.memory_bytes is not None and self.memory_bytes < MIN_MEMORY_BYTES:
            raise ValueError(
                f"invalid memory_bytes {self.memory_bytes}: Docker needs at least "
                f"{MIN_MEMORY_BYTES} or None"
            )
        if self.pids_limit <= 0:
            raise ValueError(f"invalid pids_limit {self.pids_limit}: must be positive")
        for gpu in self.gpu_ids:
            check_text("gpu id", gpu, allow_empty=False)
            if not _GPU_ID_RE.fullmatch(gpu):
                raise ValueError(f"invalid gpu id {gpu[:80]!r}")
        for device in self.devices:
            check_text("device path", device, allow_empty=False)
            # Docker's device syntax is host:container:permissions.
            if not device.startswith("/") or ":" in device:
                raise ValueError(f"invalid device path {device[:80]!r}: absolute, without ':'")
        for gid in self.group_add:
            if isinstance(gid, bool) or not isinstance(gid, int) or gid < 0:
                raise ValueError(f"invalid group id {gid!r}")
        if self.shm_size_bytes is not None and self.shm_size_bytes <= 0:
            raise ValueError(f"invalid shm_size_bytes {self.shm_size_bytes}: must be positive or None")
        if self.user and not _USER_RE.fullmatch(self.user):
            raise ValueError(f"invalid user {self.user[:40]!r}: expected uid:gid")
        if self.log_max_bytes is not None and self.log_max_bytes < 1024:
            raise ValueError(f"invalid log_max_bytes {self.log_max_bytes}: at least 1024 or None")
