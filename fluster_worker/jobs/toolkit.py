"""Toolkit: what a job's run needs from the worker, injected by the JobManager."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.interfaces import IReactorTime

from fluster_worker.bundles.cache import BundleCache
from fluster_worker.containers.runtime import ContainerRuntime
from fluster_worker.images.builder import ImageBuilder
from fluster_worker.jobs.admission import Admission
from fluster_worker.jobs.devices import JobDevices
from fluster_worker.jobs.model import JobRecord
from fluster_worker.jobs.sandbox import JobUser, Sandbox
from fluster_worker.jobs.store import JobStore
from fluster_worker.logs import JobLog, LogFollower


def _engine_ready() -> Deferred[None]:
    return succeed(None)


@dataclass
class Toolkit:
    reactor: IReactorTime
    store: JobStore
    bundles: BundleCache
    builder: ImageBuilder
    runtime: ContainerRuntime
    open_log: Callable[[str], JobLog]
    # (job log, container id, resume): ``resume`` when lines of the container
    # may be stored already (a re-adopted container).
    make_follower: Callable[[JobLog, str, bool], LogFollower]
    slots: DeferredSemaphore
    container_env: Callable[[JobRecord], dict[str, str]]
    changed: Callable[[JobRecord], None]
    default_kill_grace: float = 5.0
    usage_interval: float = 5.0
    labels: dict[str, str] = field(default_factory=dict)
    devices: JobDevices = field(default_factory=JobDevices)
    # The line for a slot and devices, shared by every job (made from the two).
    admission: Admission | None = None
    # The Docker engine: a job waits for it before it builds, and a stop that
    # failed while it was away is sent again once it is back.
    engine_ready: Callable[[], Deferred[None]] = _engine_ready
    engine_up: Callable[[], bool] = lambda: True
    # How long an exited container's remaining lines are waited for while the
    # engine is unreachable, before the job ends with its logs incomplete.
    engine_log_wait: float = 60.0
    # The job user, its mounts, what is kept when it ends (sandbox.py).
    sandbox: Sandbox = field(default_factory=lambda: Sandbox(JobUser.default()))

    def __post_init__(self) -> None:
        if self.admission is None:
            self.admission = Admission(self.slots, self.devices)
