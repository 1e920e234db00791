"""RunJob requests checked before anything is accepted: every bad input is
answered with a Connect code and one line, before any work starts."""

from __future__ import annotations

import os
import re
import uuid

from fluster_worker.containers import ports, resources
from fluster_worker.images import builder
from fluster_worker.jobs.model import JobSpec, valid_job_id
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.rpc.errors import Code, ConnectError

MAX_ENTRYPOINT_BYTES = 16 * 2**20
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_BUNDLE_SCHEMES = ("file://", "http://", "https://", "gs://")


def job_id_of(request: pb.RunJobRequest) -> str:
    if not request.job_id:
        return f"job-{uuid.uuid4().hex[:16]}"
    check_job_id(request.job_id)
    return request.job_id


def check_job_id(job_id: str) -> None:
    if not valid_job_id(job_id):
        raise ConnectError(
            Code.INVALID_ARGUMENT,
            f"invalid job_id {job_id[:64]!r}: use letters, digits, '.', '_', '-' (at most 200), "
            "starting with a letter or digit",
        )


def job_spec(request: pb.RunJobRequest, cpu_count: int) -> JobSpec:
    """The validated spec of ``request``; raises ConnectError(invalid_argument...)."""
    if not request.serialized_entrypoint:
        raise _invalid("serialized_entrypoint is empty")
    if len(request.serialized_entrypoint) > MAX_ENTRYPOINT_BYTES:
        raise _invalid(f"serialized_entrypoint exceeds {MAX_ENTRYPOINT_BYTES} bytes")
    url = request.bundle_gcs_path
    if url and not (url.startswith(_BUNDLE_SCHEMES) or os.path.isabs(url)):
        raise _invalid(f"unsupported bundle_gcs_path {url[:100]!r}: use file://, http(s)://, gs:// or an absolute path")
    res = request.resources
    device = res.device.WhichOneof("device") if res.HasField("device") else None
    if device in ("gpu", "tpu"):
        raise ConnectError(Code.FAILED_PRECONDITION, f"this worker has no {device.upper()}")
    if res.cpu < 0:
        raise _invalid(f"invalid resources.cpu {res.cpu}: must be >= 0")
    if res.cpu > cpu_count:
        raise _invalid(f"resources.cpu {res.cpu} exceeds this worker's {cpu_count} cores")
    try:
        memory_bytes = resources.parse_memory(res.memory)
    except ValueError as e:
        raise _invalid(str(e)) from None
    if request.timeout_seconds < 0:
        raise _invalid(f"invalid timeout_seconds {request.timeout_seconds}: must be >= 0")
    env = request.environment
    for key, value in env.env_vars.items():
        if not _ENV_NAME.fullmatch(key):
            raise _invalid(f"invalid environment variable name {key[:64]!r}")
        if "\x00" in value:
            raise _invalid(f"environment variable {key} contains a NUL byte")
    names = list(request.ports)
    try:
        ports.validate_port_names(names)
        builder.validate(list(env.extras), list(env.pip_packages))
    except ValueError as e:
        raise _invalid(str(e)) from None
    return JobSpec(
        bundle_url=url,
        cpu=res.cpu,
        memory=res.memory,
        memory_bytes=memory_bytes,
        timeout_seconds=request.timeout_seconds,
        port_names=names,
        env_vars=dict(env.env_vars),
        extras=list(env.extras),
        pip_packages=list(env.pip_packages),
        workspace=env.workspace,
    )


def _invalid(message: str) -> ConnectError:
    return ConnectError(Code.INVALID_ARGUMENT, message)
