"""JobManager: accepts jobs, runs each as a JobExecution, keeps their records.

RunJob is answered once the job's entry point and record are on disk (so an
accepted job survives a crash); everything after is Deferred-driven. Records
are saved on every change, so a restarted worker still answers for finished jobs.

Jobs outlive the worker process. Start-up loads the records (no engine needed:
the site opens then, even while the engine is down); once the engine answers,
and again each time it comes back from an outage, the Reconciler
(jobs/reconcile.py) takes over what a previous process left. Stopping leaves the jobs running (``detach``), unless
``stop_jobs_on_exit`` asks for the old drain: every job is stopped and ends
WORKER_FAILED.
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
from fluster_worker.containers.health import EngineHealth
from fluster_worker.containers.ports import PortAllocator, PortsExhausted
from fluster_worker.jobs import validation
from fluster_worker.jobs.execution import JobExecution, Toolkit
from fluster_worker.jobs.intake import check_attempt, check_conditions, check_line
from fluster_worker.jobs.model import (
    InvalidJobRequest,
    JobNotFound,
    JobRecord,
    JobRequest,
    JobState,
    PreconditionFailed,
    ResourcesExhausted,
    StopRequest,
    WorkerUnavailable,
)
from fluster_worker.jobs.outcome import KILLED_BY_REQUEST
from fluster_worker.jobs.reconcile import Reconciler
from fluster_worker.jobs.recovery import BundlePins
from fluster_worker.jobs.retention import expired
from fluster_worker.jobs.store import JobStore, ResultTooLarge
from fluster_worker.logs import LogStore
from fluster_worker.node.conditions import NodeConditions

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
        stop_jobs_on_exit: bool = False,
        conditions: NodeConditions | None = None,
        engine: EngineHealth | None = None,
        limits: validation.RequestLimits = validation.DEFAULT_LIMITS,
        max_pending_jobs: int | None = None,
    ) -> None:
        """``conditions``: new jobs are refused while one blocks. ``engine``: the
        containers are reconciled once it is up, and again after each outage
        (without it, at once). ``max_pending_jobs``: RunJob is refused
        (resource_exhausted) while that many jobs wait PENDING (None: no bound)."""
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
        self._stop_jobs_on_exit = stop_jobs_on_exit
        self._conditions = conditions
        self._engine = engine
        self._limits = limits
        self._max_pending = max_pending_jobs
        self._kit = replace(kit, changed=self._changed)
        self._store: JobStore = kit.store
        # The cached bundles the jobs of a previous process mount, kept until recovery decides.
        self._pins = BundlePins(kit.bundles)
        self._jobs: dict[str, JobRecord] = {}
        self._active: dict[str, JobExecution] = {}
        # The ids of the RUNNING records, kept as they change (``_changed``):
        # every HealthCheck reads the count, and up to the retention count of
        # finished records (1,000 by default) are kept beside them.
        self._running_ids: set[str] = set()
        self._persisted: dict[str, Once[None]] = {}
        self._listeners: list[StateListener] = []
        self._pruner = LoopingCall(self.prune)
        self._pruner.clock = reactor
        self._loaded: Once[None] = Once()
        self._reconciler = Reconciler(
            self._kit,
            self._jobs,
            self._active,
            ports,
            self._pins,
            run=self._run,
            changed=self._changed,
            now_ms=self._now_ms,
            running=lambda: bool(self.running),
        )
        self._reconciled = self._reconciler.done
        self._arrival = 0

    @property
    def slots(self) -> DeferredSemaphore:
        return self._kit.slots

    def add_listener(self, listener: StateListener) -> None:
        """``listener(record)`` runs on every state or phase change of any job."""
        self._listeners.append(listener)

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self._load())
        d.addErrback(lambda f: self.log.failure("loading job records failed", f))

    def ready(self) -> Deferred[None]:
        """A new Deferred that fires once the records of a previous run are loaded
        (the web site opens only then, so no call sees a half-loaded worker)."""
        return self._loaded.wait()

    def reconciled(self) -> Deferred[None]:
        """A new Deferred that fires once the jobs of a previous run are re-adopted,
        restarted or said to be lost (this needs the engine)."""
        return self._reconciled.wait()

    async def _load(self) -> None:
        for record in await self._store.load_all():
            if record.job_id not in self._jobs:
                self._jobs[record.job_id] = record
                if record.state is JobState.RUNNING:
                    self._running_ids.add(record.job_id)
                self._arrival = max(self._arrival, record.arrival)
        # Before anything can fetch a bundle (and so evict one): see recovery.py.
        self._pins.hold(self._jobs.values())
        self._loaded.fire(None)
        self._pruner.start(60, now=True)
        self._reconciler.start(self._engine)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        if self._pruner.running:
            self._pruner.stop()
        if not self._stop_jobs_on_exit:
            # The jobs run on; the next worker process re-adopts them. All stop
            # taking steps first: a slot one gives back must not start another.
            executions = list(self._active.values())
            for execution in executions:
                execution.freeze()
            for execution in executions:
                execution.detach()
            return succeed(None)
        stopping = [
            execution.kill(self._shutdown_grace, JobState.WORKER_FAILED, "worker shut down")
            for execution in list(self._active.values())
        ]
        return DeferredList(stopping, consumeErrors=True).addCallback(lambda _: None)

    # -- RPC entry points ------------------------------------------------------

    def submit(self, request: JobRequest) -> JobRecord:
        """Validate and accept a job (its record, PENDING); raises a JobError.
        ``accepted(job_id)`` says when it is on disk."""
        if not self._loaded.happened:
            raise WorkerUnavailable("the worker is starting; try again shortly")
        job_id = validation.job_id_of(request)
        attempt = request.attempt_id
        existing = self._jobs.get(job_id)
        retried = check_attempt(existing, job_id, attempt)
        if retried is not None:
            return retried
        check_conditions(self._conditions)
        if self._max_pending is not None:
            check_line(sum(1 for e in self._active.values() if e.record.state is JobState.PENDING), self._max_pending)
        spec = validation.job_spec(request, self._cpu_count, self._kit.devices, self._limits)
        try:
            ports = self._ports.allocate(spec.port_names)
        except PortsExhausted as e:
            raise ResourcesExhausted(str(e)) from None
        self._arrival += 1
        record = JobRecord(
            job_id=job_id,
            attempt_id=attempt,
            worker_id=self.worker_id,
            spec=spec,
            submitted_at_ms=self._now_ms(),
            ports=ports,
            arrival=self._arrival,
        )
        record.phases.append(("pending", record.submitted_at_ms))
        self._jobs[job_id] = record
        # The entry point and the record go to disk before RunJob is answered; the
        # job takes its place in line now (arrival order) and waits for that.
        persisted: Once[None] = Once()
        self._persisted[job_id] = persisted
        self._notify(record)  # PENDING
        cleared = self._forget_files(job_id) if existing is not None else succeed(None)
        cleared.addCallback(lambda _: self._store.prepare(job_id, request.entrypoint))
        cleared.addCallback(lambda _: self._store.save(record))
        cleared.addCallbacks(
            lambda saved: persisted.fire(None) if saved else persisted.fail(_not_saved(job_id, self._store.save_error)),
            lambda f: persisted.fail(_not_saved(job_id, f.getErrorMessage())),
        )
        execution = JobExecution(record, b"", self._kit)
        self._run(execution, execution.start(persisted.wait()))
        self.log.info("accepted job {job_id} attempt {attempt}", job_id=job_id, attempt=attempt)
        return record

    def accepted(self, job_id: str) -> Deferred[None]:
        """Fires once the job's entry point and record are on disk; fails with
        ResourcesExhausted if they could not be written (the job is then refused:
        it never runs, and the worker forgets it)."""
        persisted = self._persisted.get(job_id)
        return succeed(None) if persisted is None else persisted.wait()

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
        if term_timeout_ms < 0:
            raise InvalidJobRequest(f"invalid term_timeout_ms {term_timeout_ms}")
        grace = min((term_timeout_ms or 5000) / 1000.0, self._max_kill_grace)
        execution = self._active.get(job_id)
        if execution is None and not record.state.terminal and not self._reconciled.happened:
            # A job of the previous worker process, not taken over yet (that needs
            # the engine): the kill is kept in its record and carried out then.
            if record.stop is None:
                record.stop = StopRequest(JobState.KILLED.name, KILLED_BY_REQUEST, self._now_ms(), int(grace * 1000))
                self._changed(record)
            waiting = self._reconciled.wait()
            waiting.addTimeout(grace + KILL_SETTLE_SECONDS, self._reactor)  # type: ignore[arg-type]
            try:
                await waiting
            except TimeoutError:
                self.log.warn("job {job_id} will be killed once the engine answers", job_id=job_id)
                return
            execution = self._active.get(job_id)
        if record.state.terminal or execution is None:
            raise PreconditionFailed(f"job {job_id} already finished as {record.state.name}")
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
        return len(self._running_ids)

    # -- internals -------------------------------------------------------------

    def _run(self, execution: JobExecution, running: Deferred[None]) -> None:
        job_id = execution.record.job_id
        self._active[job_id] = execution
        running.addErrback(lambda f: self.log.failure("job {job_id} crashed", f, job_id=job_id))
        running.addBoth(lambda _: self._finished(job_id, execution))

    def _changed(self, record: JobRecord) -> None:
        if self._jobs.get(record.job_id) is record:  # (not a replaced attempt's)
            if record.state is JobState.RUNNING:
                self._running_ids.add(record.job_id)
            else:
                self._running_ids.discard(record.job_id)
        self._store.save(record).addErrback(
            lambda f: self.log.failure("saving job {job_id} failed", f, job_id=record.job_id)
        )
        self._notify(record)

    def _notify(self, record: JobRecord) -> None:
        for listener in list(self._listeners):
            try:
                listener(record)
            except Exception:
                self.log.failure("state listener failed for {job_id}", job_id=record.job_id)

    def _finished(self, job_id: str, execution: JobExecution) -> None:
        if self._active.get(job_id) is execution:
            del self._active[job_id]
        self._ports.release(execution.record.ports.values())
        self._persisted.pop(job_id, None)
        if execution.refused and self._jobs.get(job_id) is execution.record:
            # Never accepted: RunJob said so; nothing of it stays.
            del self._jobs[job_id]
            self._forget_files(job_id).addErrback(self._log_delete_failure, job_id)
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
        forget = expired(self._jobs, self._active, self._now_ms(), self._retention_count, self._retention_seconds)
        for record in forget:
            del self._jobs[record.job_id]
            self._forget_files(record.job_id).addErrback(self._log_delete_failure, record.job_id)

    def _log_delete_failure(self, failure: Failure, job_id: str) -> None:
        self.log.failure("deleting {job_id} failed", failure, job_id=job_id)

    def _now_ms(self) -> int:
        return int(self._reactor.seconds() * 1000)


def _not_saved(job_id: str, cause: str) -> ResourcesExhausted:
    return ResourcesExhausted(f"cannot save job {job_id} to disk: {cause or 'unknown error'}")
