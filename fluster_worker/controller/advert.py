"""What RegisterWorker says of this machine: the wire form of the host's facts."""

from __future__ import annotations

from fluster_worker.host import MachineFacts, format_memory, validate_memory_option
from fluster_worker.web.rpc import cluster_pb2 as pb


def resource_spec(facts: MachineFacts, cpu: int | None = None, memory: str | None = None) -> pb.ResourceSpec:
    """What the worker offers. ``cpu``/``memory`` override the detected values; a
    device is set only when a GPU is really present."""
    if cpu is not None and cpu < 1:
        raise ValueError(f"cpu {cpu} must be at least 1")
    spec = pb.ResourceSpec(
        cpu=cpu if cpu is not None else facts.cpu_count,
        memory=validate_memory_option(memory) if memory else format_memory(facts.memory_bytes),
    )
    if facts.gpu is not None and facts.gpu.count > 0:
        spec.device.gpu.variant = facts.gpu.variant
        spec.device.gpu.count = facts.gpu.count
    return spec


def worker_metadata(facts: MachineFacts) -> pb.WorkerMetadata:
    meta = pb.WorkerMetadata(
        hostname=facts.hostname,
        ip_address=facts.ip_address,
        cpu_count=facts.cpu_count,
        memory_bytes=facts.memory_bytes,
    )
    if facts.gpu is not None:
        meta.gpu_count = facts.gpu.count
        meta.gpu_name = facts.gpu.name
        meta.gpu_memory_mb = facts.gpu.memory_mb
    return meta
