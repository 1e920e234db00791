"""The container a job runs in: its name, image, runner command, environment,
labels, mounts, user, limits, ports and devices, from the job's record and the
worker's toolkit."""

from __future__ import annotations

from fluster_worker.common.jobnames import job_key
from fluster_worker.containers.runtime import ContainerSpec, container_name
from fluster_worker.images.dockerfile import CONTAINER_APP_DIR, runner_command
from fluster_worker.jobs.model import JobRecord
from fluster_worker.jobs.toolkit import Toolkit

__all__ = ["job_container_spec"]


def job_container_spec(kit: Toolkit, rec: JobRecord, image: str, app: str) -> ContainerSpec:
    """The container of ``rec``'s run on ``image``, with ``app`` (the host
    directory of its bundle) at /app."""
    store = kit.store
    return ContainerSpec(
        name=container_name(rec.worker_id, job_key(rec.job_id), rec.attempt_id),
        image=image,
        command=runner_command(),
        env=kit.devices.environment(rec, kit.container_env(rec)),
        labels={
            **kit.labels,
            "fluster.worker_id": rec.worker_id,
            "fluster.job_id": rec.job_id,
            "fluster.attempt_id": str(rec.attempt_id),
        },
        working_dir=CONTAINER_APP_DIR,
        mounts=kit.sandbox.mounts(store, rec.job_id, app),
        user=kit.sandbox.user.docker,
        read_only_rootfs=kit.sandbox.read_only_rootfs,
        log_max_bytes=kit.sandbox.log_max_bytes,
        ports={port: port for port in rec.ports.values()},
        nano_cpus=rec.spec.cpu * 1_000_000_000 if rec.spec.cpu else None,
        memory_bytes=rec.spec.memory_bytes,
        **kit.devices.container_options(rec),
    )
