"""``twistd fluster-worker``: options and makeService.

Every option can also come from the environment as ``FLUSTER_WORKER_<OPTION>``
(upper case, dashes as underscores); the command line wins.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from fluster_worker.bundles.hosts import parse_private_hosts
from fluster_worker.config import HOST_CA_VARIABLES, WorkerConfig, host_ca_bundle
from fluster_worker.containers.resources import parse_disk
from fluster_worker.jobs.sandbox import JobUser

_DEFAULTS = WorkerConfig()
#: sys.setswitchinterval of the worker process (see makeService).
REACTOR_SWITCH_INTERVAL_S = 0.0002
#: Defaults that are not one value, as --help shows them.
_SHOWN_DEFAULTS = {
    "ca-bundle": "the first of " + ", ".join(f"${v}" for v in HOST_CA_VARIABLES) + " that names a file, else none",
}

# (name, short, default, help, parse)
_OPTIONS: list[tuple[str, str | None, str | None, str, Callable[[str], Any]]] = [
    ("listen", "l", _DEFAULTS.listen, "Twisted endpoint to serve RPC and the dashboard on.", str),
    ("cache-dir", None, str(_DEFAULTS.cache_dir), "Bundle and build cache directory.", Path),
    ("state-dir", None, str(_DEFAULTS.state_dir), "Job records, logs and worker id.", Path),
    ("worker-id", None, None, "Worker id (default: generated once, kept in the state dir).", str),
    ("controller", None, None, "Controller address (host:port or http://host:port).", str),
    ("advertise-host", None, None, "Host the controller and clients reach this worker at.", str),
    ("base-image", None, _DEFAULTS.base_image, "Docker image job images are built on.", str),
    ("max-concurrent-jobs", None, str(_DEFAULTS.max_concurrent_jobs), "Jobs building or running at once.", int),
    ("port-range", None, "30000-39999", "Host ports handed to jobs, LOW-HIGH.", str),
    ("ca-bundle", None, None, "CA bundle (PEM) passed into image builds, e.g. for a TLS proxy; \"\" for none.", Path),
    ("index-url", None, None, "Python package index URL for image builds.", str),
    ("extra-index-url", None, None, "Extra package index URLs, comma separated.", str),
    ("max-body-bytes", None, str(_DEFAULTS.max_body_bytes), "Largest RPC request body.", int),
    ("retention-count", None, str(_DEFAULTS.retention_count), "Finished jobs kept.", int),
    ("retention-seconds", None, str(int(_DEFAULTS.retention_seconds)), "Age after which finished jobs go.", float),
    ("log-max-stream-bytes", None, str(_DEFAULTS.log_max_stream_bytes), "Log cap per job and stream.", int),
    ("bundle-cache-bytes", None, str(_DEFAULTS.bundle_cache_bytes), "Bundle cache size cap.", int),
    ("bundle-roots", None, None, "Directories local (file://, path) bundles may lie in, DIR[,DIR] "
     "(default: any path the worker can read, with a warning).", lambda text: _bundle_roots(text)),
    ("allow-private-bundle-hosts", None, "no", "Non-public addresses http(s) bundles may come from: "
     "no, yes (any), or CIDR[,CIDR] (loopback, link-local, private).", lambda text: parse_private_hosts(text)),
    ("max-images", None, str(_DEFAULTS.max_images), "Job images kept.", int),
    ("max-image-bytes", None, str(_DEFAULTS.max_image_bytes), "Total size of job images kept.", int),
    ("heartbeat-seconds", None, str(_DEFAULTS.heartbeat_seconds), "RegisterWorker heartbeat interval.", float),
    ("advertise-cpu", None, None, "Cores advertised to the controller (default: this machine's).", int),
    ("advertise-memory", None, None, 'Memory advertised, e.g. "23g" (default: this machine\'s).', str),
    ("docker", None, "docker", "The docker CLI (used for `docker logs -f`).", str),
    ("max-kill-grace", None, str(int(_DEFAULTS.max_kill_grace)), "Longest SIGTERM grace of a kill, seconds.", float),
    ("gpus", None, _DEFAULTS.gpus, "GPUs jobs may have: all (what nvidia-smi finds), none, or ids like 0,1,3.", str),
    ("tpu-devices", None, ",".join(_DEFAULTS.tpu_devices), "TPU device nodes, GLOB[,GLOB]; a TPU job gets all.", str),
    ("accelerator-shm-size", None, "16g", "Shared memory (/dev/shm) of GPU and TPU jobs.", str),
    ("tpu-memlock", None, "unlimited", "Locked-memory limit of TPU jobs: unlimited, or engine (its default).", str),
    (
        "min-free-disk-bytes", None, str(_DEFAULTS.min_free_disk_bytes),
        "Free space under the state and cache dirs below which new jobs are refused (0: never).", int,
    ),
    (
        "low-free-disk-bytes", None, str(_DEFAULTS.low_free_disk_bytes),
        "Free space below which the worker warns (dashboard, /metrics).", int,
    ),
    ("job-user", None, None, "UID[:GID] jobs run as, or root (default: 10001:10001 when the worker "
     "is root, else the worker's own).", lambda text: JobUser.parse(text)),
    ("max-env-vars", None, str(_DEFAULTS.max_env_vars), "Most environment variables a job may set.", int),
    ("max-env-bytes", None, str(_DEFAULTS.max_env_bytes), "Largest total size of a job's environment.", int),
    ("max-job-disk", None, "10g", "Most a job may write (/workdir, /tmp, its result); 0: no limit.",
     lambda text: _disk_size(text)),
    ("keep-workdir", None, "no", "Keep a finished job's /workdir and /tmp (yes/no).", lambda text: _yes_no(text)),
    # Who may call the worker.
    ("allowed-hosts", None, None, "More names callers may use in Host (comma separated); * turns the "
     "check off.", str),
    ("allow-control-from", None, _DEFAULTS.allow_control_from, "Who may RunJob, KillJob and kill from the "
     "dashboard: CIDRs or addresses, loopback, controller (its resolved addresses), or *.", str),
    ("allow-read-from", None, _DEFAULTS.allow_read_from, "Who may read (status, logs, pages, /api, "
     "/metrics): as --allow-control-from; control callers may always read.", str),
    ("auth-token-file", None, None, "File holding a token every call and page must carry "
     "(Authorization: Bearer).", Path),
    # -- bounds on what one caller can hold (connections, reads, the queue, log pages)
    ("max-connections", None, str(_DEFAULTS.max_connections), "Most connections open at once (0: no cap).", int),
    (
        "request-read-timeout", None, str(int(_DEFAULTS.request_read_timeout or 0)),
        "Seconds a request's headers and body may take to arrive (0: no limit).", float,
    ),
    ("max-pending-jobs", None, str(_DEFAULTS.max_pending_jobs), "Most jobs waiting PENDING (0: no bound).", int),
    ("log-page-lines", None, str(_DEFAULTS.log_page_lines), "Most log entries one FetchLogs answers.", int),
    ("log-page-bytes", None, str(_DEFAULTS.log_page_bytes), "Most log data one FetchLogs answers.", int),
]

# (name, help): flags, also read from FLUSTER_WORKER_<NAME> (1/true/yes/on).
_FLAGS: list[tuple[str, str]] = [
    (
        "stop-jobs-on-exit",
        "Stop every job when the worker stops (they end WORKER_FAILED), as a drain. By default "
        "stopping the worker leaves its jobs running and the next worker process on the same state "
        "dir re-adopts them.",
    ),
]


def _disk_size(text: str) -> int:
    """Bytes ("10g", "512m", ...); 0 means no limit."""
    if text.strip() == "0":
        return 0
    size = parse_disk(text)
    if size is None:
        raise ValueError(text)
    return size


def _bundle_roots(text: str) -> tuple[Path, ...]:
    roots = tuple(Path(part.strip()) for part in text.split(",") if part.strip())
    if not all(root.is_absolute() for root in roots):
        raise ValueError(text)
    return roots


def _yes_no(text: str) -> bool:
    word = text.strip().lower()
    if word in ("yes", "true", "1", "on"):
        return True
    if word in ("no", "false", "0", "off"):
        return False
    raise ValueError(text)


def env_name(option: str) -> str:
    return "FLUSTER_WORKER_" + option.upper().replace("-", "_")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the Fluster worker: accept jobs over Connect RPC, build their images, run them in "
        "Docker containers, keep their logs, report to the controller. Every option can also be "
        "set as an environment variable FLUSTER_WORKER_<OPTION> (e.g. FLUSTER_WORKER_BASE_IMAGE)."
    )
    # Defaults are applied in postOptions, after the environment, so that
    # "given on the command line" can be told apart from "not given".
    optParameters = [
        [name, short, None, f"{help_} [default: {_SHOWN_DEFAULTS.get(name, default)}; env {env_name(name)}]"]
        for name, short, default, help_, _ in _OPTIONS
    ]
    optFlags = [[name, None, f"{help_} [env {env_name(name)}=1]"] for name, help_ in _FLAGS]

    def postOptions(self) -> None:
        for name, _short, default, _help, _parse in _OPTIONS:
            if self[name] is None:
                self[name] = os.environ.get(env_name(name), default)
        if self["ca-bundle"] is None:
            # What the host's Python already trusts, so builds reach PyPI where pip does.
            found = host_ca_bundle(os.environ)
            self["ca-bundle"] = str(found) if found is not None else None
        for name, _help in _FLAGS:
            if not self[name]:
                raw = os.environ.get(env_name(name), "").strip().lower()
                if raw not in ("", "0", "false", "no", "off", "1", "true", "yes", "on"):
                    raise usage.UsageError(f"{env_name(name)}: invalid value {raw!r} (use 1 or 0)")
                self[name] = raw in ("1", "true", "yes", "on")
        self.config = to_config(self)


def to_config(opts: dict[str, Any]) -> WorkerConfig:
    values: dict[str, Any] = {}
    for name, _short, _default, _help, parse in _OPTIONS:
        raw = opts.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[name] = parse(raw)
        except ValueError:
            raise usage.UsageError(f"--{name}: invalid value {raw!r}") from None
    from fluster_worker.containers.ports import parse_port_range

    try:
        port_range = parse_port_range(values.pop("port-range", "30000-39999"))
    except ValueError as e:
        raise usage.UsageError(f"--port-range: {e}") from None
    from fluster_worker.accelerators import parse_gpus, parse_tpu_devices
    from fluster_worker.containers.resources import parse_memory

    try:
        parse_gpus(values.get("gpus"))
    except ValueError as e:
        raise usage.UsageError(f"--gpus: {e}") from None
    try:
        tpu_devices = parse_tpu_devices(values.get("tpu-devices"))
    except ValueError as e:
        raise usage.UsageError(f"--tpu-devices: {e}") from None
    try:
        shm_bytes = parse_memory(values.get("accelerator-shm-size", "16g")) or _DEFAULTS.accelerator_shm_bytes
    except ValueError as e:
        raise usage.UsageError(f"--accelerator-shm-size: {e}") from None
    memlock = values.get("tpu-memlock", "unlimited").strip().lower()
    if memlock not in ("unlimited", "engine"):
        raise usage.UsageError(f"--tpu-memlock: {memlock[:40]!r} is neither unlimited nor engine")
    extra = values.pop("extra-index-url", "")
    if values.get("max-concurrent-jobs", 1) < 1:
        raise usage.UsageError("--max-concurrent-jobs must be at least 1")
    if not values["max-kill-grace"] > 0:
        raise usage.UsageError("--max-kill-grace must be positive")
    for name in ("min-free-disk-bytes", "low-free-disk-bytes"):
        if values.get(name, 0) < 0:
            raise usage.UsageError(f"--{name} must be at least 0")
    for name in ("max-env-vars", "max-env-bytes"):
        if values[name] < 0:
            raise usage.UsageError(f"--{name} must be at least 0")
    for name in ("max-connections", "request-read-timeout", "max-pending-jobs"):
        if values[name] < 0:
            raise usage.UsageError(f"--{name} must be at least 0")
    for name in ("log-page-lines", "log-page-bytes"):
        if values[name] < 1:
            raise usage.UsageError(f"--{name} must be at least 1")
    job_user: JobUser | None = values.get("job-user")
    if job_user is not None and os.geteuid() != 0 and (job_user.uid, job_user.gid) != (os.geteuid(), os.getegid()):
        raise usage.UsageError(
            f"--job-user {job_user.docker}: a worker that is not root runs jobs as itself "
            f"({os.geteuid()}:{os.getegid()}); only root can hand their directories to another user"
        )
    _check_access(values)
    return WorkerConfig(
        listen=values["listen"],
        cache_dir=values["cache-dir"],
        state_dir=values["state-dir"],
        worker_id=values.get("worker-id"),
        controller=values.get("controller"),
        advertise_host=values.get("advertise-host"),
        base_image=values["base-image"],
        max_concurrent_jobs=values["max-concurrent-jobs"],
        port_range=port_range,
        ca_bundle=values.get("ca-bundle"),
        index_url=values.get("index-url"),
        extra_index_urls=tuple(u.strip() for u in extra.split(",") if u.strip()),
        max_body_bytes=values["max-body-bytes"],
        retention_count=values["retention-count"],
        retention_seconds=values["retention-seconds"],
        log_max_stream_bytes=values["log-max-stream-bytes"],
        bundle_cache_bytes=values["bundle-cache-bytes"],
        bundle_roots=values.get("bundle-roots", ()),
        allow_private_bundle_hosts=values["allow-private-bundle-hosts"],
        max_images=values["max-images"],
        max_image_bytes=values["max-image-bytes"],
        heartbeat_seconds=values["heartbeat-seconds"],
        advertise_cpu=values.get("advertise-cpu"),
        advertise_memory=values.get("advertise-memory"),
        docker_path=values["docker"],
        max_kill_grace=values["max-kill-grace"],
        gpus=values.get("gpus", _DEFAULTS.gpus),
        tpu_devices=tpu_devices,
        accelerator_shm_bytes=shm_bytes,
        tpu_memlock_unlimited=memlock == "unlimited",
        stop_jobs_on_exit=bool(opts.get("stop-jobs-on-exit")),
        min_free_disk_bytes=values["min-free-disk-bytes"],
        low_free_disk_bytes=values["low-free-disk-bytes"],
        job_user=(job_user.uid, job_user.gid) if job_user is not None else None,
        max_env_vars=values["max-env-vars"],
        max_env_bytes=values["max-env-bytes"],
        max_job_disk_bytes=values["max-job-disk"] or None,
        keep_workdir=values["keep-workdir"],
        allowed_hosts=tuple(h.strip() for h in values.get("allowed-hosts", "").split(",") if h.strip()),
        allow_control_from=values["allow-control-from"],
        allow_read_from=values["allow-read-from"],
        auth_token_file=values.get("auth-token-file"),
        max_connections=values["max-connections"] or None,
        request_read_timeout=values["request-read-timeout"] or None,
        max_pending_jobs=values["max-pending-jobs"] or None,
        log_page_lines=values["log-page-lines"],
        log_page_bytes=values["log-page-bytes"],
    )


def _check_access(values: dict[str, Any]) -> None:
    """The access options parse, and the token file is usable."""
    from fluster_worker.web.guard.callers import Rule
    from fluster_worker.web.guard.token import TokenError, load_token

    for name in ("allow-control-from", "allow-read-from"):
        try:
            Rule.parse(values[name])
        except ValueError as e:
            raise usage.UsageError(f"--{name}: {e}") from None
    if values.get("auth-token-file") is not None:
        try:
            load_token(values["auth-token-file"])
        except TokenError as e:
            raise usage.UsageError(f"--auth-token-file: {e}") from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from fluster_worker.worker import assemble

    # Pool threads (log queries, encoding large answers) hold the GIL up to the
    # switch interval at a time whenever the reactor wants it back; 0.2 ms instead
    # of Python's 5 keeps HealthCheck answering in milliseconds while they work.
    # Under a log flood the log writers' threads are the ones: the reactor pays
    # the wait after each syscall of every call it serves (bench/rpc.py,
    # GetJobStatus p99 at 8 connections while 10 jobs print flat out: 294 ms at
    # 5 ms, 53 ms at 0.5 ms, 30 ms at 0.2 ms).
    sys.setswitchinterval(REACTOR_SWITCH_INTERVAL_S)
    # What start-up made (modules, the app, the records) lives as long as the
    # process: out of the collector's sight, the collections that requests
    # trigger do not walk it again each time.
    reactor.callWhenRunning(gc.freeze)
    if options.config.ca_bundle is not None:
        Logger().info("image builds trust the CA bundle {path}", path=str(options.config.ca_bundle))
    return assemble(options.config, reactor)
