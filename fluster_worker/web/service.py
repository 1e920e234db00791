"""WorkerService: the RPC methods of the wire contract, as plain methods.

The Connect layer (``rpc.connect``) maps HTTP to these; they only speak
messages and ``ConnectError``.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from fluster_worker.jobs.manager import JobManager
from fluster_worker.jobs.model import valid_job_id
from fluster_worker.logs import InvalidLogQuery, LogQuery, LogQueryTimeout, LogStore
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.rpc.errors import Code, ConnectError


class WorkerService:
    def __init__(self, manager: JobManager, logs: LogStore, clock: IReactorTime) -> None:
        self._manager = manager
        self._logs = logs
        self._clock = clock
        self._started = clock.seconds()

    def RunJob(self, request: pb.RunJobRequest) -> pb.RunJobResponse:
        return self._manager.submit(request)

    async def GetJobStatus(self, request: pb.GetJobStatusRequest) -> pb.JobStatus:
        return await self._manager.status(request.job_id, request.include_result)

    def ListJobs(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=self._manager.list_statuses())

    async def FetchLogs(self, request: pb.FetchLogsRequest) -> pb.FetchLogsResponse:
        if not valid_job_id(request.job_id) or request.job_id not in self._manager.jobs:
            return pb.FetchLogsResponse()  # the contract: an unknown job has no logs
        f = request.filter
        query = LogQuery(
            regex=f.regex,
            start_line=f.start_line,
            start_ms=f.start_ms,
            end_ms=f.end_ms,
            max_lines=f.max_lines,
            after_seq=f.after_seq if f.HasField("after_seq") else None,
        )
        try:
            lines = await self._logs.query(request.job_id, query)
        except LogQueryTimeout as e:
            raise ConnectError(Code.DEADLINE_EXCEEDED, str(e)) from None
        except InvalidLogQuery as e:
            raise ConnectError(Code.INVALID_ARGUMENT, str(e)) from None
        return pb.FetchLogsResponse(
            logs=[
                pb.LogEntry(timestamp_ms=line.timestamp_ms, source=line.source, data=line.data, seq=line.seq)
                for line in lines
            ]
        )

    async def KillJob(self, request: pb.KillJobRequest) -> pb.Empty:
        await self._manager.kill(request.job_id, request.term_timeout_ms)
        return pb.Empty()

    def HealthCheck(self, request: pb.Empty) -> pb.HealthResponse:
        return pb.HealthResponse(
            healthy=True,
            uptime_ms=int((self._clock.seconds() - self._started) * 1000),
            running_jobs=self._manager.running_count(),
        )
