"""The Reconciler: carries out recovery (recovery.py) for the JobManager once
the engine answers, and again each time it comes back from an outage. The
containers a previous process left are re-adopted, lost jobs are said to be
lost, waiting jobs start again in arrival order and stray containers are
removed (SIGTERM, the grace, SIGKILL). One pass at a time: a pass asked for
while one runs follows it."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from fluster_worker.common.waiters import Once
from fluster_worker.containers.health import EngineHealth
from fluster_worker.containers.ports import PortAllocator
from fluster_worker.containers.runtime import ContainerError, ContainerInfo
from fluster_worker.jobs.execution import JobExecution, Toolkit
from fluster_worker.jobs.model import JobRecord, JobState
from fluster_worker.jobs.outcome import lost_outcome
from fluster_worker.jobs.recovery import BundlePins, plan_recovery

__all__ = ["Reconciler"]


class Reconciler:
    """The jobs and containers of one JobManager: ``jobs`` and ``active`` are
    its (read here); ``run`` hands it an execution, ``changed`` a record that
    moved; ``running`` says whether the manager still runs."""

    log = Logger()

    def __init__(
        self,
        kit: Toolkit,
        jobs: dict[str, JobRecord],
        active: dict[str, JobExecution],
        ports: PortAllocator,
        pins: BundlePins,
        *,
        run: Callable[[JobExecution, Deferred[None]], None],
        changed: Callable[[JobRecord], None],
        now_ms: Callable[[], int],
        running: Callable[[], bool],
    ) -> None:
        self._kit = kit
        self._jobs = jobs
        self._active = active
        self._ports = ports
        self._pins = pins
        self._run = run
        self._changed = changed
        self._now_ms = now_ms
        self._running = running
        self.done: Once[None] = Once()  # the first pass has taken over the jobs
        self._reconciling = False
        self._again = False

    def start(self, engine: EngineHealth | None) -> None:
        """Reconcile now (without an engine to watch), or whenever ``engine`` is up."""
        if engine is None:
            self.reconcile()
        else:
            engine.add_listener(lambda up, reason: self.reconcile() if up else None)
            if engine.up:
                self.reconcile()

    def reconcile(self) -> None:
        if not self._running():
            return
        if self._reconciling:
            self._again = True
            return
        self._reconciling = True
        d = Deferred.fromCoroutine(self._reconcile_once())
        d.addErrback(lambda f: self.log.failure("reconciling jobs and containers failed", f))

        def done(_: object) -> None:
            self._reconciling = False
            if self._again:
                self._again = False
                self.reconcile()

        d.addBoth(done)

    async def _reconcile_once(self) -> None:
        try:
            containers = await self._kit.runtime.inventory()
        except ContainerError as e:
            self.log.warn("cannot list containers ({error}); trying again when the engine answers", error=str(e))
            return
        if not self._running():
            return
        plan = plan_recovery(self._jobs, containers, set(self._active))
        if not plan.empty:
            self.log.info(
                "recovery: {adopt} containers re-adopted, {restart} jobs started again, {lost} lost, "
                "{remove} containers to remove",
                adopt=len(plan.adopt),
                restart=len(plan.restart),
                lost=len(plan.lost),
                remove=len(plan.remove),
            )
        for record, container in plan.adopt:
            self._ports.reserve(record.ports.values())
            execution = JobExecution(record, b"", self._kit)
            self._run(execution, execution.adopt(container, self._pins.take(record.job_id)))
        for record in plan.lost:
            outcome = lost_outcome(record.container_id)
            record.error = outcome.error
            record.move(outcome.state, self._now_ms(), "lost")
            self._changed(record)
        # A waiting job's old container (created, never started) shares its name:
        # it goes before the job starts again.
        restarting = {r.job_id for r in plan.restart}
        blocking = [self._remove(c) for c in plan.remove if c.job_id in restarting]
        for container in plan.remove:
            if container.job_id not in restarting:
                self._remove(container)
        await DeferredList(blocking, consumeErrors=True)
        for record in plan.restart:
            if not self._running() or record.job_id in self._active or record.state.terminal:
                continue
            if record.state is JobState.BUILDING:
                record.move(JobState.PENDING, self._now_ms(), "queued again: the worker restarted")
            record.container_id = ""
            self._ports.reserve(record.ports.values())
            execution = JobExecution(record, b"", self._kit)
            self._run(execution, execution.start())
        # Lost and restarted jobs mount nothing now (a restarted one acquires its bundle anew).
        self._pins.release_all()
        self.done.fire(None)

    def _remove(self, container: ContainerInfo) -> Deferred[None]:
        """Stop (SIGTERM, the grace, SIGKILL) and remove a container of ours."""
        runtime = self._kit.runtime
        self.log.info(
            "removing container {name} of job {job_id} (no job of this worker runs in it)",
            name=container.name,
            job_id=container.job_id,
        )
        async def remove() -> None:
            if container.state in ("running", "paused", "restarting"):
                try:
                    await runtime.terminate(container.container_id, self._kit.default_kill_grace)
                except ContainerError:
                    pass  # removed meanwhile, or never started: the remove says
            await runtime.remove(container.container_id)

        d = Deferred.fromCoroutine(remove())
        d.addErrback(lambda f: self.log.failure("removing container {name} failed", f, name=container.name))
        return d
