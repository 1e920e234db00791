"""JobRig: a JobManager assembled from fakes for fast unit tests of the job core.

Real: the JobManager, JobExecution, JobStore and LogStore (on a temporary
directory, their file work run inline or held back by a PausablePool), the
PortAllocator. Fake: the clock
(``task.Clock``), the bundle cache, the image builder, the container runtime
and the log follower (``fluster_worker.testing``). Time moves only when the test
says so: ``settle()`` runs what is due now, ``advance(s)`` lets ``s`` seconds
pass, timer by timer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from twisted.internet.defer import Deferred, DeferredSemaphore, execute
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock, LoopingCall
from twisted.python.failure import Failure

from fluster_worker.bundles.cache import BundleCache
from fluster_worker.containers.ports import PortAllocator
from fluster_worker.containers.runtime import ContainerRuntime
from fluster_worker.images.builder import ImageBuilder
from fluster_worker.jobs.devices import JobDevices
from fluster_worker.jobs.env import ContainerEnv
from fluster_worker.jobs.execution import Toolkit
from fluster_worker.jobs.manager import JobManager
from fluster_worker.jobs.model import JobRecord, JobRequest
from fluster_worker.jobs.store import JobStore
from fluster_worker.logs import LogQuery, LogStore
from fluster_worker.node import NodeConditions
from fluster_worker.testing.builder import FakeImageBuilder
from fluster_worker.testing.bundle import FakeBundleCache
from fluster_worker.testing.containers import FakeContainer, FakeContainerRuntime
from fluster_worker.testing.follower import FakeLogFollowers

T = TypeVar("T")

T0 = 1_700_000_000.0  # the clock's start: a plausible epoch time
ENTRYPOINT = b"\x80\x05fake pickle"  # never unpickled: the fake container does not run it


class PausablePool:
    """A BlockingPool stand-in that runs each call at once on the calling thread,
    or, while ``paused``, queues it until ``resume()`` (to see what the caller
    does while its file work is in flight)."""

    def __init__(self) -> None:
        self.paused = False
        self.calls = 0
        self._queued: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        self.calls += 1
        if not self.paused:
            return execute(f, *args, **kwargs)
        d: Deferred[T] = Deferred()
        self._queued.append((lambda: f(*args, **kwargs), d))
        return d

    @property
    def queued(self) -> int:
        return len(self._queued)

    def resume(self, *, newest_first: bool = False) -> None:
        """Stop pausing and run the queued calls, in order or newest first (as
        threads may finish them)."""
        self.paused = False
        while self._queued:
            call, d = self._queued.pop(-1 if newest_first else 0)
            execute(call).chainDeferred(d)


class JobRig:
    """A JobManager on fakes (see the module doc). Built stopped; ``start()``."""

    def __init__(
        self,
        root: Path,
        *,
        slots: int = 2,
        cpu_count: int = 4,
        worker_id: str = "fake-worker",
        port_range: tuple[int, int] = (31000, 31009),
        retention_count: int = 1000,
        retention_seconds: float = 7 * 24 * 3600,
        shutdown_grace_seconds: float = 5.0,
        default_kill_grace: float = 5.0,
        usage_interval: float = 5.0,
        auto_build: bool = True,
        bundle_dir: Path | None = None,
        devices: JobDevices | None = None,
        stop_jobs_on_exit: bool = False,
        conditions: NodeConditions | None = None,
        runtime: FakeContainerRuntime | None = None,
        max_pending_jobs: int | None = None,
    ) -> None:
        """``runtime``: the containers (and clock) of an earlier rig on the same
        ``root``: a worker restarted on the same engine and state dir."""
        self.root = root
        if runtime is not None:
            self.clock = runtime.clock
        else:
            self.clock = Clock()
            self.clock.advance(T0)
        self.pool = PausablePool()
        self.store = JobStore(root / "jobs", self.pool, clock=self.clock)  # type: ignore[arg-type]
        self.logs = LogStore(root / "logs", self.pool, self.clock, batch_delay_s=0)  # type: ignore[arg-type]
        self.bundles = FakeBundleCache(auto=bundle_dir)
        self.builder = FakeImageBuilder(self.clock, auto_finish=auto_build)
        self.runtime = runtime if runtime is not None else FakeContainerRuntime(self.clock, worker_id)
        self.followers = FakeLogFollowers(self.runtime)
        self.slots = DeferredSemaphore(slots)
        # The fakes have the interfaces the job core uses, not the classes' types.
        self.kit = Toolkit(
            reactor=self.clock,
            store=self.store,
            bundles=cast(BundleCache, self.bundles),
            builder=cast(ImageBuilder, self.builder),
            runtime=cast(ContainerRuntime, self.runtime),
            open_log=self.logs.open,
            make_follower=cast(Any, self.followers),
            slots=self.slots,
            container_env=ContainerEnv().of,
            changed=lambda record: None,
            default_kill_grace=default_kill_grace,
            usage_interval=usage_interval,
            devices=devices or JobDevices(),
            engine_ready=self.runtime.health.ready,
            engine_up=lambda: self.runtime.health.up,
        )
        self.ports = PortAllocator(*port_range, is_free=lambda port: True)
        self.manager = JobManager(
            self.clock,
            self.kit,
            self.logs,
            self.ports,
            worker_id,
            cpu_count=cpu_count,
            retention_count=retention_count,
            retention_seconds=retention_seconds,
            shutdown_grace_seconds=shutdown_grace_seconds,
            stop_jobs_on_exit=stop_jobs_on_exit,
            conditions=conditions,
            engine=self.runtime.health,
            max_pending_jobs=max_pending_jobs,
        )
        # Every change the manager announces: (job id, state name, status message).
        self.changes: list[tuple[str, str, str]] = []
        self.manager.add_listener(lambda r: self.changes.append((r.job_id, r.state.name, r.status_message)))

    # -- time --------------------------------------------------------------------------

    def settle(self) -> None:
        """Run every call that is due now (and those they schedule for now)."""
        for _ in range(100_000):
            now = self.clock.seconds()
            if not any(c.getTime() <= now for c in self.clock.getDelayedCalls()):
                return
            self.clock.advance(0)
        raise AssertionError("the rig never settles: something reschedules itself at once")

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, firing each timer at its time."""
        end = self.clock.seconds() + seconds
        self.settle()
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= end]
            if not due:
                break
            self.clock.advance(max(0.0, min(due) - self.clock.seconds()))
            self.settle()
        self.clock.advance(max(0.0, end - self.clock.seconds()))
        self.settle()

    def timers(self) -> list[IDelayedCall]:
        """The pending timers, but for the manager's periodic prune."""
        return [c for c in self.clock.getDelayedCalls() if not self._is_pruner(c)]

    def _is_pruner(self, call: IDelayedCall) -> bool:
        func = getattr(call, "func", None)
        return isinstance(func, LoopingCall) and func.f == self.manager.prune

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the runtime and the manager, and wait for its recovery."""
        self.runtime.startService()
        self.manager.startService()
        self.settle()
        assert self.manager.ready().called, "the manager did not finish its recovery"

    def stop(self) -> Deferred[None]:
        """Stop the manager, then the runtime, as the worker does."""
        d = self.manager.stopService()
        self.settle()
        return d.addCallback(lambda _: self.runtime.stopService())

    def close(self) -> None:
        """End whatever a test left running, as a worker stop does (the shutdown
        grace passes on the clock), so that no job's run stays suspended for the
        garbage collector to find."""
        if self.pool.paused:
            self.pool.resume()
        for hold in self.runtime.reached:
            if not hold.released:
                hold.release()
        self.settle()
        if not self.manager.running:
            return
        stopped = self.stop()
        for _ in range(1000):
            if stopped.called:
                return
            self.advance(1.0)
        raise AssertionError("the rig's manager never stopped")

    # -- jobs ---------------------------------------------------------------------------

    def submit(self, job_id: str = "job-1", **fields: Any) -> JobRecord:
        """RunJob with a valid request (override any JobRequest field)."""
        fields.setdefault("entrypoint", ENTRYPOINT)
        record = self.manager.submit(JobRequest(job_id=job_id, **fields))
        self.settle()
        return record

    def record(self, job_id: str = "job-1") -> JobRecord:
        return self.manager.get(job_id)

    def container(self, job_id: str = "job-1") -> FakeContainer:
        """The job's newest container."""
        mine = [c for c in self.runtime.containers.values() if c.spec.labels.get("fluster.job_id") == job_id]
        assert mine, f"job {job_id} has no container"
        return mine[-1]

    def lines(self, job_id: str = "job-1", source: str | None = None) -> list[str]:
        """The job's stored log lines (of one source, or all) in order."""
        query = LogQuery(sources=None if source is None else frozenset({source}))
        return [line.data for line in result(self, self.logs.query(job_id, query))]


def result(rig: JobRig, d: Deferred[Any]) -> Any:
    """What ``d`` fired with once the rig settled; raise its failure; fail the test
    if it has not fired."""
    rig.settle()
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


__all__ = ["ENTRYPOINT", "T0", "JobRig", "PausablePool", "result"]
