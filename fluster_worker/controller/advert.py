"""What RegisterWorker says of this machine: the wire form of the host's facts and
of the accelerators the worker hands out."""

from __future__ import annotations

from fluster_worker.accelerators import Accelerators
from fluster_worker.host import MachineFacts, format_memory, validate_memory_option
from fluster_worker.web.rpc import cluster_pb2 as pb


def resource_spec(
    facts: MachineFacts,
    cpu: int | None = None,
    memory: str | None = None,
    accelerators: Accelerators | None = None,
) -> pb.ResourceSpec:
    """What the worker offers. ``cpu``/``memory`` override the detected values. The
    device is what jobs can really get: the GPUs ``--gpus`` allows, else the TPU when
    there are TPU device nodes (``accelerators``; without them, the GPUs detected)."""
    if cpu is not None and cpu < 1:
        raise ValueError(f"cpu {cpu} must be at least 1")
    spec = pb.ResourceSpec(
        cpu=cpu if cpu is not None else facts.cpu_count,
        memory=validate_memory_option(memory) if memory else format_memory(facts.memory_bytes),
    )
    if accelerators is None:
        if facts.gpu is not None and facts.gpu.count > 0:
            spec.device.gpu.variant = facts.gpu.variant
            spec.device.gpu.count = facts.gpu.count
        return spec
    gpus, tpus = accelerators.gpus, accelerators.tpus
    if gpus.ids:
        spec.device.gpu.variant = gpus.variant
        spec.device.gpu.count = len(gpus.ids)
    elif tpus.devices:
        spec.device.tpu.variant = tpus.accelerator_type or "auto"
        spec.device.tpu.topology = tpus.topology
    return spec


def worker_metadata(facts: MachineFacts, accelerators: Accelerators | None = None) -> pb.WorkerMetadata:
    meta = pb.WorkerMetadata(
        hostname=facts.hostname,
        ip_address=facts.ip_address,
        cpu_count=facts.cpu_count,
        memory_bytes=facts.memory_bytes,
    )
    if accelerators is not None:
        gpus, tpus = accelerators.gpus, accelerators.tpus
        if gpus.ids:
            meta.gpu_count = len(gpus.ids)
            meta.gpu_name = gpus.name
            meta.gpu_memory_mb = gpus.memory_mb
        if tpus.devices:
            meta.tpu_name = tpus.env.get("TPU_NAME", "")
            meta.tpu_worker_hostnames = tpus.env.get("TPU_WORKER_HOSTNAMES", "")
            meta.tpu_worker_id = tpus.env.get("TPU_WORKER_ID", "")
            meta.tpu_chips_per_host_bounds = tpus.env.get("TPU_CHIPS_PER_HOST_BOUNDS", "")
    elif facts.gpu is not None:
        meta.gpu_count = facts.gpu.count
        meta.gpu_name = facts.gpu.name
        meta.gpu_memory_mb = facts.gpu.memory_mb
    return meta
