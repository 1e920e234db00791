"""JobManager: accepts jobs, runs each as a JobExecution, keeps their records.

RunJob is answered at once; everything after is Deferred-driven. Records are
saved under the state dir on every change, so a restarted worker still
answers GetJobStatus and ListJobs for finished jobs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.common.safe_files import UnsafeFile
from fluster_worker.common.waiters import Once
from fluster_worker.containers.ports import PortAllocator, PortsExhausted
from fluster_worker.jobs import validation
from fluster_worker.jobs.execution import JobExecution, Toolkit
from fluster_worker.jobs.model import (
    InvalidJobRequest,
    JobAlreadyExists,
    JobNotFound,
    JobRecord,
    JobRequest,
    JobState,
    PreconditionFailed,
    ResourcesExhausted,
    WorkerUnavailable,
)
from fluster_worker.jobs.store import JobStore, ResultTooLarge
from fluster_worker.logs import LogStore

StateListener = Callable[[JobRecord], None]
#: How long a KillJob caller waits past the grace for the job to end.
KILL_SETTLE_SECONDS = 30.0


class JobManager(Service):
    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        kit: Toolkit,
        logs: LogStore,
        ports: PortAllocator,
        worker_id: str,
        *,
        cpu_count: int,
        retention_count: int = 1000,
        retention_seconds: float = 7 * 24 * 3600,
        max_result_bytes: int = 64 * 2**20,
        shutdown_grace_seconds: float = 5.0,
        max_kill_grace_seconds: float = 300.0,
    ) -> None:
        self._reactor = reactor
        self._logs = logs
        self._ports = ports
        self.worker_id = worker_id
        self._cpu_count = cpu_count
        self._retention_count = retention_count
        self._retention_seconds = retention_seconds
        self._max_result_bytes = max_result_bytes
        self._shutdown_grace = shutdown_grace_seconds
        self._max_kill_grace = max_kill_grace_seconds
        self._kit = replace(kit, changed=self._changed)
        self._store: JobStore = kit.store
        self._jobs: dict[str, JobRecord] = {}
        self._active: dict[str, JobExecution] = {}
        self._listeners: list[StateListener] = []
        self._pruner = LoopingCall(self.prune)
        self._pruner.clock = reactor
        self._recovered: Once[None] = Once()

    @property
    def slots(self) -> DeferredSemaphore:
        return self._kit.slots

    def add_listener(self, listener: StateListener) -> None:
        """``listener(record)`` runs on every state or phase change of any job."""
        self._listeners.append(listener)

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._recovery = Deferred.fromCoroutine(self._recover())
        self._recovery.addErrback(lambda f: self.log.failure("recovering job records failed", f))

    def ready(self) -> Deferred[None]:
        """A new Deferred that fires once the records of a previous run are loaded
        (the web site opens only then, so no call sees a half-loaded worker)."""
        return self._recovered.wait()

    async def _recover(self) -> None:
        removed = await self._kit.runtime.remove_orphans()
        if removed:
            self.log.warn("removed {count} containers left by a previous worker process", count=removed)
        for record in await self._store.load_all():
            if record.job_id in self._jobs:
                continue
            self._jobs[record.job_id] = record
            if not record.state.terminal:
                # The previous process died with this job unfinished: say so.
                record.error = f"worker restarted while the job was {record.state.name}"
                record.move(JobState.WORKER_FAILED, self._now_ms(), "worker restarted")
                self._changed(record)
        self._recovered.fire(None)
        self._pruner.start(60, now=True)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        if self._pruner.running:
            self._pruner.stop()
        stopping = [
            execution.kill(self._shutdown_grace, JobState.WORKER_FAILED, "worker shut down")
            for execution in list(self._active.values())
        ]
        return DeferredList(stopping, consumeErrors=True).addCallback(lambda _: None)

    # -- RPC entry points ------------------------------------------------------

    def submit(self, request: JobRequest) -> JobRecord:
        """Validate and accept a job (its record, PENDING); raises a JobError."""
        if not self._recovered.happened:
            raise WorkerUnavailable("the worker is starting; try again shortly")
        job_id = validation.job_id_of(request)
        attempt = request.attempt_id
        existing = self._jobs.get(job_id)
        if existing is not None:
            if existing.attempt_id == attempt:
                # A retried RunJob (e.g. after a controller timeout): idempotent.
                return existing
            if not existing.state.terminal:
                raise JobAlreadyExists(
                    f"job {job_id} is already {existing.state.name} as attempt {existing.attempt_id}",
                )
            if attempt < existing.attempt_id:
                raise JobAlreadyExists(
                    f"job {job_id} already ran as attempt {existing.attempt_id} (got attempt {attempt})",
                )
        spec = validation.job_spec(request, self._cpu_count, self._kit.devices)
        try:
            ports = self._ports.allocate(spec.port_names)
        except PortsExhausted as e:
            raise ResourcesExhausted(str(e)) from None
        record = JobRecord(
            job_id=job_id,
            attempt_id=attempt,
            worker_id=self.worker_id,
            spec=spec,
            submitted_at_ms=self._now_ms(),
            ports=ports,
        )
        record.phases.append(("pending", record.submitted_at_ms))
        self._jobs[job_id] = record
        execution = JobExecution(record, request.entrypoint, self._kit)
        self._active[job_id] = execution
        # A replaced attempt's files go first; then the record is saved (so it is
        # on disk from PENDING on) and the run starts.
        cleared = self._forget_files(job_id) if existing is not None else succeed(None)
        cleared.addCallback(lambda _: self._changed(record))
        cleared.addCallback(lambda _: execution.start())
        cleared.addErrback(lambda f: self.log.failure("job {job_id} crashed", f, job_id=job_id))
        cleared.addBoth(lambda _: self._finished(job_id, execution))
        self.log.info("accepted job {job_id} attempt {attempt}", job_id=job_id, attempt=attempt)
        return record

    # -- queries (records are the manager's: callers read them, never change them) --

    def get(self, job_id: str) -> JobRecord:
        """The job's record; JobNotFound (InvalidJobRequest for a malformed id)."""
        validation.check_job_id(job_id)
        record = self._jobs.get(job_id)
        if record is None:
            raise JobNotFound(f"job {job_id} not found")
        return record

    def find(self, job_id: str) -> JobRecord | None:
        """The job's record, or None (also for a malformed id)."""
        return self._jobs.get(job_id)

    def records(self) -> list[JobRecord]:
        """Every job the worker still knows, finished ones included."""
        return list(self._jobs.values())

    def job_count(self) -> int:
        return len(self._jobs)

    async def result(self, job_id: str) -> bytes:
        """The pickled return value of a SUCCEEDED job; b"" when it has none."""
        record = self.get(job_id)
        if record.state is not JobState.SUCCEEDED or not record.has_result:
            return b""
        try:
            return await self._store.read_result(job_id, self._max_result_bytes)
        except ResultTooLarge as e:
            raise ResourcesExhausted(str(e)) from None
        except UnsafeFile as e:
            raise PreconditionFailed(f"result of {job_id} refused: {e}") from None

    async def kill(self, job_id: str, term_timeout_ms: int) -> None:
        record = self.get(job_id)
        execution = self._active.get(job_id)
        if record.state.terminal or execution is None:
            raise PreconditionFailed(f"job {job_id} already finished as {record.state.name}")
        if term_timeout_ms < 0:
            raise InvalidJobRequest(f"invalid term_timeout_ms {term_timeout_ms}")
        grace = min((term_timeout_ms or 5000) / 1000.0, self._max_kill_grace)
        self.log.info("killing job {job_id} (grace {grace} s)", job_id=job_id, grace=grace)
        # The caller waits for the job to end, but never much past its grace:
        # past it the SIGKILL is on its way, and the record tells the rest.
        ended = execution.kill(grace)
        ended.addTimeout(grace + KILL_SETTLE_SECONDS, self._reactor)  # type: ignore[arg-type]
        try:
            await ended
        except TimeoutError:
            self.log.warn("job {job_id} is still stopping {s} s after its kill", job_id=job_id, s=grace)

    def running_count(self) -> int:
        return sum(1 for r in self._jobs.values() if r.state is JobState.RUNNING)

    # -- internals -------------------------------------------------------------

    def _changed(self, record: JobRecord) -> None:
        self._store.save(record).addErrback(
            lambda f: self.log.failure("saving job {job_id} failed", f, job_id=record.job_id)
        )
        for listener in list(self._listeners):
            try:
                listener(record)
            except Exception:
                self.log.failure("state listener failed for {job_id}", job_id=record.job_id)

    def _finished(self, job_id: str, execution: JobExecution) -> None:
        if self._active.get(job_id) is execution:
            del self._active[job_id]
        self._ports.release(execution.record.ports.values())
        if len(self._jobs) > self._retention_count:
            self.prune()

    def _forget_files(self, job_id: str) -> Deferred[None]:
        d = self._logs.delete(job_id)
        d.addCallback(lambda _: self._store.delete(job_id))
        return d

    def prune(self) -> None:
        """Forget finished jobs past the retention count or age, oldest first,
        and let the image builder drop unused images past its caps."""
        self._kit.builder.gc().addErrback(lambda f: self.log.failure("image gc failed", f))
        now = self._now_ms()
        finished = sorted(
            (r for r in self._jobs.values() if r.state.terminal and r.job_id not in self._active),
            key=lambda r: r.finished_at_ms,
        )
        excess = len(self._jobs) - self._retention_count
        for record in finished:
            too_old = now - record.finished_at_ms > self._retention_seconds * 1000
            if excess <= 0 and not too_old:
                break
            excess -= 1
            del self._jobs[record.job_id]
            self._store.forget(record.job_id)
            self._forget_files(record.job_id).addErrback(self._log_delete_failure, record.job_id)

    def _log_delete_failure(self, failure: Failure, job_id: str) -> None:
        self.log.failure("deleting {job_id} failed", failure, job_id=job_id)

    def _now_ms(self) -> int:
        return int(self._reactor.seconds() * 1000)
