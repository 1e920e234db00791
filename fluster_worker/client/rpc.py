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
    """``token``: sent as ``Authorization: Bearer`` (a worker with
    ``--auth-token-file``); ``ca_pem``: the CA (or self-signed certificate) an
    ``https://`` worker's certificate is checked against, besides the system's."""

    def __init__(
        self, url: str, timeout_ms: int = 30_000, *, token: str | None = None, ca_pem: bytes | None = None
    ) -> None:
        connectrpc = _connect()
        self._method_info = connectrpc.method.MethodInfo
        self._unknown = connectrpc.method.IdempotencyLevel.UNKNOWN
        http_client = None
        if ca_pem is not None:
            import pyqwest

            http_client = pyqwest.SyncClient(
                pyqwest.SyncHTTPTransport(tls_ca_cert=ca_pem, tls_include_system_certs=True)
            )
        self._headers = {"authorization": f"Bearer {token}"} if token else None
        self._client = connectrpc.client.ConnectClientSync(
            url.rstrip("/"), timeout_ms=timeout_ms, http_client=http_client
        )

    def _call(self, name: str, request: Message, response_type: type[M]) -> M:
        method = self._method_info(
            name=name, service_name=SERVICE, input=type(request), output=response_type,
            idempotency_level=self._unknown,
        )
        return self._client.execute_unary(  # type: ignore[no-any-return]
            request=request, method=method, headers=self._headers
        )

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
