"""One job's run: bundle -> image -> container -> supervision -> final state.

``JobExecution.start`` runs a job from its entry point (a new job, or one a
restarted worker puts back in line); ``adopt`` takes over a container a previous
worker process started (jobs/supervision.py watches it either way). Both are
coroutines driven by Deferreds; they never block.

A kill is a request that each step honours: while waiting for a slot, the
engine, the bundle or the image, the wait is abandoned (an image build nobody
else waits for is aborted) and no container is ever created; once a container
runs, it is stopped and the outcome is decided when it exits (outcome.py).
``detach`` (the worker stops and leaves its jobs running) abandons the waits the
same way but decides nothing: the record stays as it is on disk, for the next
worker process.

The end: the outcome is decided here, the rest (logs, the terminal record,
then the container) is jobs/ending.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from fluster_worker.bundles.cache import BundleError, BundleLease
from fluster_worker.common.text import one_line
from fluster_worker.common.waiters import Once
from fluster_worker.containers.devices import DevicesUnavailable
from fluster_worker.containers.engine import engine_unreachable, image_missing
from fluster_worker.containers.runtime import ContainerError, ContainerInfo
from fluster_worker.images.builder import BuildError, BuildResult
from fluster_worker.jobs.admission import Ticket
from fluster_worker.jobs.container_spec import job_container_spec
from fluster_worker.jobs.ending import JobEnding
from fluster_worker.jobs.model import JobRecord, JobState, StopRequest
from fluster_worker.jobs.outcome import KILLED_BY_REQUEST, Outcome
from fluster_worker.jobs.sandbox import CONTAINER_WORKDIR
from fluster_worker.jobs.supervision import Detached, Supervisor
from fluster_worker.jobs.toolkit import Toolkit
from fluster_worker.logs import JobLog

__all__ = ["CONTAINER_WORKDIR", "JobExecution", "Toolkit"]

T = TypeVar("T")


class _Killed(Exception):
    pass


class _Detached(Exception):
    pass


class _Refused(Exception):
    pass


class JobExecution:
    log = Logger()

    def __init__(self, record: JobRecord, entrypoint: bytes, kit: Toolkit) -> None:
        """``entrypoint``: written to the job's directory first if given; b"" when
        it is on disk already (the manager writes it before answering RunJob)."""
        self.record = record
        self._entrypoint = entrypoint
        self._kit = kit
        self._stop: StopRequest | None = None
        self._detaching = False  # no further step
        self._detached = False
        # Cancellers of what the pipeline is waiting for (a slot, the engine, the bundle, the image).
        self._hooks: list[Callable[[], None]] = []
        self._done: Once[JobRecord] = Once()
        self._container_id = ""
        self._supervisor: Supervisor | None = None
        self._outcome: Outcome | None = None
        # Its place in line for a slot and devices (admission.py), then what it holds.
        self._ticket: Ticket | None = None
        self._lease: BundleLease | None = None
        self._release_image: Callable[[], None] | None = None
        self._accepted: Deferred[None] | None = None
        self._app = ""  # the host directory shown at /app
        self.job_log: JobLog | None = None
        #: The job could not be written to disk: it was never accepted.
        self.refused = False

    # -- what the manager calls ------------------------------------------------

    def start(self, accepted: Deferred[None] | None = None) -> Deferred[None]:
        """Run the job from its entry point. Its place in line is taken now,
        before anything waits: jobs start in the order they were started.
        ``accepted``: the job is on disk (the manager's write); if that fails the
        job is refused: it ends without a state change (``refused``)."""
        assert self._kit.admission is not None
        self._ticket = self._kit.admission.enter(self.record.spec)
        self._accepted = accepted
        # A kill asked for before a restart: the job ends KILLED without running.
        self._stop = self.record.stop
        return Deferred.fromCoroutine(self._run(None))

    def adopt(self, container: ContainerInfo, bundle: BundleLease | None = None) -> Deferred[None]:
        """Take over a container a previous worker process started for this job.
        It runs already, so it takes a slot (and its devices again) without
        waiting in line. ``bundle``: the pin on the cached bundle its container
        mounts (jobs/recovery.py), released when the job ends."""
        assert self._kit.admission is not None
        self._lease = bundle
        self._ticket = self._kit.admission.adopt(self.record.spec, self.record.devices)
        return Deferred.fromCoroutine(self._run(container))

    def done(self) -> Deferred[JobRecord]:
        """A new Deferred that fires with the record once the job is terminal."""
        return self._done.wait()

    def kill(
        self,
        grace_seconds: float,
        state: JobState = JobState.KILLED,
        error: str = KILLED_BY_REQUEST,
    ) -> Deferred[JobRecord]:
        """Stop the job: it ends in ``state`` (KILLED, or WORKER_FAILED when the
        worker drains at shutdown) unless its container exits first. The first
        stop decides the outcome; a later one with a shorter grace shortens the wait."""
        stop = StopRequest(state.name, error, self._now_ms(), int(grace_seconds * 1000))
        if self._supervisor is not None:
            self._supervisor.stop(stop)
        elif self._stop is not None:
            self._stop.grace_ms = min(self._stop.grace_ms, stop.grace_ms)
        elif self._outcome is None:
            self._stop = stop
            self.record.stop = stop
            self._kit.changed(self.record)
            for cancel in list(self._hooks):
                cancel()
        return self.done()

    def freeze(self) -> None:
        """Take no further step (the worker is stopping: a slot one job gives back
        must not start another)."""
        self._detaching = True

    def detach(self) -> None:
        """Stop watching the job and leave it as it is (the worker stops)."""
        if self._detached or self._outcome is not None:
            return
        self._detached = True
        self._detaching = True
        if self._supervisor is not None:
            self._supervisor.detach()
        for cancel in list(self._hooks):
            cancel()

    # -- the run ---------------------------------------------------------------

    async def _run(self, adopted: ContainerInfo | None) -> None:
        try:
            self.job_log = self._kit.open_log(self.record.job_id)
            if adopted is None:
                await self._prepare_and_start()
            else:
                self._take_over(adopted)
            assert self._supervisor is not None
            self._outcome = await self._supervisor.run()
        except (Detached, _Detached):
            pass
        except _Refused:
            self.refused = True
        except _Killed:
            self._outcome = self._stopped()
        except Exception as e:
            self._outcome = self._failure(e)
        # Not in a finally: a coroutine dropped unfinished (a test's) must not await.
        await self._end()

    async def _prepare_and_start(self) -> None:
        kit, rec = self._kit, self.record
        ticket = self._ticket
        assert ticket is not None
        if self._entrypoint:
            await kit.store.prepare(rec.job_id, self._entrypoint)
            self._entrypoint = b""  # on disk now; the worker keeps no copy
        if self._accepted is not None:
            try:
                await self._accepted
            except Exception as e:
                raise _Refused() from e
            self._check_stop()
        if not ticket.admitted and rec.spec.device_kind:
            self._phase(kit.devices.waiting_message(rec.spec))
        devices = await self._unless_stopped(ticket.wait())
        rec.devices = list(devices)
        await self._unless_stopped(kit.engine_ready())
        self._move(JobState.BUILDING, "downloading bundle")
        if rec.spec.bundle_url:
            self._lease = await self._unless_stopped(kit.bundles.acquire(rec.spec.bundle_url, log=self._build_line))
            rec.build.bundle_digest = self._lease.bundle.digest
        self._phase("building image")
        lease = self._lease
        build = await self._build_image()
        rec.build.started_ms = build.started_ms
        rec.build.finished_ms = build.finished_ms
        rec.build.from_cache = build.from_cache
        rec.build.image_tag = build.tag
        self._release_image = kit.builder.lease(build.tag)
        self._phase("preparing container")
        # The cached bundle itself, read-only: no copy per job.
        self._app = str(lease.bundle.path if lease else kit.store.app_dir(rec.job_id))
        # Creating is not abandoned midway: a container created after a kill
        # would leak. The kill is checked again right after.
        try:
            self._container_id = await kit.runtime.create(job_container_spec(kit, rec, build.tag, self._app))
        except ContainerError as e:
            if not image_missing(e):
                raise
            # The builder knew the image, but it is gone (a manual `docker rmi`):
            # build it again, once (same inputs, same tag).
            kit.builder.forget(build.tag)
            await self._build_image()
            self._container_id = await kit.runtime.create(job_container_spec(kit, rec, build.tag, self._app))
        rec.container_id = self._container_id
        self._check_stop()
        assert self.job_log is not None
        supervisor = Supervisor(rec, self._container_id, kit, self.job_log)
        supervisor.expect_start()
        try:
            await kit.runtime.start(self._container_id)
        except BaseException:
            supervisor.abandon()
            raise
        self._supervisor = supervisor
        if self._detaching:
            supervisor.detach()
        if self._stop is not None and rec.stop is None:
            rec.stop = self._stop
        now = self._now_ms()
        if rec.spec.timeout_seconds > 0:
            rec.deadline_ms = now + rec.spec.timeout_seconds * 1000
        self._move(JobState.RUNNING, "running")

    def _take_over(self, container: ContainerInfo) -> None:
        kit, rec = self._kit, self.record
        self._container_id = container.container_id
        rec.container_id = container.container_id
        if rec.build.image_tag:
            self._release_image = kit.builder.lease(rec.build.image_tag)
        assert self.job_log is not None
        self._supervisor = Supervisor(
            rec, self._container_id, kit, self.job_log, adopted=True, exited=container.state == "exited"
        )
        if rec.state is not JobState.RUNNING:
            # Started by a worker that stopped before it could say so.
            self._move(JobState.RUNNING, "running")
        self.log.info("re-adopted job {job_id} (container {cid})", job_id=rec.job_id, cid=self._container_id[:12])

    async def _end(self) -> None:
        ending = JobEnding(
            self._kit, self.record, self.job_log, self._container_id, self._supervisor is not None, self._release
        )
        outcome = self._outcome
        if outcome is None:  # detached or refused: nothing is decided, nothing changes
            self._release()
            await ending.close_log()
            if self.refused:
                self._done.fire(self.record)
            return
        await ending.finish(outcome, self._supervisor.log_problem if self._supervisor is not None else "")
        self._done.fire(self.record)

    async def _build_image(self) -> BuildResult:
        kit, rec, lease = self._kit, self.record, self._lease
        return await self._unless_stopped(
            kit.builder.build(
                lease.bundle.path if lease else kit.store.app_dir(rec.job_id),
                rec.spec.extras,
                rec.spec.pip_packages,
                self._build_line,
            )
        )

    # -- helpers ---------------------------------------------------------------

    def _release(self) -> None:
        if self._release_image is not None:
            self._release_image()
            self._release_image = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self._ticket is not None:
            self._ticket.leave()  # the slot and devices, or the place in line

    async def _unless_stopped(self, d: Deferred[T]) -> T:
        """Wait for ``d`` unless a kill or a detach comes first; then ``d`` is cancelled."""
        if self._stop is not None or self._detaching:
            d.addErrback(lambda f: f.trap(CancelledError))
            d.cancel()
            self._check_stop()
        self._hooks.append(d.cancel)
        try:
            return await d
        except Exception:
            # Whatever a cancelled step raises (CancelledError, or its own error
            # about being cancelled), a kill or detach is what happened.
            self._check_stop()
            raise
        finally:
            self._hooks.remove(d.cancel)

    def _check_stop(self) -> None:
        if self._detaching:
            raise _Detached()
        if self._stop is not None:
            raise _Killed()

    def _stopped(self) -> Outcome:
        assert self._stop is not None
        return Outcome(JobState[self._stop.state], self._stop.error, None)

    def _failure(self, e: Exception) -> Outcome:
        if self._stop is not None:
            return self._stopped()
        if engine_unreachable(e) or not self._kit.engine_up():
            return Outcome(JobState.WORKER_FAILED, one_line(f"Docker engine unavailable: {e}"))
        if isinstance(e, (BundleError, BuildError, ContainerError, DevicesUnavailable)):
            return Outcome(JobState.FAILED, str(e))
        self.log.failure("job {job_id} failed inside the worker", job_id=self.record.job_id)
        return Outcome(JobState.FAILED, one_line(f"worker error: {type(e).__name__}: {e}"))

    def _log(self, source: str, line: str) -> None:
        if self.job_log is not None:
            self.job_log.append(source, line)

    def _build_line(self, line: str) -> None:
        self._log("build", line)

    def _now_ms(self) -> int:
        return int(self._kit.reactor.seconds() * 1000)

    def _move(self, state: JobState, message: str) -> None:
        self.record.move(state, self._now_ms(), message)
        self._kit.changed(self.record)

    def _phase(self, message: str) -> None:
        self.record.phase(message, self._now_ms())
        self._kit.changed(self.record)
