"""A fake ContainerRuntime for unit tests of its callers (JobExecution,
JobManager): the same interface, no Docker, driven by a ``task.Clock``. Its
containers are FakeContainers (container.py); testing/follower.py follows them.

The test decides when a container exits and how (``FakeContainer.exit``), what it
prints (``FakeContainer.print``), how it answers SIGTERM (``on_sigterm``), and
can hold any runtime operation midway (``FakeContainerRuntime.hold``) or make
the next one fail (``fail_next``) to play races. Every call is recorded in
``FakeContainerRuntime.calls`` as ``(operation, container id or name, ...)``.

What the fake keeps of the real runtime's contract:

* ``wait`` fires with the ExitStatus once the container exited (at once if it
  had), a new Deferred per call; it fails with ContainerError when the runtime
  is not running, the container is unknown, or it is removed before it started.
* ``terminate`` sends SIGTERM, then SIGKILL after the grace (a clock timer
  cancelled by the exit); ContainerError for a container never started. A
  ``terminate`` while one is under way sends no second SIGTERM: it can only
  bring the SIGKILL forward.
* ``remove`` force-removes: a running container is killed first (exit 137).
* ``stopService`` fails pending waiters; the containers are left alone.
"""

from __future__ import annotations

import hashlib
import itertools
import signal as _signal
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock

from fluster_worker.containers.grace import GraceDeadline
from fluster_worker.containers.runtime import (
    ATTEMPT_ID_LABEL,
    JOB_ID_LABEL,
    WORKER_ID_LABEL,
    ContainerError,
    ContainerInfo,
    ContainerSpec,
    EngineHealth,
    ExitStatus,
    UsageSample,
)
from fluster_worker.testing.container import (
    SIGKILL_EXIT,
    SIGTERM_EXIT,
    ContainerState,
    FakeContainer,
    Hold,
)
from fluster_worker.testing.logs import docker_line

T = TypeVar("T")

class FakeContainerRuntime(Service):
    """ContainerRuntime's interface on a Clock (see the module doc)."""

    def __init__(self, clock: IReactorTime | None = None, worker_id: str = "fake-worker") -> None:
        self.clock: Any = clock if clock is not None else Clock()
        self.worker_id = worker_id
        self.containers: dict[str, FakeContainer] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.running_service = False
        self.engine_error: str | None = None  # every call fails with this while set
        # The engine's reachability as the real runtime's events stream reports
        # it; ``engine_down``/``engine_up`` move it (and ``engine_error``).
        self.health = EngineHealth(self.clock)
        self.health.connected(live_restore=False)
        self._holds: dict[str, Hold] = {}
        self.reached: list[Hold] = []  # holds whose call arrived
        self._failures: dict[str, Exception] = {}
        self._ids = itertools.count(1)
        self._waiting: dict[str, list[Deferred[ExitStatus]]] = {}
        self._graces: dict[str, GraceDeadline] = {}  # terminations under way

    # -- test controls ------------------------------------------------------------

    def hold(self, operation: str) -> Hold:
        """Hold the next call of ``operation`` ("create", "start", "remove",
        "terminate", ...) after it is recorded, until ``release()``; the
        operation then takes effect."""
        hold = self._holds[operation] = Hold(operation)
        return hold

    def fail_next(self, operation: str, error: Exception | str) -> None:
        """Make the next call of ``operation`` fail (a str: ContainerError)."""
        self._failures[operation] = error if isinstance(error, Exception) else ContainerError(error)

    def container(self, container_id: str) -> FakeContainer:
        """The container by id, unique id prefix or name (KeyError if none)."""
        if container_id in self.containers:
            return self.containers[container_id]
        found = [c for c in self.containers.values() if c.id.startswith(container_id) or c.name == container_id]
        if len(found) != 1:
            raise KeyError(container_id)
        return found[0]

    def live(self) -> list[FakeContainer]:
        """Containers not removed, in creation order."""
        return [c for c in self.containers.values() if c.state != "removed"]

    def add_container(self, spec: ContainerSpec, state: ContainerState = "running") -> FakeContainer:
        """A container that exists without this runtime having created it (one
        left by a previous worker process)."""
        container = self._new(spec)
        if state in ("running", "exited"):
            container.state, container.started = "running", True
        if state == "exited":
            container.exit(0)
        return container

    def engine_down(self, reason: str = "Docker engine unreachable: connection refused") -> None:
        """The engine goes away: every call fails, health says so."""
        self.engine_error = reason
        self.health.stream_lost()
        self.health.connect_failed(reason)

    def engine_up(self) -> None:
        self.engine_error = None
        self.health.connected(live_restore=False)

    def operations(self, name: str) -> list[tuple[Any, ...]]:
        """The recorded calls of one operation."""
        return [c for c in self.calls if c[0] == name]

    # -- the runtime's interface ------------------------------------------------------

    def create(self, spec: ContainerSpec) -> Deferred[str]:
        def create() -> str:
            if spec.labels.get(WORKER_ID_LABEL, self.worker_id) != self.worker_id:
                raise ContainerError(f"container create failed: label {WORKER_ID_LABEL} is not this worker's id")
            if any(c.name == spec.name for c in self.live()):
                raise ContainerError(f"container create failed: the name {spec.name!r} is in use")
            return self._new(spec).id

        return self._op("create", spec.name, create)

    def start(self, container_id: str) -> Deferred[None]:
        def start() -> None:
            container = self._find("start", container_id)
            if container.state == "created":
                container.state, container.started = "running", True

        return self._op("start", container_id, start)

    def signal(self, container_id: str, sig: str) -> Deferred[None]:
        if sig not in _signal.Signals.__members__:
            return fail(ValueError(f"unknown signal {sig[:20]!r}"))

        def send() -> None:
            container = self.containers.get(container_id)
            if container is not None:
                container.deliver(sig)

        return self._op("signal", container_id, send, sig)

    def remove(self, container_id: str, *, started: bool = False) -> Deferred[None]:
        def remove() -> None:
            container = self.containers.get(container_id)
            if container is None or container.state == "removed":
                return
            if container.state == "running":
                container.deliver("SIGKILL")
            never_started = not container.started
            container.state = "removed"
            if never_started:
                error = ContainerError(f"container wait failed: {container.id} was removed before it started")
                for d in self._waiting.pop(container.id, []):
                    if not d.called:
                        d.errback(error)

        return self._op("remove", container_id, remove)

    def inventory(self) -> Deferred[list[ContainerInfo]]:
        def list_() -> list[ContainerInfo]:
            infos = []
            for c in self.live():
                try:
                    attempt = int(c.labels.get(ATTEMPT_ID_LABEL, ""))
                except ValueError:
                    attempt = -1
                infos.append(ContainerInfo(c.id, c.name, c.labels.get(JOB_ID_LABEL, ""), attempt, c.state))
            return infos

        return self._op("inventory", "", list_)

    def list_ours(self) -> Deferred[list[str]]:
        return self._op("list_ours", "", lambda: [c.id for c in self.live()])

    def remove_orphans(self) -> Deferred[int]:
        async def run() -> int:
            await self._op("remove_orphans", "", lambda: None)
            ids = await self.list_ours()
            for cid in ids:
                await self.remove(cid)
            return len(ids)

        return Deferred.fromCoroutine(run())

    def is_running(self, container_id: str) -> Deferred[bool]:
        def check() -> bool:
            container = self.containers.get(container_id)
            return container is not None and container.state == "running"

        return self._op("is_running", container_id, check).addErrback(lambda _: False)

    def last_log_entries(self, container_id: str, count: int) -> Deferred[dict[int, bytes]]:
        def read() -> dict[int, bytes]:
            container = self._find("logs", container_id)
            out = {}
            for fd, source in ((1, "stdout"), (2, "stderr")):
                lines = [(ts, line) for s, ts, line in container.output if s == source][-count:]
                out[fd] = b"".join(docker_line(ts, line) for ts, line in lines)
            return out

        return self._op("last_log_entries", container_id, read, count)

    def sample(self, container_id: str) -> Deferred[UsageSample | None]:
        def sample() -> UsageSample | None:
            container = self.containers.get(container_id)
            if container is None or container.state != "running":
                return None
            return container.usage

        return self._op("sample", container_id, sample)

    def wait(self, container_id: str, *, before_start: bool = False) -> Deferred[ExitStatus]:
        self.calls.append(("wait", container_id))
        if not self.running_service:
            return fail(ContainerError("container wait failed: the container runtime is not running"))
        if self.engine_error is not None:
            return fail(ContainerError(f"container wait failed: {self.engine_error}"))
        container = self.containers.get(container_id)
        if container is None or (container.state == "removed" and container.status is None):
            return fail(ContainerError(f"container wait failed: no such container {container_id[:64]}"))
        d = container.waiter()
        if not d.called:
            self._waiting.setdefault(container.id, []).append(d)
        return d

    def terminate(
        self,
        container_id: str,
        grace_seconds: float,
        on_sigterm: Callable[[bool], None] | None = None,
    ) -> Deferred[ExitStatus]:
        if not self.running_service:
            return fail(ContainerError("container terminate failed: the container runtime is not running"))
        pending = self._graces.get(container_id)
        if pending is not None:
            # A termination is under way: no second SIGTERM, the SIGKILL only comes sooner.
            self.calls.append(("terminate", container_id, grace_seconds))
            pending.shorten(grace_seconds)
            return self.wait(container_id)
        grace = GraceDeadline(self.clock, grace_seconds, lambda: self._sigkill(container_id))
        self._graces[container_id] = grace

        async def run() -> ExitStatus:
            exited = self.wait(container_id)
            try:
                await self._op("terminate", container_id, lambda: None, grace_seconds)
                container = self.containers[container_id]
                if not container.started:
                    raise ContainerError(f"container terminate failed: {container_id[:64]} was never started")
                delivered = container.state == "running"
                if on_sigterm is not None:
                    # As the real runtime: the answer of the SIGTERM call comes
                    # before the exit it causes is reported.
                    on_sigterm(delivered)
                container.deliver("SIGTERM")
                if not exited.called:
                    grace.arm()
                return await exited
            finally:
                grace.cancel()
                if self._graces.get(container_id) is grace:
                    del self._graces[container_id]
                if not exited.called:
                    exited.cancel()
                    exited.addErrback(lambda _: None)

        return Deferred.fromCoroutine(run())

    def _sigkill(self, container_id: str) -> None:
        self.signal(container_id, "SIGKILL").addErrback(lambda _: None)

    # -- service ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.running_service = True

    def stopService(self) -> Deferred[None]:
        if self.running:
            super().stopService()
        self.running_service = False
        error = ContainerError("container wait failed: the container runtime stopped")
        waiting, self._waiting = self._waiting, {}
        for cid, ds in waiting.items():
            container = self.containers.get(cid)
            for d in ds:
                if container is not None:
                    container._exits._drop(d)  # its exit no longer reaches this waiter
                if not d.called:
                    d.errback(error)
        return succeed(None)

    # -- internals ----------------------------------------------------------------------

    def _new(self, spec: ContainerSpec) -> FakeContainer:
        number = next(self._ids)
        cid = hashlib.sha256(f"{self.worker_id}/{number}".encode()).hexdigest()
        labels = {**spec.labels, WORKER_ID_LABEL: self.worker_id}
        container = FakeContainer(self, cid, replace(spec, labels=labels))
        self.containers[cid] = container
        return container

    def _find(self, what: str, container_id: str) -> FakeContainer:
        container = self.containers.get(container_id)
        if container is None or container.state == "removed":
            raise ContainerError(f"container {what} failed: no such container {container_id[:64]}")
        return container

    def _op(self, operation: str, subject: str, effect: Callable[[], T], *args: Any) -> Deferred[T]:
        """Record the call; then (after a hold, if any) fail as asked or take effect."""
        self.calls.append((operation, subject, *args))

        def go(_: object = None) -> T:
            failure = self._failures.pop(operation, None)
            if failure is not None:
                raise failure
            if self.engine_error is not None:
                raise ContainerError(f"container {operation} failed: {self.engine_error}")
            return effect()

        hold = self._holds.pop(operation, None)
        if hold is None:
            try:
                return succeed(go())
            except Exception as e:
                return fail(e)
        d = hold._go.addCallback(go)
        self.reached.append(hold)
        hold.reached.callback(None)
        return d


__all__ = ["FakeContainer", "FakeContainerRuntime", "Hold", "SIGKILL_EXIT", "SIGTERM_EXIT"]
