"""The end of one job's run, in this order: the outcome is decided (by the
execution); the logs are drained and closed; the terminal record is saved; only
then is the container removed (so a worker that dies in between finds the
container and its exit again, and reaches the same outcome); then the terminal
state is shown and reported. A record that cannot be saved (a full disk) is
retried by the store, and the container stays until it is saved."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from fluster_worker.common.safe_files import UnsafeFile
from fluster_worker.common.text import one_line
from fluster_worker.jobs.model import JobRecord, JobState
from fluster_worker.jobs.outcome import Outcome
from fluster_worker.jobs.toolkit import Toolkit
from fluster_worker.logs import JobLog

__all__ = ["JobEnding"]


class JobEnding:
    """Ends one job: ``record`` and its ``job_log`` (None if it never opened),
    its container (``container_id``, "" if none; ``started``: it was started),
    ``release`` frees what the job holds (image, bundle, slot and devices)."""

    log = Logger()

    def __init__(
        self,
        kit: Toolkit,
        record: JobRecord,
        job_log: JobLog | None,
        container_id: str,
        started: bool,
        release: Callable[[], None],
    ) -> None:
        self._kit = kit
        self.record = record
        self.job_log = job_log
        self._container_id = container_id
        self._started = started
        self._release = release

    async def finish(self, outcome: Outcome, log_problem: str) -> None:
        """Conclude the record with ``outcome`` (see the module doc).
        ``log_problem``: why the container's logs are incomplete, or ""."""
        kit, rec = self._kit, self.record
        if self._started:
            refused = await self._check_result()
            if refused and outcome.state is JobState.SUCCEEDED:
                outcome = Outcome(JobState.FAILED, refused, outcome.exit_code)
            elif refused:
                self._log("error", refused)  # it ended otherwise; still say what it left
        if outcome.error and outcome.state in (JobState.FAILED, JobState.WORKER_FAILED):
            self._log("error", outcome.error)
        problem = log_problem
        if problem:
            self._log("error", f"logs incomplete: {problem}")
        closing = await self.close_log()
        problem = problem or closing
        if self.job_log is not None and self.job_log.lost_lines:
            lost = f"{self.job_log.lost_lines} lines could not be written ({self.job_log.write_error})"
            problem = f"{lost}; {problem}" if problem else lost
        error = outcome.error
        if problem:
            error = f"{error}; logs incomplete: {problem}" if error else f"logs incomplete: {problem}"
        # The terminal record on disk before the container goes (see the module doc).
        at = self._now_ms()
        final = JobRecord.from_json(rec.to_json())
        _conclude(final, outcome.state, error, outcome.exit_code, at)
        saved = await kit.store.save(final)
        if self._container_id and not saved:
            # Kept until its record is saved; its /workdir and /tmp go after it.
            kit.store.saved(rec.job_id).addCallback(lambda _: Deferred.fromCoroutine(self._remove_container()))
        else:
            if self._container_id:
                await self._remove_container()
            else:
                await self._clear_scratch()
        # Its slot and devices are free once the container is gone (or has exited,
        # when it is kept until the record is saved).
        self._release()
        _conclude(rec, outcome.state, error, outcome.exit_code, at)
        kit.changed(rec)

    async def close_log(self) -> str:
        """Close the job's log; what went wrong, or ""."""
        if self.job_log is None:
            return ""
        try:
            await self.job_log.close()
        except Exception as e:
            self.log.failure("closing the log of {job_id} failed", job_id=self.record.job_id)
            return one_line(f"{type(e).__name__}: {e}")
        return ""

    async def _check_result(self) -> str:
        """Note whether the job left a result; "" or why it was refused (the
        job put something other than a regular file in its place)."""
        rec = self.record
        try:
            rec.has_result = await self._kit.store.has_result(rec.job_id)
        except UnsafeFile as e:
            rec.has_result = False
            return f"result refused: {e}"
        except Exception:
            self.log.failure("checking the result of {job_id} failed", job_id=rec.job_id)
        return ""

    async def _clear_scratch(self) -> None:
        """The job's /workdir and /tmp go when it ends (its result stays)."""
        if self._kit.sandbox.keep_workdir:
            return
        try:
            await self._kit.store.clear_scratch(self.record.job_id)
        except Exception:
            self.log.failure("removing the workdir of {job_id} failed", job_id=self.record.job_id)

    async def _remove_container(self) -> None:
        """The ended job's container, then its /workdir and /tmp."""
        try:
            # A container that started has no exit waiters to fail: no inspect first.
            await self._kit.runtime.remove(self._container_id, started=self._started)
        except Exception:
            # The engine is away: the manager removes what is left once it is back.
            self.log.failure("removing container {cid} failed", cid=self._container_id)
        await self._clear_scratch()

    def _log(self, source: str, line: str) -> None:
        if self.job_log is not None:
            self.job_log.append(source, line)

    def _now_ms(self) -> int:
        return int(self._kit.reactor.seconds() * 1000)


def _conclude(record: JobRecord, state: JobState, error: str, exit_code: int | None, at: int) -> None:
    if record.state.terminal:
        return
    record.error = error
    if exit_code is not None:
        record.exit_code = exit_code
    record.move(state, at, state.name.lower())
