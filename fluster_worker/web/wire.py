"""The only translation between the wire (protobuf messages) and the job core's
domain types, both ways, and from domain errors to Connect codes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fluster_worker.jobs.model import (
    DeviceRequest,
    InvalidJobRequest,
    JobAlreadyExists,
    JobError,
    JobNotFound,
    JobRecord,
    JobRequest,
    JobState,
    PreconditionFailed,
    ResourcesExhausted,
    WorkerUnavailable,
)
from fluster_worker.logs.model import LogLine, LogQuery
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.rpc.errors import Code, ConnectError

_CODES: tuple[tuple[type[JobError], Code], ...] = (
    (InvalidJobRequest, Code.INVALID_ARGUMENT),
    (JobNotFound, Code.NOT_FOUND),
    (JobAlreadyExists, Code.ALREADY_EXISTS),
    (PreconditionFailed, Code.FAILED_PRECONDITION),
    (ResourcesExhausted, Code.RESOURCE_EXHAUSTED),
    (WorkerUnavailable, Code.UNAVAILABLE),
)


def connect_error(error: JobError) -> ConnectError:
    """The Connect error a caller gets for a domain error."""
    for kind, code in _CODES:
        if isinstance(error, kind):
            return ConnectError(code, error.message)
    return ConnectError(Code.INTERNAL, error.message)


def job_request(message: pb.RunJobRequest) -> JobRequest:
    env = message.environment
    res = message.resources
    device = DeviceRequest()
    if res.HasField("device"):
        kind = res.device.WhichOneof("device") or ""
        if kind == "gpu":
            device = DeviceRequest("gpu", res.device.gpu.variant, res.device.gpu.count)
        elif kind == "tpu":
            device = DeviceRequest("tpu", res.device.tpu.variant, 0, res.device.tpu.topology)
        elif kind == "cpu":
            device = DeviceRequest("cpu", res.device.cpu.variant)
    return JobRequest(
        job_id=message.job_id,
        attempt_id=message.attempt_id,
        entrypoint=message.serialized_entrypoint,
        bundle_url=message.bundle_gcs_path,
        env_vars=dict(env.env_vars),
        extras=tuple(env.extras),
        pip_packages=tuple(env.pip_packages),
        workspace=env.workspace,
        cpu=res.cpu,
        memory=res.memory,
        disk=res.disk,
        device=device,
        timeout_seconds=message.timeout_seconds,
        port_names=tuple(message.ports),
    )


def run_response(record: JobRecord) -> pb.RunJobResponse:
    return pb.RunJobResponse(job_id=record.job_id, state=_state(record.state))


def job_status(record: JobRecord, worker_address: str = "", result: bytes = b"") -> pb.JobStatus:
    state = _state(record.state)
    u = record.usage
    b = record.build
    status = pb.JobStatus(
        job_id=record.job_id,
        state=state,
        exit_code=record.exit_code,
        error=record.error,
        started_at_ms=record.started_at_ms,
        finished_at_ms=record.finished_at_ms,
        ports=record.ports,
        resource_usage=pb.ResourceUsage(
            memory_mb=u.memory_mb,
            disk_mb=u.disk_mb,
            cpu_millicores=u.cpu_millicores,
            memory_peak_mb=u.memory_peak_mb,
            cpu_percent=u.cpu_percent,
            process_count=u.process_count,
        ),
        status_message=record.status_message,
        build_metrics=pb.BuildMetrics(
            build_started_ms=b.started_ms,
            build_finished_ms=b.finished_ms,
            from_cache=b.from_cache,
            image_tag=b.image_tag,
        ),
        worker_id=record.worker_id,
        worker_address=worker_address,
        serialized_result=result,
        current_attempt_id=record.attempt_id,
        attempts=[
            pb.JobAttempt(
                attempt_id=record.attempt_id,
                worker_id=record.worker_id,
                state=state,
                exit_code=record.exit_code,
                error=record.error,
                started_at_ms=record.started_at_ms,
                finished_at_ms=record.finished_at_ms,
                is_worker_failure=record.state is JobState.WORKER_FAILED,
            )
        ],
    )
    if record.state in (JobState.FAILED, JobState.WORKER_FAILED):
        status.failure_count = 1
    return status


def status_key(record: JobRecord, worker_address: str = "") -> tuple[Any, ...]:
    """Everything ``job_status`` reads (without a result): equal keys, equal
    statuses. The status cache (statuses.py) compares them to know a record changed."""
    u = record.usage
    b = record.build
    return (
        record.state, record.status_message, record.exit_code, record.error,
        record.started_at_ms, record.finished_at_ms, tuple(record.ports.items()),
        u.memory_mb, u.disk_mb, u.cpu_millicores, u.memory_peak_mb, u.cpu_percent, u.process_count,
        b.started_ms, b.finished_ms, b.from_cache, b.image_tag,
        record.job_id, record.worker_id, record.attempt_id, worker_address,
    )


def job_statuses(records: Iterable[JobRecord], worker_address: str) -> pb.ListJobsResponse:
    return pb.ListJobsResponse(jobs=[job_status(r, worker_address) for r in records])


def log_query(f: pb.FetchLogsFilter) -> LogQuery:
    return LogQuery(
        regex=f.regex,
        start_line=f.start_line,
        start_ms=f.start_ms,
        end_ms=f.end_ms,
        max_lines=f.max_lines,
        after_seq=f.after_seq if f.HasField("after_seq") else None,
    )


def log_entries(lines: Iterable[LogLine]) -> pb.FetchLogsResponse:
    return pb.FetchLogsResponse(
        logs=[
            pb.LogEntry(timestamp_ms=line.timestamp_ms, source=line.source, data=line.data, seq=line.seq)
            for line in lines
        ]
    )


# Built by name, so a JobState the wire does not know fails at import.
_WIRE_STATES = {state: pb.JobState.Value("JOB_STATE_" + state.name) for state in JobState}


def _state(state: JobState) -> Any:
    return _WIRE_STATES[state]
