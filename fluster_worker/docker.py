"""Job containers on the local Docker engine, through docker-py on the BlockingPool.

``ContainerRuntime`` creates, starts, signals, samples and removes the containers of one
worker id (every container carries the label ``fluster.worker_id=<worker id>``), and
tells when a container exits.

Exit detection: one events-stream thread per runtime, not one blocking
``container.wait()`` per container. A blocking wait holds a BlockingPool thread for the
whole life of the job: with more running jobs than pool threads the pool starves and
every other docker call queues behind the waits. The events stream is one long-lived
HTTP request on its own thread (never a pool thread), filtered by our label, that
reports each ``die`` as it happens for any number of containers. On a ``die`` (and
whenever a waiter registers, and after every (re)connect of the stream) the container is
inspected for its exit code, OOMKilled flag and FinishedAt. A waiter is registered
before its first inspect, so an exit that happens at any time (even before ``wait`` was
called, or while the stream was reconnecting) is seen exactly once. The runtime is a
twisted Service: ``startService`` starts the events thread, ``stopService`` closes the
stream so that the thread ends, and returns a Deferred that fires once it has.
"""

from __future__ import annotations

import hashlib
import re
import signal as _signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import docker
import docker.errors
import docker.types
import requests
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.resources import MIN_MEMORY_BYTES
from fluster_worker.threads import BlockingPool

__all__ = [
    "WORKER_ID_LABEL",
    "ContainerError",
    "ContainerRuntime",
    "ContainerSpec",
    "ExitStatus",
    "Mount",
    "UsageSample",
    "container_name",
    "sanitize_name_part",
]

WORKER_ID_LABEL = "fluster.worker_id"
JOB_ID_LABEL = "fluster.job_id"
ATTEMPT_ID_LABEL = "fluster.attempt_id"

T = TypeVar("T")
log = Logger()

# Docker's rule for container names (at least two characters).
_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", re.ASCII)
_NAME_MAX = 200
_BAD_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_.-]+", re.ASCII)
_FULL_ID = re.compile(r"[0-9a-f]{64}", re.ASCII)
_RFC3339 = re.compile(
    r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", re.ASCII
)
_RECONNECT_MIN = 0.5
_RECONNECT_MAX = 5.0
_RECHECK_DELAY = 1.0


class _DelayedCall(Protocol):
    def active(self) -> bool: ...
    def cancel(self) -> None: ...


class _Reactor(Protocol):
    """What the runtime uses of the reactor (IReactorTime + IReactorFromThreads)."""

    def seconds(self) -> float: ...
    def callLater(self, delay: float, f: Callable[..., Any], /, *a: Any, **k: Any) -> Any: ...
    def callFromThread(self, f: Callable[..., Any], /, *a: Any, **k: Any) -> None: ...


class ContainerError(Exception):
    """A Docker operation failed; the message is one line naming the cause."""


# ---------------------------------------------------------------------------
# Specs and results


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


def _check_text(what: str, text: object, allow_empty: bool = True) -> None:
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
        _check_text("mount target", self.target, allow_empty=False)
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

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or len(self.name) > _NAME_MAX or not (
            _NAME_RE.fullmatch(self.name)
        ):
            raise ValueError(
                f"invalid container name {str(self.name)[:80]!r}: "
                "expected [a-zA-Z0-9][a-zA-Z0-9_.-]+ (see container_name())"
            )
        _check_text("image", self.image, allow_empty=False)
        if any(c.isspace() for c in self.image):
            raise ValueError(f"invalid image {self.image[:80]!r}: contains whitespace")
        if not isinstance(self.command, list):
            raise ValueError("command must be a list of strings")
        for arg in self.command:
            _check_text("command argument", arg)
        for key, value in self.env.items():
            _check_text("env name", key, allow_empty=False)
            _check_text(f"env value of {key[:40]!r}", value)
            if "=" in key:
                raise ValueError(f"invalid env name {key[:40]!r}: contains '='")
        for key, value in self.labels.items():
            _check_text("label name", key, allow_empty=False)
            _check_text(f"label {key[:40]!r}", value)
        _check_text("working_dir", self.working_dir, allow_empty=False)
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


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int
    oom_killed: bool
    finished_at_ms: int


@dataclass(frozen=True)
class UsageSample:
    memory_bytes: int  # usage without inactive page cache (what `docker stats` shows)
    memory_peak_bytes: int  # cgroup v1 max_usage (includes page cache), at least memory
    cpu_percent: float  # docker's: 100.0 is one core busy; 0.0 on a first sample
    cpu_millicores: int  # CPU time per wall time since the previous sample; 0 on the first
    process_count: int


# ---------------------------------------------------------------------------
# Helpers on docker data (pure)


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _explain(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return _one_line(str(exc.explanation))
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "Docker engine unreachable: " + _one_line(str(exc), 200)
    return _one_line(str(exc) or type(exc).__name__)


def _parse_time_ns(text: object) -> int | None:
    """Epoch nanoseconds of a Docker RFC 3339 time; None for the zero time or junk."""
    if not isinstance(text, str):
        return None
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    base, frac, zone = match.groups()
    if base.startswith("0001-"):
        return None
    zone = "+00:00" if zone == "Z" else zone
    try:
        seconds = datetime.fromisoformat(base + zone).timestamp()
    except ValueError:
        return None
    return int(seconds) * 10**9 + int((frac or "0").ljust(9, "0"))


def _exit_status(state: dict[str, Any], now_ms: int) -> ExitStatus | None:
    """The ExitStatus of an inspected container's State, or None while it has not
    exited (created, running, paused or restarting)."""
    if state.get("Running") or state.get("Restarting") or state.get("Status") == "created":
        return None
    if state.get("Status") in ("removing", "dead") and _parse_time_ns(state.get("StartedAt")) is None:
        # Never started (e.g. "removing" or "dead" mid force-remove): no exit to
        # report; remove() fails its waiters instead.
        return None
    finished_ns = _parse_time_ns(state.get("FinishedAt"))
    return ExitStatus(
        exit_code=int(state.get("ExitCode") or 0),
        oom_killed=bool(state.get("OOMKilled")),
        finished_at_ms=now_ms if finished_ns is None else finished_ns // 10**6,
    )


@dataclass
class _CpuPoint:
    read_ns: int
    total_usage: int
    system_usage: int


@dataclass
class _SampleState:
    cpu: _CpuPoint | None = None
    peak: int = 0


def _usage(stats: dict[str, Any], previous: _SampleState) -> UsageSample | None:
    """A UsageSample from one stats answer (updating ``previous``), or None when the
    container is not running (Docker then answers zero times and empty stats)."""
    read_ns = _parse_time_ns(stats.get("read"))
    pids = stats.get("pids_stats") or {}
    memory = stats.get("memory_stats") or {}
    if read_ns is None or not pids or not memory:
        return None
    usage = int(memory.get("usage") or 0)
    inner = memory.get("stats") or {}
    # cgroup v1 reports total_inactive_file, v2 inactive_file: both are reclaimable cache.
    inactive = inner.get("total_inactive_file", inner.get("inactive_file", 0)) or 0
    current = usage - inactive if 0 < inactive <= usage else usage
    previous.peak = max(previous.peak, int(memory.get("max_usage") or 0), usage, current)

    cpu = stats.get("cpu_stats") or {}
    total = int((cpu.get("cpu_usage") or {}).get("total_usage") or 0)
    system = int(cpu.get("system_cpu_usage") or 0)
    online = int(cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage") or []) or 1)
    point = _CpuPoint(read_ns, total, system)
    before = previous.cpu
    pre = stats.get("precpu_stats") or {}
    pre_read = _parse_time_ns(stats.get("preread"))
    if pre_read is not None and pre.get("system_cpu_usage"):
        # A two-sample (not one-shot) answer carries its own previous point.
        pre_total = int((pre.get("cpu_usage") or {}).get("total_usage") or 0)
        before = _CpuPoint(pre_read, pre_total, int(pre["system_cpu_usage"]))
    percent = 0.0
    millicores = 0
    if before is not None:
        d_total = total - before.total_usage
        d_system = system - before.system_usage
        d_wall = read_ns - before.read_ns
        if d_total >= 0 and d_system > 0:
            percent = d_total / d_system * online * 100.0
        if d_total >= 0 and d_wall > 0:
            millicores = round(d_total / d_wall * 1000)
    previous.cpu = point
    return UsageSample(
        memory_bytes=current,
        memory_peak_bytes=previous.peak,
        cpu_percent=percent,
        cpu_millicores=millicores,
        process_count=int(pids.get("current") or 0),
    )


# ---------------------------------------------------------------------------
# The runtime


class ContainerRuntime(Service):
    """Containers of one worker id. All public methods run on the reactor thread and
    return Deferreds; docker-py runs on the BlockingPool, except the events stream,
    which has its own thread while the service runs. ``wait``/``terminate`` need the
    service running (``startService``)."""

    def __init__(
        self,
        reactor: _Reactor,
        pool: BlockingPool,
        client_factory: Callable[[], docker.DockerClient],
        worker_id: str,
    ) -> None:
        _check_text("worker id", worker_id, allow_empty=False)
        if len(worker_id) > 256:
            raise ValueError("worker id is longer than 256 characters")
        self._reactor = reactor
        self._pool = pool
        self._client_factory = client_factory
        self.worker_id = worker_id
        # The one client (pool threads and the events thread share it), made lazily off
        # the reactor thread (docker.from_env does I/O). It belongs to whoever supplied
        # the factory (which may hand the same client to others): never closed here.
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        # Exit waiters: full container id -> Deferreds, one per wait() call.
        self._waiters: dict[str, list[Deferred[ExitStatus]]] = {}
        self._samples: dict[str, _SampleState] = {}
        # Events thread. State machine: "stopped" -> "running" -> "stopping" -> "stopped".
        self._state = "stopped"
        self._stop_event = threading.Event()
        self._stream_lock = threading.Lock()
        self._stream: Any = None  # docker.types.CancellableStream while connected
        self._thread: threading.Thread | None = None
        self._stopped_waiters: list[Deferred[None]] = []
        self._rechecks: set[_DelayedCall] = set()

    # -- plumbing -----------------------------------------------------------

    def _api(self) -> Any:
        """The low-level docker APIClient (pool threads and the events thread only)."""
        with self._client_lock:
            if self._client is None:
                self._client = self._client_factory()
            return self._client.api

    def _now_ms(self) -> int:
        return int(self._reactor.seconds() * 1000)

    def _call(self, what: str, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``f(api, *args)`` on the pool; docker and transport errors become
        ContainerError("<what> failed: <cause>")."""

        def run() -> T:
            try:
                return f(self._api(), *args)
            except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
                raise ContainerError(f"{what} failed: {_explain(e)}") from e

        return self._pool.run(run)

    # -- create / start / signal / remove -----------------------------------

    def create(self, spec: ContainerSpec) -> Deferred[str]:
        """Create (not start) the container; fires with its full id."""
        labels = dict(spec.labels)
        if labels.get(WORKER_ID_LABEL, self.worker_id) != self.worker_id:
            return fail(
                ContainerError(
                    f"container create failed: label {WORKER_ID_LABEL}="
                    f"{labels[WORKER_ID_LABEL][:64]!r} is not this worker's id"
                )
            )
        labels[WORKER_ID_LABEL] = self.worker_id

        def create(api: Any) -> str:
            host_config = api.create_host_config(
                init=True,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                pids_limit=spec.pids_limit,
                extra_hosts={"host.docker.internal": "host-gateway"},
                port_bindings={c: ("0.0.0.0", h) for c, h in spec.ports.items()},
                mounts=[
                    docker.types.Mount(
                        target=m.target, source=str(m.source), type="bind", read_only=m.read_only
                    )
                    for m in spec.mounts
                ],
                nano_cpus=spec.nano_cpus,
                mem_limit=spec.memory_bytes,
                memswap_limit=spec.memory_bytes,
                auto_remove=False,
            )
            result = api.create_container(
                spec.image,
                command=list(spec.command),
                name=spec.name,
                environment=dict(spec.env),
                labels=labels,
                working_dir=spec.working_dir,
                ports=list(spec.ports),
                tty=False,
                stdin_open=False,
                host_config=host_config,
                # The job's env is exactly what the spec says, not the worker's proxies.
                use_config_proxy=False,
            )
            return cast(str, result["Id"])

        return self._call("container create", create)

    def start(self, container_id: str) -> Deferred[None]:
        return self._call("container start", lambda api: api.start(container_id))

    def signal(self, container_id: str, sig: str) -> Deferred[None]:
        """Send ``sig`` ("SIGTERM", "SIGKILL", ...) to the container's init. A container
        that is gone or not running is not an error."""
        if sig not in _signal.Signals.__members__:
            return fail(ValueError(f"unknown signal {sig[:20]!r}"))
        return self._call(f"container {sig}", _kill, container_id, sig).addCallback(
            lambda _: None
        )

    def remove(self, container_id: str) -> Deferred[None]:
        """Force-remove (kills it if running). Already removed, or being removed, is
        fine. Waiters on a container removed before it ever started fail with
        ContainerError (it has no exit to report)."""
        self._samples.pop(container_id, None)

        def remove(api: Any) -> tuple[str, str] | None:
            try:
                info = api.inspect_container(container_id)
                api.remove_container(container_id, force=True)
            except docker.errors.NotFound:
                return None
            except docker.errors.APIError as e:
                # 409 Conflict: "removal of container ... is already in progress".
                if e.status_code != 409 or "already in progress" not in str(e.explanation):
                    raise
                return None
            return info["Id"], info["State"].get("Status", "")

        def removed(found: tuple[str, str] | None) -> None:
            if found is None:
                return
            full_id, status = found
            self._samples.pop(full_id, None)
            if status == "created":
                self._fail_waiters(
                    full_id,
                    ContainerError(f"container wait failed: {full_id} was removed before it started"),
                )

        return self._call("container remove", remove).addCallback(removed)

    def list_ours(self) -> Deferred[list[str]]:
        """Ids of all containers (any state) labelled with this worker id."""

        def list_(api: Any) -> list[str]:
            found = api.containers(
                all=True, filters={"label": f"{WORKER_ID_LABEL}={self.worker_id}"}
            )
            return [c["Id"] for c in found]

        return self._call("container list", list_)

    def remove_orphans(self) -> Deferred[int]:
        """Remove every container of this worker id (call at startup, before creating
        any: containers left by a previous process). Fires with how many."""

        async def run() -> int:
            ids = await self.list_ours()
            await gatherResults([self.remove(cid) for cid in ids], consumeErrors=True)
            if ids:
                log.info(
                    "removed {count} leftover containers of worker {worker_id}",
                    count=len(ids),
                    worker_id=self.worker_id,
                )
            return len(ids)

        return Deferred.fromCoroutine(run()).addErrback(_first_error)

    # -- usage ----------------------------------------------------------------

    def sample(self, container_id: str) -> Deferred[UsageSample | None]:
        """One usage sample (one-shot stats); None when the container is not running
        or gone. CPU figures are deltas since this runtime's previous sample of the
        container (0 on the first)."""

        def stats(api: Any) -> dict[str, Any] | None:
            try:
                return cast(dict[str, Any], api.stats(container_id, stream=False, one_shot=True))
            except docker.errors.NotFound:
                return None

        def compute(raw: dict[str, Any] | None) -> UsageSample | None:
            if raw is None:
                self._samples.pop(container_id, None)
                return None
            state = self._samples.setdefault(container_id, _SampleState())
            return _usage(raw, state)

        return self._call("container stats", stats).addCallback(compute)

    # -- exits ------------------------------------------------------------------

    def wait(self, container_id: str) -> Deferred[ExitStatus]:
        """Fires with the ExitStatus once the container has exited (at once if it
        already has). A new Deferred per call; cancelling it only drops this waiter.
        ContainerError when the container does not exist (or vanished without a
        trace) or the runtime is not running."""
        if self._state != "running":
            return fail(ContainerError("container wait failed: the container runtime is not running"))
        if _FULL_ID.fullmatch(container_id):
            return self._add_waiter(container_id)

        async def resolve_then_wait() -> ExitStatus:
            info = await self._call(
                "container inspect", lambda api: api.inspect_container(container_id)
            )
            return await self._add_waiter(info["Id"])

        return Deferred.fromCoroutine(resolve_then_wait())

    def terminate(self, container_id: str, grace_seconds: float) -> Deferred[ExitStatus]:
        """SIGTERM, then SIGKILL if still alive after ``grace_seconds`` (a reactor
        timer, cancelled when the container exits first); fires with the ExitStatus once
        the container is dead, at once if it already was. A container that was created
        but never started has no exit: ContainerError (remove it instead)."""

        if self._state != "running":
            return fail(
                ContainerError("container terminate failed: the container runtime is not running")
            )

        async def run() -> ExitStatus:
            exited = self.wait(container_id)  # registered before the signal: no race
            timer: _DelayedCall | None = None
            try:
                delivered = await self._call("container SIGTERM", _kill, container_id, "SIGTERM")
                if not delivered and not exited.called:
                    # Not running: exited (the waiter sees it) or never started.
                    info = await self._call(
                        "container inspect", lambda api: api.inspect_container(container_id)
                    )
                    if info["State"].get("Status") == "created":
                        raise ContainerError(
                            f"container terminate failed: {container_id[:64]} was never started"
                        )
                if not exited.called:
                    timer = self._reactor.callLater(
                        max(0.0, grace_seconds), self._kill_after_grace, container_id
                    )
                return await exited
            finally:
                if timer is not None and timer.active():
                    timer.cancel()
                if not exited.called:
                    exited.cancel()
                    exited.addErrback(lambda _: None)

        return Deferred.fromCoroutine(run())

    def _kill_after_grace(self, container_id: str) -> None:
        log.info("container {id} outlived its grace period: SIGKILL", id=container_id[:12])
        self.signal(container_id, "SIGKILL").addErrback(
            lambda f: log.failure("SIGKILL of {id} failed", f, id=container_id[:12])
        )

    def _add_waiter(self, container_id: str) -> Deferred[ExitStatus]:
        def drop(d: Deferred[ExitStatus]) -> None:
            waiters = self._waiters.get(container_id, [])
            if d in waiters:
                waiters.remove(d)
            if not waiters:
                self._waiters.pop(container_id, None)

        if self._state != "running":
            return fail(ContainerError("container wait failed: the container runtime is not running"))
        d: Deferred[ExitStatus] = Deferred(canceller=drop)
        self._waiters.setdefault(container_id, []).append(d)
        self._check_exit(container_id, None)
        return d

    def _check_exit(self, container_id: str, exit_code_hint: int | None) -> None:
        """Inspect the container and release its waiters if it has exited.
        ``exit_code_hint``: the code of a die event, used when the container is
        already removed by the time we inspect."""

        def inspect(api: Any) -> dict[str, Any] | None:
            try:
                return cast(dict[str, Any], api.inspect_container(container_id)["State"])
            except docker.errors.NotFound:
                return None

        def checked(state: dict[str, Any] | None) -> None:
            if container_id not in self._waiters:
                return
            if state is None:
                if exit_code_hint is None:
                    self._fail_waiters(
                        container_id,
                        ContainerError(f"container wait failed: no such container {container_id[:64]}"),
                    )
                else:
                    self._release(container_id, ExitStatus(exit_code_hint, False, self._now_ms()))
                return
            status = _exit_status(state, self._now_ms())
            if status is not None:
                self._release(container_id, status)

        def failed(f: Failure) -> None:
            # The engine did not answer: try again while someone still waits.
            if container_id not in self._waiters or self._state != "running":
                return
            log.warn(
                "checking container {id} for exit failed: {error}; retrying in {delay}s",
                id=container_id[:12],
                error=f.getErrorMessage(),
                delay=_RECHECK_DELAY,
            )
            call = self._reactor.callLater(
                _RECHECK_DELAY, self._recheck, container_id, exit_code_hint
            )
            self._rechecks.add(call)

        self._call("container inspect", inspect).addCallbacks(checked, failed)

    def _recheck(self, container_id: str, exit_code_hint: int | None) -> None:
        self._rechecks = {c for c in self._rechecks if c.active()}
        if container_id in self._waiters and self._state == "running":
            self._check_exit(container_id, exit_code_hint)

    def _release(self, container_id: str, status: ExitStatus) -> None:
        self._samples.pop(container_id, None)
        for d in self._waiters.pop(container_id, []):
            d.callback(status)

    def _fail_waiters(self, container_id: str, error: Exception) -> None:
        for d in self._waiters.pop(container_id, []):
            d.errback(Failure(error))

    # -- events thread ----------------------------------------------------------

    def startService(self) -> None:
        if self._state != "stopped":
            raise RuntimeError(f"ContainerRuntime.startService while {self._state}")
        super().startService()
        self._state = "running"
        self._stop_event.clear()
        self._thread = threading.Thread(
            target=self._events_loop, name=f"docker-events-{self.worker_id[:32]}", daemon=True
        )
        self._thread.start()

    def stopService(self) -> Deferred[None]:
        """Close the events stream, wait for its thread to end, fail pending waiters
        (the containers themselves are left alone)."""
        if self._state == "stopped":
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stopped_waiters.append(d)
        if self._state == "running":
            super().stopService()
            self._state = "stopping"
            self._stop_event.set()
            with self._stream_lock:
                stream, self._stream = self._stream, None
            if stream is not None:
                _close_quietly(stream)
            for call in self._rechecks:
                if call.active():
                    call.cancel()
            self._rechecks.clear()
            for container_id in list(self._waiters):
                self._fail_waiters(
                    container_id,
                    ContainerError("container wait failed: the container runtime stopped"),
                )
        return d

    def _events_thread_ended(self) -> None:
        self._thread = None
        self._state = "stopped"
        waiters, self._stopped_waiters = self._stopped_waiters, []
        for d in waiters:
            d.callback(None)

    def _subscribed(self) -> None:
        """The stream is (re)connected: exits missed while it was down show up in a
        fresh inspect of every container still waited for."""
        for container_id in list(self._waiters):
            self._check_exit(container_id, None)

    def _on_event(self, event: dict[str, Any]) -> None:
        if self._state != "running":
            return
        action = event.get("Action") or event.get("status")
        actor = event.get("Actor") or {}
        container_id = actor.get("ID") or event.get("id")
        if action != "die" or container_id not in self._waiters:
            return
        try:
            hint: int | None = int((actor.get("Attributes") or {}).get("exitCode", ""))
        except (TypeError, ValueError):
            hint = None
        self._check_exit(container_id, hint)

    def _log_from_thread(self, text: str, **fields: object) -> None:
        self._reactor.callFromThread(lambda: log.warn(text, **fields))

    def _events_loop(self) -> None:
        """The events thread: stream `die` events of our containers to the reactor,
        reconnecting with backoff until stopService sets the stop event."""
        backoff = _RECONNECT_MIN
        filters = {
            "type": "container",
            "event": ["die"],
            "label": f"{WORKER_ID_LABEL}={self.worker_id}",
        }
        try:
            while not self._stop_event.is_set():
                try:
                    stream = self._api().events(decode=True, filters=filters)
                except Exception as e:
                    self._log_from_thread(
                        "docker events: connect failed ({error}); retrying in {delay}s",
                        error=_explain(e),
                        delay=backoff,
                    )
                    self._stop_event.wait(backoff)
                    backoff = min(backoff * 2, _RECONNECT_MAX)
                    continue
                with self._stream_lock:
                    if self._stop_event.is_set():
                        _close_quietly(stream)
                        break
                    self._stream = stream
                backoff = _RECONNECT_MIN
                self._reactor.callFromThread(self._subscribed)
                try:
                    for event in stream:
                        if isinstance(event, dict):
                            self._reactor.callFromThread(self._on_event, event)
                except Exception as e:
                    if not self._stop_event.is_set():
                        self._log_from_thread("docker events: stream failed: {error}", error=_explain(e))
                with self._stream_lock:
                    self._stream = None
                _close_quietly(stream)
                if not self._stop_event.is_set():
                    self._log_from_thread("docker events: stream ended; reconnecting")
                    self._stop_event.wait(backoff)
        finally:
            self._reactor.callFromThread(self._events_thread_ended)


def _kill(api: Any, container_id: str, sig: str) -> bool:
    """Signal the container (pool thread); False when it is gone or not running."""
    try:
        api.kill(container_id, signal=sig)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as e:
        # 409 Conflict: "Container ... is not running".
        if e.status_code != 409:
            raise
        return False
    return True


def _close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception:
        pass


def _first_error(failure: Failure) -> Failure:
    """gatherResults wraps errors in FirstError: hand on the ContainerError inside."""
    from twisted.internet.defer import FirstError

    if failure.check(FirstError):
        return cast(Failure, failure.value.subFailure)  # type: ignore[union-attr]
    return failure
