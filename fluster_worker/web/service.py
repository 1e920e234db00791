"""WorkerService: the RPC methods of the wire contract, as plain methods.

The Connect layer (``rpc.connect``) maps HTTP to these. They translate
messages to the job core's domain types and back (``wire``), and domain
errors to ``ConnectError``.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from fluster_worker.jobs.manager import JobManager
from fluster_worker.jobs.model import JobError, JobRecord, valid_job_id
from fluster_worker.logs import InvalidLogQuery, LogQueryTimeout, LogStore
from fluster_worker.node import NodeConditions
from fluster_worker.web import wire
from fluster_worker.web.logpage import PageGate
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.rpc.connect import Encoded
from fluster_worker.web.rpc.errors import Code, ConnectError
from fluster_worker.web.statuses import StatusCache


class WorkerService:
    def __init__(
        self,
        manager: JobManager,
        logs: LogStore,
        clock: IReactorTime,
        advertised_address: Callable[[], str] = lambda: "",
        conditions: NodeConditions | None = None,
    ) -> None:
        self._manager = manager
        self._logs = logs
        self._clock = clock
        self._address = advertised_address
        self._conditions = conditions
        self._started = clock.seconds()
        self._statuses = StatusCache(manager.records, advertised_address)
        self._pages = PageGate()

    async def RunJob(self, request: pb.RunJobRequest) -> pb.RunJobResponse:
        """Answered once the job is on disk: an accepted job survives a crash."""
        try:
            record = self._manager.submit(wire.job_request(request))
            response = wire.run_response(record)  # its state when accepted
            await self._manager.accepted(record.job_id)
        except JobError as e:
            raise wire.connect_error(e) from None
        return response

    def GetJobStatus(self, request: pb.GetJobStatusRequest) -> Encoded | Deferred[pb.JobStatus]:
        """Served from the status's cached bytes, unless the result is asked for."""
        try:
            record = self._manager.get(request.job_id)
        except JobError as e:
            raise wire.connect_error(e) from None
        if not request.include_result:
            return self._statuses.status(record)
        return Deferred.fromCoroutine(self._with_result(record))

    async def _with_result(self, record: JobRecord) -> pb.JobStatus:
        try:
            result = await self._manager.result(record.job_id)
        except JobError as e:
            raise wire.connect_error(e) from None
        return wire.job_status(record, self._address(), result)

    def ListJobs(self, request: pb.ListJobsRequest) -> Encoded:
        """Every job's status, joined from their cached bytes (statuses.py)."""
        return self._statuses.listing()

    async def FetchLogs(self, request: pb.FetchLogsRequest) -> pb.FetchLogsResponse | Encoded:
        """At most a page (logs/query.py), encoded off the reactor when large (logpage.py)."""
        if not valid_job_id(request.job_id) or self._manager.find(request.job_id) is None:
            return pb.FetchLogsResponse()  # the contract: an unknown job has no logs
        query = wire.log_query(request.filter)
        try:
            return await self._pages.page(lambda: self._logs.query(request.job_id, query))
        except LogQueryTimeout as e:
            raise ConnectError(Code.DEADLINE_EXCEEDED, str(e)) from None
        except InvalidLogQuery as e:
            raise ConnectError(Code.INVALID_ARGUMENT, str(e)) from None

    async def KillJob(self, request: pb.KillJobRequest) -> pb.Empty:
        try:
            await self._manager.kill(request.job_id, request.term_timeout_ms)
        except JobError as e:
            raise wire.connect_error(e) from None
        return pb.Empty()

    def HealthCheck(self, request: pb.Empty) -> pb.HealthResponse:
        return pb.HealthResponse(
            # Unhealthy while a node condition refuses new work (the engine is
            # down, the disk below its floor); the dashboard says why.
            healthy=self._conditions is None or self._conditions.healthy,
            uptime_ms=int((self._clock.seconds() - self._started) * 1000),
            running_jobs=self._manager.running_count(),
        )
