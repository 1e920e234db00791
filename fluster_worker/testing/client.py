"""A small async WorkerService client over treq, for tests and benchmarks.

The end-to-end wire tests use the official Connect client as well; this one
exists because it runs on the reactor instead of blocking a thread per call.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import treq
from google.protobuf.message import Message

from fluster_worker.web.rpc import cluster_pb2 as pb

M = TypeVar("M", bound=Message)


class RpcError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class WorkerClient:
    def __init__(self, base_url: str, http: Any = treq) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http

    async def call(self, method: str, request: Message, response_type: type[M]) -> M:
        response = await self._http.post(
            f"{self.base_url}/fluster.cluster.WorkerService/{method}",
            data=request.SerializeToString(),
            headers={"Content-Type": ["application/proto"], "Connect-Protocol-Version": ["1"]},
        )
        body = await response.content()
        if response.code != 200:
            try:
                error = json.loads(body)
            except ValueError:
                error = {"code": "unknown", "message": body[:200].decode("utf-8", "replace")}
            raise RpcError(response.code, error.get("code", ""), error.get("message", ""))
        return response_type.FromString(body)

    async def run_job(self, request: pb.RunJobRequest) -> pb.RunJobResponse:
        return await self.call("RunJob", request, pb.RunJobResponse)

    async def status(self, job_id: str, include_result: bool = False) -> pb.JobStatus:
        request = pb.GetJobStatusRequest(job_id=job_id, include_result=include_result)
        return await self.call("GetJobStatus", request, pb.JobStatus)

    async def list_jobs(self) -> pb.ListJobsResponse:
        return await self.call("ListJobs", pb.ListJobsRequest(), pb.ListJobsResponse)

    async def fetch_logs(self, job_id: str, **filter_fields: Any) -> list[pb.LogEntry]:
        request = pb.FetchLogsRequest(job_id=job_id, filter=pb.FetchLogsFilter(**filter_fields))
        return list((await self.call("FetchLogs", request, pb.FetchLogsResponse)).logs)

    async def kill(self, job_id: str, term_timeout_ms: int = 0) -> None:
        await self.call("KillJob", pb.KillJobRequest(job_id=job_id, term_timeout_ms=term_timeout_ms), pb.Empty)

    async def health(self) -> pb.HealthResponse:
        return await self.call("HealthCheck", pb.Empty(), pb.HealthResponse)
