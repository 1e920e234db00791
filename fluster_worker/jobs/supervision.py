"""Supervisor: one started container of a job, watched until it exits.

Used for a container the pipeline just started and for one a restarted worker
re-adopts: the exit comes from the runtime's events stream; the timeout runs to
the deadline fixed when the job started (kept in its record); usage is sampled;
the logs are followed (a re-adopted job's from its last stored line); stops (a
kill, the timeout, a drain) are kept in the record and sent again if the engine
was away when they were first sent.

The outcome is decided when the exit is known, before the log drain: a kill
that arrives after the exit changes nothing. If a SIGTERM call is in flight at
that moment, its answer (delivered to a running container, or not) is awaited
first, since it says whether the stop or the container's own exit ended the job.

``detach()`` (the worker stops and leaves its jobs running) stops watching:
the tail process is killed, the timers cancelled, nothing is decided, and
``run()`` fails with Detached.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.common.text import one_line
from fluster_worker.containers.runtime import ContainerError, ExitStatus
from fluster_worker.jobs.model import JobRecord, JobState, StopRequest
from fluster_worker.jobs.outcome import TIMEOUT_EXCEEDED, Outcome, exit_outcome, lost_outcome
from fluster_worker.jobs.sandbox import MAX_WATCHED_ENTRIES, disk_overrun
from fluster_worker.jobs.toolkit import Toolkit
from fluster_worker.logs import FollowStopped, JobLog

__all__ = ["Detached", "Supervisor"]


class Detached(Exception):
    """The worker stopped watching the job (it keeps running)."""


class Supervisor:
    log = Logger()

    def __init__(
        self,
        record: JobRecord,
        container_id: str,
        kit: Toolkit,
        job_log: JobLog,
        *,
        adopted: bool = False,
        exited: bool = False,
    ) -> None:
        """``adopted``: the container was started by an earlier worker process;
        ``exited``: and it has exited since (no timeout or sampling to run)."""
        self.record = record
        self.container_id = container_id
        self._kit = kit
        self._job_log = job_log
        self._adopted = adopted
        self._exited_before = exited
        # A stop asked for by the previous worker process: whether its signal
        # was delivered is unknown (see exit_outcome).
        self._inherited_stop = adopted and record.stop is not None and not record.stop.signalled_ms
        self._exited: Deferred[ExitStatus] | None = None
        # The exit waiter registered before the start (``expect_start``).
        self._early: Deferred[ExitStatus] | None = None
        self._status: ExitStatus | None = None
        self._detached = False
        self._timer: IDelayedCall | None = None
        self._drain_timer: IDelayedCall | None = None
        self._sampler: LoopingCall | None = None
        # A container this process starts has no lines stored yet: its
        # follower starts at once, without looking for a resume point.
        self._follower = kit.make_follower(job_log, container_id, adopted)
        # The answer of the SIGTERM call in flight, if one is.
        self._sigterm: Deferred[None] | None = None
        self._stop_retry = False
        self._terminating = False  # a terminate call is under way
        self._grace: float | None = None  # its grace, as shortened
        #: What went wrong with the job's logs, if anything ("" if nothing).
        self.log_problem = ""

    # -- what the execution calls ------------------------------------------------

    def expect_start(self) -> None:
        """The container is about to be started: watch for its exit from now on.
        It cannot have exited yet, so the runtime needs no inspect to know."""
        self._early = self._kit.runtime.wait(self.container_id, before_start=True)

    def abandon(self) -> None:
        """The start failed (or the job is detached before ``run``): drop the
        waiter of ``expect_start``."""
        early, self._early = self._early, None
        if early is not None and not early.called:
            early.addErrback(lambda f: None)
            early.cancel()
        elif early is not None:
            early.addErrback(lambda f: None)

    async def run(self) -> Outcome:
        kit, rec = self._kit, self.record
        if self._detached:
            raise Detached()
        if self._early is not None:
            self._exited, self._early = self._early, None
        else:
            self._exited = kit.runtime.wait(self.container_id)
        follow_done = self._follower.follow()
        if rec.deadline_ms and not self._exited_before:
            delay = max(0.0, (rec.deadline_ms - self._now_ms()) / 1000.0)
            self._timer = kit.reactor.callLater(delay, self._timeout)
        if not self._exited_before:
            self._sampler = LoopingCall(self._sample)
            self._sampler.clock = kit.reactor
            self._sampler.start(kit.usage_interval, now=self._adopted).addErrback(
                lambda f: self.log.failure("usage sampling failed", f)
            )
        if rec.stop is not None:
            # A stop asked for before the start, or before a restart: carry it out.
            self._send_stop(rec.stop.grace_ms / 1000.0)
        try:
            try:
                status = await self._exited
            except CancelledError:
                raise Detached() from None
            except ContainerError as e:
                if self._detached:
                    raise Detached() from None
                if "no such container" not in str(e).lower():
                    raise
                self.log.error("container of {job_id} vanished: {error}", job_id=rec.job_id, error=str(e))
                self._follower.stop()
                await self._settle(follow_done)
                return lost_outcome(self.container_id)
        finally:
            self._stop_watching()
        self._status = status
        if self._sigterm is not None and not self._sigterm.called:
            await self._sigterm
        if self._detached:
            raise Detached()
        outcome = exit_outcome(rec, status, signal_unknown=self._inherited_stop)
        rec.exit_code = status.exit_code
        if outcome.error == f"Exit code: {status.exit_code}":
            # "Exit code: N" first (what existing peers look for), then why, if the runner said.
            reason = await kit.store.read_error(rec.job_id)
            if reason:
                outcome = replace(outcome, error=f"{outcome.error}: {reason}")
        if not kit.engine_up():
            # Its last lines are in the engine: wait for it, but not forever.
            self._drain_timer = kit.reactor.callLater(kit.engine_log_wait, self._give_up_logs)
        await self._settle(follow_done)
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        if self._detached:
            raise Detached()
        return outcome

    def stop(self, stop: StopRequest) -> None:
        """Stop the container (SIGTERM, the grace, SIGKILL), unless it has exited.
        The first stop is the one the job ends with if it ends the job; a later
        one with a shorter grace brings the SIGKILL forward."""
        if self._status is not None or self._detached:
            return
        if self.record.stop is None:
            self.record.stop = stop
            self._kit.changed(self.record)
        if self._exited is not None:
            self._send_stop(stop.grace_ms / 1000.0)

    def detach(self) -> None:
        self._detached = True
        self._stop_watching()
        self._follower.stop()
        self.abandon()  # a waiter registered before the start, if run() never took it
        if self._exited is not None and not self._exited.called:
            self._exited.cancel()

    # -- internals ---------------------------------------------------------------

    async def _settle(self, follow_done: Deferred[None]) -> None:
        """Wait for the logs; a failure is the job's log problem, never its outcome."""
        try:
            await follow_done
        except FollowStopped as e:
            if not self._detached:
                self.log_problem = str(e)
        except Exception as e:
            self.log.failure("collecting the logs of {job_id} failed", job_id=self.record.job_id)
            self.log_problem = one_line(f"{type(e).__name__}: {e}")

    def _give_up_logs(self) -> None:
        self.log_problem = "the Docker engine is unreachable: the container's last lines could not be read"
        self._follower.stop()

    def _stop_watching(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()

    def _timeout(self) -> None:
        seconds = self.record.spec.timeout_seconds
        self._job_log.append("error", f"timeout of {seconds} s exceeded: terminating")
        grace = self._kit.default_kill_grace
        self.stop(StopRequest(JobState.FAILED.name, TIMEOUT_EXCEEDED, self._now_ms(), int(grace * 1000)))

    def _send_stop(self, grace: float) -> None:
        if self._terminating:
            # A termination is under way: a shorter grace brings its SIGKILL forward.
            if self._grace is None or grace < self._grace:
                self._grace = grace
                self._kit.runtime.terminate(self.container_id, grace).addErrback(lambda f: None)
            return
        self._terminating = True
        self._grace = grace
        sigterm: Deferred[None] = Deferred()
        self._sigterm = sigterm

        def answered(delivered: bool) -> None:
            stop = self.record.stop
            if delivered and stop is not None and not stop.signalled_ms:
                stop.signalled_ms = self._now_ms()
                self._kit.changed(self.record)
            if not sigterm.called:
                sigterm.callback(None)

        def failed(failure: Failure) -> None:
            self._terminating = False
            if not sigterm.called:
                sigterm.callback(None)
            if self._status is not None or self._detached:
                return
            self.log.warn(
                "stopping the container of {job_id} failed: {error}; trying again once the engine answers",
                job_id=self.record.job_id,
                error=failure.getErrorMessage(),
            )
            if not self._stop_retry:
                self._stop_retry = True
                self._kit.engine_ready().addCallback(lambda _: self._retry_stop(grace))

        self._kit.runtime.terminate(self.container_id, grace, on_sigterm=answered).addErrback(failed)

    def _retry_stop(self, grace: float) -> None:
        self._stop_retry = False
        if self._status is None and not self._detached:
            self._send_stop(grace)

    async def _sample(self) -> None:
        try:
            sample = await self._kit.runtime.sample(self.container_id)
        except ContainerError:
            return  # gone between two samples, or the engine is away: the exit path takes over
        usage = self.record.usage
        if sample is not None:
            usage.memory_mb = sample.memory_bytes // 2**20
            usage.memory_peak_mb = max(usage.memory_peak_mb, sample.memory_peak_bytes // 2**20)
            usage.cpu_percent = int(sample.cpu_percent)
            usage.cpu_millicores = sample.cpu_millicores
            usage.process_count = sample.process_count
        disk = await self._kit.store.disk_usage(self.record.job_id, MAX_WATCHED_ENTRIES)
        usage.disk_mb = disk.bytes // 2**20
        overrun = disk_overrun(disk, self.record.spec)
        if overrun and self.record.stop is None and self._status is None:
            # Like the timeout: a stop kept in the record, so it survives a restart.
            self._job_log.append("error", f"{overrun}: terminating")
            grace = self._kit.default_kill_grace
            self.stop(StopRequest(JobState.FAILED.name, overrun, self._now_ms(), int(grace * 1000)))

    def _now_ms(self) -> int:
        return int(self._kit.reactor.seconds() * 1000)
