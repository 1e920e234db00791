"""WorkerConfig: every option of the worker, typed, with its default."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: Where a host's Python tools are told which CAs to trust, in the order consulted
#: for the default of ``--ca-bundle``.
HOST_CA_VARIABLES = ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE")


def host_ca_bundle(environ: Mapping[str, str]) -> Path | None:
    """The CA file the host's Python already trusts: the first of
    ``HOST_CA_VARIABLES`` that names an existing file; None when none does."""
    for name in HOST_CA_VARIABLES:
        value = environ.get(name, "")
        if value and os.path.isfile(value):
            return Path(value)
    return None


@dataclass(frozen=True)
class WorkerConfig:
    listen: str = "tcp:8080:interface=127.0.0.1"
    cache_dir: Path = Path("/var/cache/fluster-worker")
    state_dir: Path = Path("/var/lib/fluster-worker")
    worker_id: str | None = None
    controller: str | None = None
    advertise_host: str | None = None
    base_image: str = "fluster-base:bookworm"
    max_concurrent_jobs: int = 4
    port_range: tuple[int, int] = (30000, 39999)
    ca_bundle: Path | None = None
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    max_body_bytes: int = 32 * 2**20
    retention_count: int = 1000
    retention_seconds: float = 7 * 24 * 3600
    log_max_stream_bytes: int = 100 * 2**20
    bundle_cache_bytes: int = 10 * 2**30
    # Bundle sources. Local (file://, absolute path) bundles only under these
    # directories; none: any path (a warning at start).
    bundle_roots: tuple[Path, ...] = ()
    # The non-public networks (CIDR) http(s) bundles may come from; ("0.0.0.0/0",
    # "::/0"): any address. Loopback, link-local and private are refused otherwise.
    allow_private_bundle_hosts: tuple[str, ...] = ()
    max_images: int = 50
    max_image_bytes: int = 50 * 2**30
    heartbeat_seconds: float = 10.0
    advertise_cpu: int | None = None
    advertise_memory: str | None = None
    docker_path: str = "docker"
    # Stopping the worker stops its jobs too (ending WORKER_FAILED), instead of
    # leaving them running for the next worker process to re-adopt.
    stop_jobs_on_exit: bool = False
    # Free space under the state and cache dirs: below the floor new jobs are
    # refused; below the low mark the worker warns.
    min_free_disk_bytes: int = 1 * 2**30
    low_free_disk_bytes: int = 5 * 2**30
    extra_labels: dict[str, str] = field(default_factory=dict)
    max_kill_grace: float = 300.0
    gpus: str = "all"  # all (what nvidia-smi finds) | none | ids "0,1,3"
    tpu_devices: tuple[str, ...] = ("/dev/accel*", "/dev/vfio/*")
    accelerator_shm_bytes: int = 16 * 2**30  # /dev/shm of GPU and TPU jobs
    tpu_memlock_unlimited: bool = True  # RLIMIT_MEMLOCK of TPU jobs: unlimited, else the engine's
    # (uid, gid) jobs run as; None: 10001:10001 when the worker is root, else the worker's own.
    job_user: tuple[int, int] | None = None
    max_env_vars: int = 1000
    max_env_bytes: int = 128 * 2**10
    max_job_disk_bytes: int | None = 10 * 2**30  # None: unlimited
    keep_workdir: bool = False
    # Who may call the worker (README, "Who may call the worker").
    allowed_hosts: tuple[str, ...] = ()  # more names accepted in Host; "*": any
    allow_control_from: str = "loopback,controller"  # RunJob, KillJob, the dashboard's kill
    allow_read_from: str = "*"  # everything else
    auth_token_file: Path | None = None  # a bearer token every call and page must carry
    # No request can freeze the worker: connections, request reads, the PENDING
    # line and FetchLogs pages are bounded.
    max_connections: int | None = 512  # None: no cap
    request_read_timeout: float | None = 60.0  # seconds to read a request whole; None: none
    max_pending_jobs: int | None = 1000  # None: no bound
    log_page_lines: int = 100_000  # most entries one FetchLogs answers
    log_page_bytes: int = 16 * 2**20  # most line data one FetchLogs answers

    @property
    def cpu_count(self) -> int:
        return self.advertise_cpu or len(os.sched_getaffinity(0))
