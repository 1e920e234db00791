"""One job's run: bundle -> image -> container -> logs -> final state.

``JobExecution.run`` is a coroutine driven by Deferreds; it never blocks. A
kill is a request that each step honours: while waiting for a slot, the bundle
or the image, the wait is abandoned and no container is ever created; once a
container exists, it is terminated (SIGTERM, grace, SIGKILL) and the normal
exit path records KILLED.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from fluster_worker.bundles.cache import BundleCache, BundleError, BundleLease
from fluster_worker.common.jobnames import job_key
from fluster_worker.common.safe_files import UnsafeFile
from fluster_worker.common.waiters import Once
from fluster_worker.containers.devices import DevicesUnavailable
from fluster_worker.containers.runtime import ContainerError, ContainerRuntime, ContainerSpec, Mount, container_name
from fluster_worker.images.builder import BuildError, ImageBuilder
from fluster_worker.images.dockerfile import (
    CONTAINER_APP_DIR,
    CONTAINER_ENTRYPOINT_PATH,
    CONTAINER_OUT_DIR,
    runner_command,
)
from fluster_worker.jobs.admission import Admission
from fluster_worker.jobs.devices import JobDevices
from fluster_worker.jobs.model import JobRecord, JobState
from fluster_worker.jobs.store import JobStore
from fluster_worker.logs import JobLog, LogFollower

T = TypeVar("T")

CONTAINER_WORKDIR = "/workdir"


@dataclass
class Toolkit:
    """What a job run needs from the worker, injected by the JobManager."""

    reactor: IReactorTime
    store: JobStore
    bundles: BundleCache
    builder: ImageBuilder
    runtime: ContainerRuntime
    open_log: Callable[[str], JobLog]
    make_follower: Callable[[JobLog, str], LogFollower]
    slots: DeferredSemaphore
    container_env: Callable[[JobRecord], dict[str, str]]
    changed: Callable[[JobRecord], None]
    default_kill_grace: float = 5.0
    usage_interval: float = 5.0
    labels: dict[str, str] = field(default_factory=dict)
    devices: JobDevices = field(default_factory=JobDevices)
    # The line for a slot and devices, shared by every job (made from the two).
    admission: Admission | None = None

    def __post_init__(self) -> None:
        if self.admission is None:
            self.admission = Admission(self.slots, self.devices)


class _Killed(Exception):
    pass


class JobExecution:
    log = Logger()

    def __init__(self, record: JobRecord, entrypoint: bytes, kit: Toolkit) -> None:
        self.record = record
        self._entrypoint = entrypoint
        self._kit = kit
        self._kill_requested = False
        self._kill_grace = kit.default_kill_grace
        # Cancellers of what the pipeline is waiting for (a slot, the bundle, the image).
        self._kill_hooks: list[Callable[[], None]] = []
        self._done: Once[JobRecord] = Once()
        self._timed_out = False
        self._container_id = ""
        self._outcome: tuple[JobState, str, int | None] | None = None
        self._final_state = JobState.KILLED
        self._kill_error = "Killed by request"
        self.job_log: JobLog | None = None

    # -- what the manager calls ------------------------------------------------

    def start(self) -> Deferred[None]:
        self.job_log = self._kit.open_log(self.record.job_id)
        return Deferred.fromCoroutine(self._run())

    def done(self) -> Deferred[JobRecord]:
        """A new Deferred that fires with the record once the job is terminal."""
        return self._done.wait()

    def kill(
        self,
        grace_seconds: float,
        state: JobState = JobState.KILLED,
        error: str = "Killed by request",
    ) -> Deferred[JobRecord]:
        """Stop the job: it ends in ``state`` (KILLED, or WORKER_FAILED when the
        worker shuts down) once its container, if any, is dead. The first kill
        decides the outcome; a later one with a shorter grace shortens the wait."""
        if not self._kill_requested:
            self._kill_requested = True
            self._kill_grace = grace_seconds
            self._final_state = state
            self._kill_error = error
            for cancel in list(self._kill_hooks):
                cancel()
            if self._container_id and self.record.state is JobState.RUNNING:
                self._terminate(grace_seconds)
        elif grace_seconds < self._kill_grace:
            self._kill_grace = grace_seconds
            if self._container_id and self.record.state is JobState.RUNNING:
                self._terminate(grace_seconds)  # the runtime brings its SIGKILL forward
        return self.done()

    # -- the pipeline ----------------------------------------------------------

    async def _run(self) -> None:
        kit, rec = self._kit, self.record
        lease: BundleLease | None = None
        release_image: Callable[[], None] | None = None
        # Take a place in line now, before any await: jobs start in arrival order
        # (admission.py), with a slot and their GPUs or TPU held until the end.
        assert kit.admission is not None
        ticket = kit.admission.enter(rec.spec)
        try:
            await kit.store.prepare(rec.job_id, self._entrypoint)
            self._entrypoint = b""  # on disk now; the worker keeps no copy
            if not ticket.admitted and rec.spec.device_kind:
                self._phase(kit.devices.waiting_message(rec.spec))
            devices = await self._unless_killed(ticket.wait())
            rec.devices = list(devices)
            self._move(JobState.BUILDING, "downloading bundle")
            if rec.spec.bundle_url:
                lease = await self._unless_killed(
                    kit.bundles.acquire(rec.spec.bundle_url, log=self._build_line)
                )
            self._phase("building image")
            build = await self._unless_killed(
                kit.builder.build(
                    lease.bundle.path if lease else kit.store.app_dir(rec.job_id),
                    rec.spec.extras,
                    rec.spec.pip_packages,
                    self._build_line,
                )
            )
            rec.build.started_ms = build.started_ms
            rec.build.finished_ms = build.finished_ms
            rec.build.from_cache = build.from_cache
            rec.build.image_tag = build.tag
            release_image = kit.builder.lease(build.tag)
            self._phase("preparing container")
            await self._unless_killed(kit.store.fill_app(rec.job_id, lease.bundle.path if lease else None))
            # Creating is not abandoned midway: a container created after a kill
            # would leak. The kill is checked again right after.
            self._container_id = await kit.runtime.create(self._container_spec(build.tag))
            rec.container_id = self._container_id
            if self._kill_requested:
                raise _Killed()
            assert self.job_log is not None
            follower = kit.make_follower(self.job_log, self._container_id)
            await kit.runtime.start(self._container_id)
            follow_done = follower.follow()
            self._move(JobState.RUNNING, "running")
            await self._supervise(follow_done)
        except _Killed:
            self._finish(self._final_state, error=self._kill_error)
        except (BundleError, BuildError, ContainerError, DevicesUnavailable) as e:
            self._fail(str(e))
        except Exception as e:
            self.log.failure("job {job_id} failed inside the worker", job_id=rec.job_id)
            self._fail(f"worker error: {type(e).__name__}: {e}")
        finally:
            if self._container_id:
                await self._remove_container()
            if release_image is not None:
                release_image()
            if lease is not None:
                lease.release()
            ticket.leave()  # the slot and devices, or the place in line
            await self._close_log()
            self._publish()
            self._done.fire(self.record)

    async def _supervise(self, follow_done: Deferred[None]) -> None:
        kit, rec = self._kit, self.record
        exited = kit.runtime.wait(self._container_id)
        timer: IDelayedCall | None = None
        if rec.spec.timeout_seconds > 0:
            timer = kit.reactor.callLater(rec.spec.timeout_seconds, self._timeout)
        sampler = LoopingCall(self._sample)
        sampler.clock = kit.reactor
        sampler.start(kit.usage_interval, now=False).addErrback(
            lambda f: self.log.failure("usage sampling failed", f)
        )
        if self._kill_requested:
            self._terminate(self._kill_grace)
        try:
            status = await exited
        finally:
            if timer is not None and timer.active():
                timer.cancel()
            sampler.stop()
        # The container is removed only after its final lines are stored.
        try:
            await follow_done
        except Exception as e:
            # The job's outcome stands; say what happened to its logs.
            self.log.failure("collecting the logs of {job_id} failed", job_id=rec.job_id)
            self._log("error", f"log collection failed: {type(e).__name__}: {e}")
        rec.exit_code = status.exit_code
        refused = await self._check_result()
        if self._kill_requested:
            self._finish(self._final_state, error=self._kill_error, exit_code=status.exit_code)
        elif self._timed_out:
            self._fail("Timeout exceeded", exit_code=status.exit_code)
        elif status.oom_killed:
            limit = rec.spec.memory or "its limit"
            self._fail(
                f"Out of memory: the job exceeded its memory limit ({limit}) and was OOM-killed "
                f"(exit code {status.exit_code})",
                exit_code=status.exit_code,
            )
        elif status.exit_code != 0:
            # "Exit code: N" first (what existing peers look for), then why, if the runner said.
            reason = await kit.store.read_error(rec.job_id)
            error = f"Exit code: {status.exit_code}" + (f": {reason}" if reason else "")
            self._fail(error, exit_code=status.exit_code)
        elif refused:
            self._fail(refused, exit_code=status.exit_code)
        else:
            self._finish(JobState.SUCCEEDED)
        if refused and self._outcome is not None and self._outcome[1] != refused:
            self._log("error", refused)  # it ended otherwise; still say what it left

    async def _check_result(self) -> str:
        """Note whether the job left a result; "" or why it was refused (the
        job put something other than a regular file in its place)."""
        rec = self.record
        try:
            rec.has_result = await self._kit.store.has_result(rec.job_id)
        except UnsafeFile as e:
            rec.has_result = False
            return f"result refused: {e}"
        return ""

    # -- helpers ---------------------------------------------------------------

    async def _unless_killed(self, d: Deferred[T]) -> T:
        """Wait for ``d`` unless a kill comes first; then ``d`` is cancelled."""
        if self._kill_requested:
            d.cancel()
            raise _Killed()
        self._kill_hooks.append(d.cancel)
        try:
            return await d
        except CancelledError:
            if self._kill_requested:
                raise _Killed() from None
            raise
        finally:
            self._kill_hooks.remove(d.cancel)

    def _container_spec(self, image: str) -> ContainerSpec:
        kit, rec = self._kit, self.record
        store = kit.store
        return ContainerSpec(
            name=container_name(rec.worker_id, job_key(rec.job_id), rec.attempt_id),
            image=image,
            command=runner_command(),
            env=kit.devices.environment(rec, kit.container_env(rec)),
            labels={
                **kit.labels,
                "fluster.worker_id": rec.worker_id,
                "fluster.job_id": rec.job_id,
                "fluster.attempt_id": str(rec.attempt_id),
            },
            working_dir=CONTAINER_APP_DIR,
            mounts=[
                Mount(store.app_dir(rec.job_id), CONTAINER_APP_DIR, False),
                Mount(store.workdir(rec.job_id), CONTAINER_WORKDIR, False),
                Mount(store.entrypoint_path(rec.job_id), CONTAINER_ENTRYPOINT_PATH, True),
                Mount(store.out_dir(rec.job_id), CONTAINER_OUT_DIR, False),
            ],
            ports={port: port for port in rec.ports.values()},
            nano_cpus=rec.spec.cpu * 1_000_000_000 if rec.spec.cpu else None,
            memory_bytes=rec.spec.memory_bytes,
            **kit.devices.container_options(rec),
        )

    def _timeout(self) -> None:
        self._timed_out = True
        self._log("error", f"timeout of {self.record.spec.timeout_seconds} s exceeded: terminating")
        self._terminate(self._kit.default_kill_grace)

    def _terminate(self, grace: float) -> None:
        self._kit.runtime.terminate(self._container_id, grace).addErrback(
            lambda f: self.log.failure("terminating {cid} failed", f, cid=self._container_id)
        )

    async def _sample(self) -> None:
        try:
            sample = await self._kit.runtime.sample(self._container_id)
        except ContainerError:
            return  # gone between two samples: the exit path takes over
        usage = self.record.usage
        if sample is not None:
            usage.memory_mb = sample.memory_bytes // 2**20
            usage.memory_peak_mb = max(usage.memory_peak_mb, sample.memory_peak_bytes // 2**20)
            usage.cpu_percent = int(sample.cpu_percent)
            usage.cpu_millicores = sample.cpu_millicores
            usage.process_count = sample.process_count
        usage.disk_mb = (await self._kit.store.disk_bytes(self.record.job_id)) // 2**20

    async def _remove_container(self) -> None:
        try:
            await self._kit.runtime.remove(self._container_id)
        except Exception:
            self.log.failure("removing container {cid} failed", cid=self._container_id)

    async def _close_log(self) -> None:
        if self.job_log is None:
            return
        try:
            await self.job_log.close()
        except Exception:
            self.log.failure("closing the log of {job_id} failed", job_id=self.record.job_id)

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

    def _fail(self, error: str, exit_code: int | None = None) -> None:
        self._log("error", error)
        self._finish(JobState.FAILED, error=error, exit_code=exit_code)

    def _finish(self, state: JobState, error: str = "", exit_code: int | None = None) -> None:
        """Decide the outcome (the first decision wins); ``_publish`` shows it once
        the container is removed and the logs are closed, so a client that sees a
        terminal state finds every log line stored and no container left."""
        if self._outcome is None:
            self._outcome = (state, error, exit_code)

    def _publish(self) -> None:
        rec = self.record
        if self._outcome is None or rec.state.terminal:
            return
        state, error, exit_code = self._outcome
        rec.error = error
        if exit_code is not None:
            rec.exit_code = exit_code
        rec.move(state, self._now_ms(), state.name.lower())
        self._kit.changed(rec)

