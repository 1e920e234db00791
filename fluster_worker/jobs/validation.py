"""RunJob requests checked before anything is accepted: every bad input is
refused with a domain error and one line, before any work starts."""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass

from fluster_worker.accelerators import Accelerators
from fluster_worker.common.jobnames import job_id_problem, shown_job_id
from fluster_worker.containers import ports, resources
from fluster_worker.images import builder
from fluster_worker.jobs.devices import JobDevices
from fluster_worker.jobs.model import InvalidJobRequest, JobRequest, JobSpec

MAX_ENTRYPOINT_BYTES = 16 * 2**20
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_BUNDLE_SCHEMES = ("file://", "http://", "https://", "gs://")
_NO_DEVICES = JobDevices(Accelerators())


def job_id_of(request: JobRequest) -> str:
    if not request.job_id:
        return f"job-{uuid.uuid4().hex[:16]}"
    check_job_id(request.job_id)
    return request.job_id


def check_job_id(job_id: str) -> None:
    """InvalidJobRequest unless ``job_id`` is valid (``common.jobnames``): at most
    1024 bytes of UTF-8, no control characters, no empty, "." or ".." segment."""
    problem = job_id_problem(job_id)
    if problem is not None:
        raise InvalidJobRequest(f"invalid job_id {shown_job_id(str(job_id), 64)}: {problem}")


@dataclass(frozen=True)
class RequestLimits:
    """The worker's bounds on what one RunJob may ask for (its options)."""

    max_env_vars: int = 1000
    max_env_bytes: int = 128 * 2**10
    max_job_disk_bytes: int | None = 10 * 2**30  # None: unlimited


DEFAULT_LIMITS = RequestLimits()


def job_spec(
    request: JobRequest, cpu_count: int, devices: JobDevices | None = None, limits: RequestLimits = DEFAULT_LIMITS
) -> JobSpec:
    """The validated spec of ``request``; raises InvalidJobRequest, or
    PreconditionFailed for what this worker can never run (a GPU or TPU it does
    not have: ``devices`` says what it has, None is none)."""
    if not request.entrypoint:
        raise InvalidJobRequest("serialized_entrypoint is empty")
    if len(request.entrypoint) > MAX_ENTRYPOINT_BYTES:
        raise InvalidJobRequest(f"serialized_entrypoint exceeds {MAX_ENTRYPOINT_BYTES} bytes")
    url = request.bundle_url
    if url and not (url.startswith(_BUNDLE_SCHEMES) or os.path.isabs(url)):
        raise InvalidJobRequest(
            f"unsupported bundle_gcs_path {url[:100]!r}: use file://, http(s)://, gs:// or an absolute path"
        )
    if request.cpu < 0:
        raise InvalidJobRequest(f"invalid resources.cpu {request.cpu}: must be >= 0")
    if request.cpu > cpu_count:
        raise InvalidJobRequest(f"resources.cpu {request.cpu} exceeds this worker's {cpu_count} cores")
    try:
        memory_bytes = resources.parse_memory(request.memory)
    except ValueError as e:
        raise InvalidJobRequest(str(e)) from None
    if request.timeout_seconds < 0:
        raise InvalidJobRequest(f"invalid timeout_seconds {request.timeout_seconds}: must be >= 0")
    check_env(request.env_vars, limits)
    disk_bytes = _disk_limit(request.disk, limits.max_job_disk_bytes)
    names = list(request.port_names)
    try:
        ports.validate_port_names(names)
        builder.validate(list(request.extras), list(request.pip_packages))
    except ValueError as e:
        raise InvalidJobRequest(str(e)) from None
    spec = JobSpec(
        bundle_url=url,
        cpu=request.cpu,
        memory=request.memory,
        memory_bytes=memory_bytes,
        timeout_seconds=request.timeout_seconds,
        port_names=names,
        env_vars=dict(request.env_vars),
        extras=list(request.extras),
        pip_packages=list(request.pip_packages),
        workspace=request.workspace,
        disk=request.disk,
        disk_bytes=disk_bytes,
    )
    (devices or _NO_DEVICES).check(request.device, spec)
    return spec


def check_env(env: dict[str, str], limits: RequestLimits) -> None:
    """Names and values a container can take, within the worker's bounds (a
    million variables kept runc busy for minutes; a 10 MB value cannot be exec'd)."""
    if len(env) > limits.max_env_vars:
        raise InvalidJobRequest(
            f"too many environment variables: {len(env)}, over the limit of {limits.max_env_vars} (--max-env-vars)"
        )
    total = 0
    for key, value in env.items():
        if not _ENV_NAME.fullmatch(key):
            raise InvalidJobRequest(f"invalid environment variable name {key[:64]!r}")
        if "\x00" in value:
            raise InvalidJobRequest(f"environment variable {key} contains a NUL byte")
        total += len(key) + len(value.encode("utf-8", "surrogatepass")) + 2  # "KEY=value\0"
        if total > limits.max_env_bytes:
            raise InvalidJobRequest(
                f"environment variables take more than {limits.max_env_bytes} bytes (--max-env-bytes)"
            )


def _disk_limit(disk: str, worker_max: int | None) -> int | None:
    """The limit of the job's writable space: resources.disk when given, never
    more than --max-job-disk."""
    try:
        asked = resources.parse_disk(disk)
    except ValueError as e:
        raise InvalidJobRequest(str(e)) from None
    if asked is None:
        return worker_max
    if worker_max is not None and asked > worker_max:
        raise InvalidJobRequest(
            f"resources.disk {disk.strip()[:40]} exceeds this worker's --max-job-disk of {worker_max // 2**20} MiB"
        )
    return asked

