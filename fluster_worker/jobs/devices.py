"""GPUs and TPUs for the jobs that ask for them: whether a request can ever be met
on this worker (checked at submit: PreconditionFailed with one line), what a job
waits for (``needs``), and what the job's container gets for them.

The line jobs wait in for them (with their slot) is ``admission``.

- A GPU job gets ``count`` GPU ids of its own (an nvidia device request for exactly
  those), ``NVIDIA_VISIBLE_DEVICES`` and ``FLUSTER_GPU_IDS`` naming them. Every
  other job gets ``NVIDIA_VISIBLE_DEVICES=void``, so an engine whose default
  runtime is nvidia never hands it a GPU because of its own variables.
- A TPU job gets every TPU device node of the host (so one TPU job runs at a time),
  the worker's TPU variables (its own env_vars win), ``FLUSTER_TPU_DEVICES``, the
  nodes' groups, unlimited locked memory (``--tpu-memlock``) and a large /dev/shm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.accelerators import Accelerators, discover
from fluster_worker.common.text import one_line
from fluster_worker.common.threads import BlockingPool
from fluster_worker.common.waiters import Once
from fluster_worker.containers.devices import DeviceAllocator
from fluster_worker.jobs.model import (
    DeviceRequest,
    InvalidJobRequest,
    JobRecord,
    JobSpec,
    PreconditionFailed,
    WorkerUnavailable,
)

if TYPE_CHECKING:
    from fluster_worker.jobs.admission import Admission

__all__ = ["DEFAULT_SHM_BYTES", "JobDevices"]

# /dev/shm of GPU and TPU jobs: JAX, PyTorch data loaders and NCCL outgrow the
# engine's 64 MiB. Pages in it count toward the job's memory limit.
DEFAULT_SHM_BYTES = 16 * 2**30
_MAX_TEXT = 100
_NONE = Accelerators()


class JobDevices:
    """The worker's GPUs and TPUs as the job core sees them. ``accelerators`` None
    means "not found yet": ``configure`` them once discovery is done (``ready``)."""

    log = Logger()

    def __init__(
        self,
        accelerators: Accelerators | None = _NONE,
        *,
        shm_size_bytes: int = DEFAULT_SHM_BYTES,
        tpu_memlock_unlimited: bool = True,
    ) -> None:
        self.gpus = DeviceAllocator("GPU")
        self.tpus = DeviceAllocator("TPU")
        self.shm_size_bytes = shm_size_bytes
        # vfio TPUs pin the memory they map for DMA: the engine's default limit
        # (8 MiB or less) is far too small.
        self.tpu_memlock_unlimited = tpu_memlock_unlimited
        self._accelerators: Accelerators | None = None
        self._ready: Once[None] = Once()
        self.line: Admission | None = None  # the line jobs wait in (it registers here)
        if accelerators is not None:
            self.configure(accelerators)

    def configure(self, accelerators: Accelerators) -> None:
        self._accelerators = accelerators
        self.gpus.set_ids(accelerators.gpus.ids)
        self.tpus.set_ids(accelerators.tpus.paths)
        if not self._ready.happened:
            self._ready.fire(None)

    @property
    def accelerators(self) -> Accelerators | None:
        return self._accelerators

    def ready(self) -> Deferred[None]:
        """A new Deferred that fires once the devices are known."""
        return self._ready.wait()

    def discover(self, pool: BlockingPool, gpus: str | None, tpu_devices: tuple[str, ...]) -> None:
        """Find the GPUs and TPU device nodes jobs may have (nvidia-smi, globs: on
        ``pool``) and ``configure`` them; none when that fails. Nothing when
        they are known already."""
        if self.accelerators is not None:
            return

        def found(accelerators: Accelerators) -> None:
            self.log.info(
                "devices: GPUs {gpus} ({model}), TPU device nodes {tpus}",
                gpus=list(accelerators.gpus.ids),
                model=accelerators.gpus.name or accelerators.gpus.variant,
                tpus=list(accelerators.tpus.paths),
            )
            self.configure(accelerators)

        def failed(failure: Failure) -> None:
            self.log.failure("finding GPUs and TPUs failed: jobs get none", failure)
            self.configure(Accelerators())

        pool.run(discover, gpus, tpu_devices).addCallback(found).addErrback(failed)

    # -- at submit -------------------------------------------------------------

    def check(self, request: DeviceRequest, spec: JobSpec) -> None:
        """Fill ``spec``'s device fields from ``request``, or raise: InvalidJobRequest
        for a malformed request, PreconditionFailed for one this worker can never
        meet, WorkerUnavailable while its devices are not known yet."""
        for what, text in (("variant", request.variant), ("topology", request.topology)):
            if len(text) > _MAX_TEXT or not text.isprintable():
                raise InvalidJobRequest(f"invalid resources.device {what} {text[:40]!r}")
        if request.kind in ("", "cpu"):
            return
        if request.kind not in ("gpu", "tpu"):
            raise InvalidJobRequest(f"unknown resources.device kind {request.kind[:20]!r}")
        found = self._accelerators
        if found is None:
            raise WorkerUnavailable("the worker is still looking for its GPUs and TPUs; try again shortly")
        if request.kind == "gpu":
            if request.count < 0:
                raise InvalidJobRequest(f"invalid resources.device.gpu.count {request.count}: must be >= 0")
            count = request.count or 1  # a GPU request without a count asks for one
            have = len(found.gpus.ids)
            if have == 0:
                raise PreconditionFailed("this worker has no GPU to hand out")
            if count > have:
                raise PreconditionFailed(f"{count} GPUs requested, this worker has {have}")
            why = found.gpus.mismatch(request.variant)
            if why:
                raise PreconditionFailed(why)
            spec.device_count = count
        else:
            if not found.tpus.devices:
                patterns = ", ".join(found.tpus.patterns)
                raise PreconditionFailed(one_line(f"this worker has no TPU (no device node matches {patterns})"))
            why = found.tpus.mismatch(request.variant, request.topology)
            if why:
                raise PreconditionFailed(why)
            spec.device_count = len(found.tpus.devices)
        spec.device_kind = request.kind
        spec.device_variant = request.variant
        spec.device_topology = request.topology

    # -- from arrival to the end -------------------------------------------------

    def needs(self, spec: JobSpec) -> tuple[DeviceAllocator | None, int]:
        """Which devices a job with ``spec`` waits for, and how many: a TPU job
        waits for every TPU device node."""
        if spec.device_kind == "gpu":
            return self.gpus, spec.device_count
        if spec.device_kind == "tpu":
            return self.tpus, len(self.tpus.ids)
        return None, 0

    def waiting_message(self, spec: JobSpec) -> str:
        if spec.device_kind == "gpu":
            n = spec.device_count
            return f"waiting for {n} GPU{'s' if n != 1 else ''}"
        return "waiting for the TPU"

    def hold(self, record: JobRecord) -> None:
        """A job re-adopted after a restart keeps the devices its container has."""
        allocator = self._allocator(record.spec)
        if allocator is not None and record.devices:
            allocator.hold(record.devices)

    def release(self, record: JobRecord) -> None:
        """Give back a re-adopted job's devices (``hold``'s counterpart)."""
        allocator = self._allocator(record.spec)
        if allocator is not None and record.devices:
            allocator.release(record.devices)

    def _allocator(self, spec: JobSpec) -> DeviceAllocator | None:
        return {"gpu": self.gpus, "tpu": self.tpus}.get(spec.device_kind)

    # -- the container -----------------------------------------------------------

    def container_options(self, record: JobRecord) -> dict[str, Any]:
        """ContainerSpec fields for the devices the job holds."""
        kind, ids = record.spec.device_kind, tuple(record.devices)
        if kind == "gpu" and ids:
            return {"gpu_ids": ids, "shm_size_bytes": self.shm_size_bytes}
        if kind == "tpu" and ids:
            found = self._accelerators.tpus.devices if self._accelerators else ()
            gids = sorted({d.gid for d in found if d.path in ids and d.gid != 0})
            return {
                "devices": ids,
                "group_add": tuple(gids),
                "shm_size_bytes": self.shm_size_bytes,
                "memlock_unlimited": self.tpu_memlock_unlimited,
            }
        return {}

    def environment(self, record: JobRecord, env: dict[str, str]) -> dict[str, str]:
        """``env`` with the job's device variables."""
        env = dict(env)
        kind, ids = record.spec.device_kind, ",".join(record.devices)
        if kind == "gpu":
            env["NVIDIA_VISIBLE_DEVICES"] = ids
            env["FLUSTER_GPU_IDS"] = ids
            env.setdefault("NVIDIA_DRIVER_CAPABILITIES", "compute,utility")
        else:
            env["NVIDIA_VISIBLE_DEVICES"] = "void"
            env.pop("FLUSTER_GPU_IDS", None)
        if kind == "tpu":
            tpu_env = self._accelerators.tpus.env if self._accelerators else {}
            for name, value in tpu_env.items():
                env.setdefault(name, value)
            env["FLUSTER_TPU_DEVICES"] = ids
        return env

    # -- for the pages and metrics -----------------------------------------------

    def usage(self) -> dict[str, dict[str, Any]]:
        """Per kind: every device id and the ids in use."""
        return {
            allocator.kind.lower(): {
                "ids": list(allocator.ids),
                "in_use": sorted(allocator.held),
                "waiting": self.line.waiting_for(allocator.kind) if self.line is not None else 0,
            }
            for allocator in (self.gpus, self.tpus)
        }
