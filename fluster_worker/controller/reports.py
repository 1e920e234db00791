"""ReportJobState delivery: durable, at least once, in order.

`ReportQueue.report` never blocks and never fails the caller. Each report is written
to ``<state_dir>/reports/<seq>.pb`` (one binary ReportJobStateRequest per file,
atomically) and only then becomes deliverable; it is removed once the controller
answered 200. Delivery is one global FIFO, strictly one call at a time, so no report
of a job overtakes an earlier one. On startService the files left by a previous run
are loaded, in sequence order, ahead of anything new.

The files are report_files.py. All file work goes through one ordered lane (a DeferredLock over the BlockingPool):
load, writes and removals happen in the order they were asked for.

What a controller answer does to the head report:

- 200: delivered; removed.
- no answer (refused, reset, timeout) or a retryable code (unavailable,
  deadline_exceeded, resource_exhausted, aborted, unknown, internal, data_loss,
  canceled; any 5xx or 429 without a Connect body): kept, retried with backoff and
  jitter until it goes through, through outages and restarts.
- a code that says this report will never be taken (invalid_argument,
  failed_precondition, out_of_range, not_found, already_exists, permission_denied,
  unauthenticated, unimplemented; 404/405/501 without a Connect body): dropped and
  removed. ``unimplemented`` is what a controller that predates ReportJobState
  answers; those controllers read outcomes from ListJobs instead, and dropping keeps
  the queue from growing forever. The first drop per code is logged as a warning,
  later ones at debug level.
"""

from __future__ import annotations

import random as _random
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.common.backoff import Backoff
from fluster_worker.common.files import write_atomically
from fluster_worker.common.waiters import Waiters
from fluster_worker.controller._types import BlockingRunner
from fluster_worker.controller.client import ControllerCaller, ControllerError
from fluster_worker.controller.report_files import REPORTS_DIR, Entry, load_pending, report_path, unlink
from fluster_worker.web.rpc import cluster_pb2 as pb

log = Logger()

REPORT_BACKOFF = Backoff(initial_s=0.5, max_s=8.0, factor=2.0, jitter=0.5)
DEFAULT_MAX_PENDING = 10_000


class ReportQueue(Service):
    """Delivers ReportJobStateRequests to the controller; see the module docstring.

    One queue per state directory (two live queues on one directory would deliver
    each other's files twice)."""

    def __init__(
        self,
        client: ControllerCaller,
        clock: IReactorTime,
        pool: BlockingRunner,
        state_dir: Path,
        worker_id: str,
        *,
        backoff: Backoff = REPORT_BACKOFF,
        random: Callable[[], float] = _random.random,
        max_pending: int = DEFAULT_MAX_PENDING,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.setName("controller-reports")
        self._client = client
        self._clock = clock
        self._pool = pool
        self._dir = Path(state_dir) / REPORTS_DIR
        self._worker_id = worker_id
        self._backoff = backoff
        self._random = random
        self._max_pending = max_pending
        self._stop_timeout_s = stop_timeout_s
        self._io = DeferredLock()
        self._loaded = False
        self._next_seq = 0
        self._entries: deque[Entry] = deque()  # written, deliverable, in order
        self._queued = 0  # accepted by report(), not yet written
        self._generation = 0
        self._timer: IDelayedCall | None = None
        self._inflight: Deferred[pb.ReportJobStateResponse] | None = None
        self._failures = 0
        self._kicking = False
        self._kick_again = False
        self._overflowing = False
        self._drop_logged: set[str] = set()
        self._idle: Waiters[None] = Waiters()
        self.delivered = 0
        self.dropped = 0

    # -- the producer side ------------------------------------------------------------

    def report(self, request: pb.ReportJobStateRequest) -> None:
        """Queue a report (a copy; worker_id filled in when empty). Returns at once."""
        copy = pb.ReportJobStateRequest()
        copy.CopyFrom(request)
        if not copy.worker_id:
            copy.worker_id = self._worker_id
        if self.pending >= self._max_pending:
            self.dropped += 1
            if not self._overflowing:
                self._overflowing = True
                log.error(
                    "{count} job state reports pending: dropping new ones (job {job_id})",
                    count=self.pending,
                    job_id=copy.job_id,
                )
            return
        self._overflowing = False
        self._queued += 1
        d = self._io.run(lambda: Deferred.fromCoroutine(self._persist(copy)))
        d.addErrback(self._unexpected, "persisting a report")

    @property
    def pending(self) -> int:
        """Reports not yet delivered (or dropped)."""
        return len(self._entries) + self._queued

    @property
    def consecutive_failures(self) -> int:
        """Failed attempts (retryable) since the last answered one."""
        return self._failures

    @property
    def state_dir(self) -> Path:
        return self._dir

    def wait_idle(self) -> Deferred[None]:
        """A new Deferred that fires once no report is pending (at once if none)."""
        if self.pending == 0 and self._loaded:
            return succeed(None)
        return self._idle.wait()

    # -- lifecycle --------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._generation += 1
        self._failures = 0
        d = self._io.run(lambda: Deferred.fromCoroutine(self._load()))
        d.addErrback(self._unexpected, "loading pending reports")

    def stopService(self) -> Deferred[None]:
        """Stops delivery (cancels the timer and the in-flight call: that report stays
        pending) and fires once queued file work is done, or after ``stop_timeout_s``."""
        super().stopService()
        self._generation += 1
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.cancel()
        # Bounded: if the BlockingPool is already stopped, queued file work never runs.
        d = Deferred.fromCoroutine(self._drain_io())
        d.addTimeout(self._stop_timeout_s, cast(Any, self._clock))
        d.addErrback(self._drain_timed_out)
        return d

    async def _drain_io(self) -> None:
        await self._io.acquire()
        self._io.release()

    def _drain_timed_out(self, failure: Failure) -> None:
        failure.trap(TimeoutError)
        log.error(
            "job state report files still being written after {timeout_s} s at shutdown;"
            " {count} unsent reports may not survive the restart",
            timeout_s=self._stop_timeout_s,
            count=self._queued,
        )

    # -- file lane (each runs holding self._io) -------------------------------------------

    async def _load(self) -> None:
        await self._ensure_loaded()
        self._kick()

    async def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        entries, self._next_seq = await load_pending(self._pool, self._dir, self._next_seq)
        self._entries.extend(entries)
        self._loaded = True

    async def _persist(self, request: pb.ReportJobStateRequest) -> None:
        try:
            await self._ensure_loaded()
            seq = self._next_seq
            self._next_seq += 1
            try:
                await self._pool.run(
                    write_atomically, report_path(self._dir, seq), request.SerializeToString()
                )
            except Exception as e:
                log.error(
                    "cannot persist the report of job {job_id} ({error}); delivering it"
                    " anyway, but it will not survive a restart",
                    job_id=request.job_id,
                    error=str(e),
                )
            self._entries.append(Entry(seq, request))
        finally:
            self._queued -= 1
        self._kick()

    def _remove(self, entry: Entry) -> None:
        path = report_path(self._dir, entry.seq)
        d = self._io.run(self._pool.run, unlink, path)
        d.addErrback(self._unexpected, "removing a delivered report")

    # -- delivery ------------------------------------------------------------------------

    def _kick(self) -> None:
        """Start the next delivery if possible; a trampoline, so synchronous answers
        (test doubles) do not recurse once per report."""
        if self._kicking:
            self._kick_again = True
            return
        self._kicking = True
        try:
            self._kick_again = True
            while self._kick_again:
                self._kick_again = False
                self._start_next()
        finally:
            self._kicking = False

    def _start_next(self) -> None:
        if not self._loaded:
            return
        if not self._entries:
            if self._queued == 0:
                self._notify_idle()
            return
        if not self.running or self._inflight is not None or self._timer is not None:
            return
        entry = self._entries[0]
        generation = self._generation
        d = self._client.call("ReportJobState", entry.request, pb.ReportJobStateResponse)
        self._inflight = d
        d.addCallbacks(
            self._answered,
            self._failed,
            callbackArgs=(entry, generation),
            errbackArgs=(entry, generation),
        )

    def _answered(self, _: pb.ReportJobStateResponse, entry: Entry, generation: int) -> None:
        if generation != self._generation:
            return
        self._inflight = None
        if self._failures:
            log.info(
                "controller {url} takes job state reports again ({pending} pending)",
                url=self._client.base_url,
                pending=self.pending - 1,
            )
        self._failures = 0
        self.delivered += 1
        self._finish(entry)

    def _failed(self, failure: Failure, entry: Entry, generation: int) -> None:
        if generation != self._generation:
            return  # cancelled by stopService
        self._inflight = None
        error = failure.value
        if isinstance(error, ControllerError) and not error.retryable:
            self.dropped += 1
            fields: dict[str, Any] = dict(
                code=error.code,
                error=str(error),
                job_id=entry.request.job_id,
                state=pb.JobState.Name(entry.request.state)
                if entry.request.state in pb.JobState.values()
                else str(entry.request.state),
            )
            if error.code not in self._drop_logged:
                self._drop_logged.add(error.code)
                log.warn(
                    "controller refuses ReportJobState ({error}): dropping the {state} report"
                    " of job {job_id}; such reports will never be accepted (further drops"
                    " for code {code} are logged at debug level)",
                    **fields,
                )
            else:
                log.debug("dropping the {state} report of job {job_id}: {error}", **fields)
            self._finish(entry)
            return
        if self._failures == 0:
            log.warn(
                "cannot deliver job state reports to {url}: {error}; {pending} pending,"
                " retrying with backoff",
                url=self._client.base_url,
                error=failure.getErrorMessage() or repr(failure.value),
                pending=self.pending,
            )
        delay = self._backoff.delay(self._failures, self._random)
        self._failures += 1
        self._timer = self._clock.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._timer = None
        self._kick()

    def _finish(self, entry: Entry) -> None:
        if self._entries and self._entries[0] is entry:
            self._entries.popleft()
        self._remove(entry)
        self._kick()

    def _notify_idle(self) -> None:
        self._idle.fire(None)

    def _unexpected(self, failure: Failure, what: str) -> None:
        log.failure("unexpected error {what}", failure=failure, what=what)
