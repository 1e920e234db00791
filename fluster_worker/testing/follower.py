"""A fake LogFollower for unit tests of the job core: it stores what a
FakeContainer (testing/containers.py) prints into the job's JobLog, and
``follow()`` fires once the container has exited and its lines are flushed, as
the real one does. No process, no Docker."""

from __future__ import annotations

from typing import Literal

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from fluster_worker.common.waiters import Waiters
from fluster_worker.logs import FollowStopped, JobLog, LogTailError
from fluster_worker.testing.containers import FakeContainer, FakeContainerRuntime


class FakeLogFollower:
    """Follows one FakeContainer into ``job_log``. ``fail_with`` (set before the
    container exits) makes ``follow()`` fail with LogTailError instead."""

    def __init__(self, job_log: JobLog, container: FakeContainer) -> None:
        self.job_log = job_log
        self.container = container
        self.fail_with: str | None = None
        self.follow_calls = 0
        self.stopped = False

        self._state: Literal["idle", "following", "done"] = "idle"
        self._result: Failure | None = None
        self._waiters: Waiters[None] = Waiters()

    def follow(self) -> Deferred[None]:
        self.follow_calls += 1
        if self._state == "done":
            return succeed(None) if self._result is None else fail(self._result)
        d = self._waiters.wait()
        if self._state == "idle":
            self._state = "following"
            self.container.watchers.append(self._changed)
            self._changed()
        return d

    def stop(self) -> None:
        self.stopped = True
        if self._state != "done":
            self._finish(Failure(FollowStopped(f"following container {self.container.id[:12]} was stopped")))

    def _changed(self) -> None:
        if self._state != "following":
            return
        # From the first line no follower stored: a follower of a re-adopted
        # container resumes where the previous one stopped, as the real one does.
        for source, timestamp_ns, line in self.container.output[self.container.stored :]:
            self.job_log.append(source, line, timestamp_ns)
        self.container.stored = len(self.container.output)
        if self.container.state in ("exited", "removed"):
            error = None if self.fail_with is None else Failure(LogTailError(self.fail_with))
            self._finish(error)

    def _finish(self, result: Failure | None) -> None:
        self._state = "done"
        if self._changed in self.container.watchers:
            self.container.watchers.remove(self._changed)

        def flushed(outcome: object) -> None:
            final = result
            if final is None and isinstance(outcome, Failure):
                final = outcome
            self._result = final
            if final is None:
                self._waiters.fire(None)
            else:
                self._waiters.fail(final)

        self.job_log.flush(sync=True).addBoth(flushed)


class FakeLogFollowers:
    """The JobManager's ``make_follower``: a FakeLogFollower per container of
    ``runtime``, kept in ``followers``."""

    def __init__(self, runtime: FakeContainerRuntime) -> None:
        self.runtime = runtime
        self.followers: list[FakeLogFollower] = []
        self.fail_with: str | None = None  # handed to every new follower

    def __call__(self, job_log: JobLog, container_id: str, resume: bool = True) -> FakeLogFollower:
        follower = FakeLogFollower(job_log, self.runtime.container(container_id))
        follower.fail_with = self.fail_with
        self.followers.append(follower)
        return follower


__all__ = ["FakeLogFollower", "FakeLogFollowers"]
