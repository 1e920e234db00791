"""The environment of a job's container: HOME, what the request asked for, then
the ``FLUSTER_*`` variables of the wire contract overriding it."""

from __future__ import annotations

from fluster_worker.jobs.model import JobRecord
from fluster_worker.jobs.sandbox import CONTAINER_WORKDIR


class ContainerEnv:
    def __init__(self, controller_address: str = "") -> None:
        # An address the container can reach (``http://host:port``); "" without
        # a controller.
        self._controller_address = controller_address

    def of(self, record: JobRecord) -> dict[str, str]:
        # HOME: the job's writable directory (its uid has no passwd entry, and
        # Docker's default "/" is read-only); the request may set another.
        env = {"HOME": CONTAINER_WORKDIR, **record.spec.env_vars}
        env["FLUSTER_JOB_ID"] = record.job_id
        env["FLUSTER_ATTEMPT_ID"] = str(record.attempt_id)
        env["FLUSTER_WORKER_ID"] = record.worker_id
        env["FLUSTER_BIND_HOST"] = "0.0.0.0"
        if self._controller_address:
            env["FLUSTER_CONTROLLER_ADDRESS"] = self._controller_address
        if record.spec.bundle_url:
            env["FLUSTER_BUNDLE_GCS_PATH"] = record.spec.bundle_url
        for name, port in record.ports.items():
            env[f"FLUSTER_PORT_{name.upper()}"] = str(port)
        return env
