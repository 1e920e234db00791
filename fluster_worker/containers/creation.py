"""Creating a container for a ContainerSpec: the host config the engine is asked
for (no capabilities, limits, ports, mounts, devices, the log driver), the
clean-up after a create that failed halfway, and the one line that says what
the engine cannot do for a container's devices when it starts it."""

from __future__ import annotations

from typing import Any, cast

import docker
import docker.errors
import docker.types
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.common.text import one_line
from fluster_worker.containers.engine import ContainerError, Engine
from fluster_worker.containers.spec import WORKER_ID_LABEL, ContainerSpec

__all__ = ["create_container", "device_start_error"]

log = Logger()


def create_container(engine: Engine, worker_id: str, spec: ContainerSpec) -> Deferred[str]:
    """Create (not start) the container of worker ``worker_id``; fires with its full id."""
    labels = dict(spec.labels)
    if labels.get(WORKER_ID_LABEL, worker_id) != worker_id:
        return fail(
            ContainerError(
                f"container create failed: label {WORKER_ID_LABEL}="
                f"{labels[WORKER_ID_LABEL][:64]!r} is not this worker's id"
            )
        )
    labels[WORKER_ID_LABEL] = worker_id

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
            **_device_options(spec),
            read_only=spec.read_only_rootfs,
            log_config=_log_config(spec.log_max_bytes),
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
            user=spec.user or None,
            # The job's env is exactly what the spec says, not the worker's proxies.
            use_config_proxy=False,
        )
        return cast(str, result["Id"])

    return engine.call("container create", create).addErrback(_remove_half_created, engine, worker_id, spec.name)


def _remove_half_created(failure: Failure, engine: Engine, worker_id: str, name: str) -> Deferred[str]:
    """A create that failed or timed out may still have left a container
    (the engine finishes what the client gave up on): remove it if it is
    ours and was never started. Not after a name conflict: that container
    is another attempt's. Fails with the create's error in any case."""
    error = failure.value
    cause = error.__cause__ if isinstance(error, ContainerError) else error
    if isinstance(cause, docker.errors.APIError) and cause.status_code == 409:
        return fail(failure)

    def remove(api: Any) -> None:
        try:
            info = api.inspect_container(name)
        except docker.errors.NotFound:
            return
        labels = info.get("Config", {}).get("Labels") or {}
        if labels.get(WORKER_ID_LABEL) == worker_id and info["State"].get("Status") == "created":
            log.warn("removing container {name} left by a failed create", name=name)
            api.remove_container(info["Id"], force=True)

    def done(_: object) -> Deferred[str]:
        return fail(failure)

    return engine.call("container remove", remove).addBoth(done)


def _device_options(spec: ContainerSpec) -> dict[str, Any]:
    """The host config of a spec's devices: an nvidia device request for exactly its
    GPU ids, its device nodes (read, write, mknod), their groups, /dev/shm, memlock."""
    options: dict[str, Any] = {}
    if spec.gpu_ids:
        options["device_requests"] = [
            docker.types.DeviceRequest(driver="nvidia", device_ids=list(spec.gpu_ids), capabilities=[["gpu"]])
        ]
    if spec.devices:
        options["devices"] = [f"{path}:{path}:rwm" for path in spec.devices]
    if spec.group_add:
        options["group_add"] = [str(gid) for gid in spec.group_add]
    if spec.shm_size_bytes is not None:
        options["shm_size"] = spec.shm_size_bytes
    if spec.memlock_unlimited:
        options["ulimits"] = [docker.types.Ulimit(name="memlock", soft=-1, hard=-1)]
    return options


# What the engine says when no runtime can take a device request (no NVIDIA
# Container Toolkit): 'could not select device driver "nvidia" with capabilities: [[gpu]]'.
_NO_DEVICE_DRIVER = "could not select device driver"


# What runc says when the engine may not raise a limit above its own hard limit
# (it lacks CAP_SYS_RESOURCE): "error setting rlimit type 8: operation not permitted".
_RLIMIT_MEMLOCK = "error setting rlimit type 8"


def device_start_error(failure: Failure) -> Failure:
    """Say in one line what the engine cannot do for the container's devices."""
    error = failure.value
    if not isinstance(error, ContainerError):
        return failure
    text = str(error)
    if _NO_DEVICE_DRIVER in text:
        cause = one_line(text[text.index(_NO_DEVICE_DRIVER) :], 200)
        raise ContainerError(
            "container start failed: the Docker engine has no GPU runtime "
            f"(install the NVIDIA Container Toolkit): {cause}"
        ) from error
    if _RLIMIT_MEMLOCK in text:
        cause = one_line(text[text.index(_RLIMIT_MEMLOCK) :], 200)
        raise ContainerError(
            "container start failed: the Docker engine may not raise the locked-memory limit "
            f"(RLIMIT_MEMLOCK; it lacks CAP_SYS_RESOURCE): {cause}"
        ) from error
    return failure


def _log_config(max_bytes: int | None) -> docker.types.LogConfig | None:
    """json-file, at most two files of ``max_bytes``: the engine keeps about what
    the worker keeps of a job (a cap per stream), and ``docker logs`` reads it."""
    if max_bytes is None:
        return None
    return docker.types.LogConfig(type="json-file", config={"max-size": str(max_bytes), "max-file": "2"})
