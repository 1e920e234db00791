"""WorkerService over the official Connect client (connect-python, what the
existing Controller and clients use): binary protobuf, gzip, blocking calls."""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf.message import Message

from fluster_worker.web.rpc import cluster_pb2 as pb

SERVICE = "fluster.cluster.WorkerService"
M = TypeVar("M", bound=Message)


class MissingClient(RuntimeError):
    """connect-python (and cloudpickle) are an optional extra of fluster-worker."""


def _connect() -> Any:
    try:
        import connectrpc.client
        import connectrpc.method
    except ImportError:
        raise MissingClient(
            "this command needs the Connect client: pip install 'fluster-worker[client]'"
        ) from None
    return connectrpc


class WorkerRpc:
    def __init__(self, url: str, timeout_ms: int = 30_000) -> None:
        connectrpc = _connect()
        self._method_info = connectrpc.method.MethodInfo
        self._unknown = connectrpc.method.IdempotencyLevel.UNKNOWN
        self._client = connectrpc.client.ConnectClientSync(url.rstrip("/"), timeout_ms=timeout_ms)

    def _call(self, name: str, request: Message, response_type: type[M]) -> M:
        method = self._method_info(
            name=name, service_name=SERVICE, input=type(request), output=response_type,
            idempotency_level=self._unknown,
        )
        return self._client.execute_unary(request=request, method=method)  # type: ignore[no-any-return]

    def run_job(self, request: pb.RunJobRequest) -> pb.RunJobResponse:
        return self._call("RunJob", request, pb.RunJobResponse)

    def status(self, job_id: str, include_result: bool = False) -> pb.JobStatus:
        return self._call("GetJobStatus", pb.GetJobStatusRequest(job_id=job_id, include_result=include_result),
                          pb.JobStatus)

    def fetch_logs(self, job_id: str, log_filter: pb.FetchLogsFilter) -> list[pb.LogEntry]:
        request = pb.FetchLogsRequest(job_id=job_id, filter=log_filter)
        return list(self._call("FetchLogs", request, pb.FetchLogsResponse).logs)

    def kill(self, job_id: str, term_timeout_ms: int = 0) -> None:
        self._call("KillJob", pb.KillJobRequest(job_id=job_id, term_timeout_ms=term_timeout_ms), pb.Empty)

    def close(self) -> None:
        self._client.close()


def describe_error(error: BaseException) -> str:
    """One line for a failed call: the Connect code and message when there is one."""
    code = getattr(error, "code", None)
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    name = getattr(code, "value", None)
    return f"{name}: {message}" if isinstance(name, str) else f"{type(error).__name__}: {message}"
