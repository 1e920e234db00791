"""Exit detection for ``ContainerRuntime``: one events-stream thread and the exit
waiters of the containers of one worker id.

One events-stream thread per runtime, not one blocking ``container.wait()`` per
container. A blocking wait holds a BlockingPool thread for the whole life of the job:
with more running jobs than pool threads the pool starves and every other docker call
queues behind the waits. The events stream (events_stream.py) reports each ``die`` as
it happens for any number of containers. On a ``die`` (and whenever a waiter registers,
and after every (re)connect of the stream) the container is inspected for its exit
code, OOMKilled flag and FinishedAt. A waiter is registered before its first inspect,
so an exit that happens at any time (even before ``wait`` was called, or while the
stream was reconnecting) is seen exactly once.

An exit the engine caused is marked (``ExitStatus.engine_stopped``), so that a job
it ends is not counted as the job's own failure. A stopping engine (without
live-restore) signals every container (a ``kill`` event we did not ask for), then
reports their ``die``, then closes the stream. So an exit that follows a kill we
did not send is held for ``settle_s``: if the stream is lost meanwhile, the engine
stopped it. An engine that dies without that ceremony (SIGKILL, a crash) kills the
containers when it starts again: an exit found only after the stream came back,
that happened after the stream was lost, is the engine's too (unless the engine
runs with live-restore, which keeps containers running through its restarts).

A memory-limit kill also comes as an ``oom`` event, before or after its ``die``;
a SIGKILL exit that we did not send waits a moment for it (``_OOM_EVENT_WAIT_S``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

import docker.errors
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.common.waiters import Waiters
from fluster_worker.containers.engine import ContainerError, Engine
from fluster_worker.containers.events_stream import EventsStream
from fluster_worker.containers.health import EngineHealth
from fluster_worker.containers.kills import KILL_MEMORY_S, KillLog
from fluster_worker.containers.status import ExitStatus, exit_status

__all__ = ["ExitWatcher"]

log = Logger()
_RECHECK_DELAY = 1.0
# How long before the stream was lost an exit still counts as the engine's.
_OUTAGE_MARGIN_MS = 1000
# A memory-limit kill is reported twice: the ``die`` (code 137) and an ``oom``
# event, in either order. When the ``oom`` comes second, the inspect after the
# ``die`` still says OOMKilled false. So a SIGKILL exit we did not send waits
# this long for its ``oom`` before it is reported as a plain exit.
_OOM_EVENT_WAIT_S = 1.0


class ExitWatcher:
    """The exit waiters and events thread of one worker id's containers. Reactor thread
    only, except ``_events_loop`` (the events thread). ``on_release(container_id)`` runs
    when a container's exit is reported, before its waiters fire."""

    def __init__(
        self,
        reactor: IReactorTime,
        engine: Engine,
        worker_id: str,
        on_release: Callable[[str], None],
        health: EngineHealth | None = None,
        *,
        settle_s: float = 5.0,
    ) -> None:
        self._reactor = reactor
        self._engine = engine
        self.worker_id = worker_id
        self._on_release = on_release
        # Exit waiters: full container id -> Deferreds, one per wait() call.
        self._waiters: dict[str, list[Deferred[ExitStatus]]] = {}
        # Events thread. State machine: "stopped" -> "running" -> "stopping" -> "stopped".
        self.state = "stopped"
        self._events = EventsStream(
            reactor,
            engine,
            worker_id,
            subscribed=self._subscribed,
            connect_failed=self._connect_failed,
            lost=self._stream_lost,
            event=self._on_event,
            ended=self._events_thread_ended,
        )
        self._stopped: Waiters[None] = Waiters()
        self._rechecks: set[IDelayedCall] = set()
        self.health = health if health is not None else EngineHealth(reactor)
        self._settle_s = settle_s
        # Kills we sent and kills we did not: see the module doc.
        self._kills = KillLog(reactor, self.health)
        self._settling: set[IDelayedCall] = set()
        # Containers whose exit the engine reported (a die event or an exited
        # inspect), until they are removed: they are known not to run.
        self._died: set[str] = set()
        # OOM reporting (see _OOM_EVENT_WAIT_S): containers an ``oom`` event named,
        # and exits waiting for an ``oom``.
        self._oom_seen: set[str] = set()
        self._oom_waits: dict[str, tuple[IDelayedCall, ExitStatus]] = {}

    def _now_ms(self) -> int:
        return int(self._reactor.seconds() * 1000)

    @property
    def thread(self) -> threading.Thread | None:
        """The events thread while there is one."""
        return self._events.thread

    # -- waiters ----------------------------------------------------------------

    def add_waiter(self, container_id: str, *, check: bool = True) -> Deferred[ExitStatus]:
        """A new Deferred firing with the ExitStatus of the container (full id) once it
        has exited; cancelling it only drops this waiter. ``check=False``: the
        container has not been started yet, so it cannot have exited: no inspect
        now (its die event, or the inspect after a reconnect of the stream,
        finds the exit)."""

        def drop(d: Deferred[ExitStatus]) -> None:
            waiters = self._waiters.get(container_id, [])
            if d in waiters:
                waiters.remove(d)
            if not waiters:
                self._waiters.pop(container_id, None)

        if self.state != "running":
            return fail(ContainerError("container wait failed: the container runtime is not running"))
        d: Deferred[ExitStatus] = Deferred(canceller=drop)
        self._waiters.setdefault(container_id, []).append(d)
        if check:
            self._check_exit(container_id, None)
        return d

    def died(self, container_id: str) -> bool:
        """Whether the engine reported the container's exit (full id)."""
        return container_id in self._died

    def forget(self, container_id: str) -> None:
        """The container is being removed: forget its exit."""
        self._died.discard(container_id)
        self._oom_seen.discard(container_id)
        self._kills.forget(container_id)

    def expect_kill(self, container_id: str, signal_name: str) -> None:
        """We are about to signal the container: its kill event is ours."""
        self._kills.expect(container_id, signal_name)

    def _check_exit(
        self, container_id: str, exit_code_hint: int | None, after_outage: bool = False
    ) -> None:
        """Inspect the container and release its waiters if it has exited.
        ``exit_code_hint``: the code of a die event, used when the container is
        already removed by the time we inspect. ``after_outage``: the check runs
        because the stream came back (see the module doc)."""

        def inspect(api: Any) -> dict[str, Any] | None:
            try:
                return cast(dict[str, Any], api.inspect_container(container_id)["State"])
            except docker.errors.NotFound:
                return None

        def checked(state: dict[str, Any] | None) -> None:
            if container_id not in self._waiters:
                return
            if state is None:
                if exit_code_hint is None:
                    self.fail_waiters(
                        container_id,
                        ContainerError(f"container wait failed: no such container {container_id[:64]}"),
                    )
                else:
                    self._exited(container_id, ExitStatus(exit_code_hint, False, self._now_ms()), False)
                return
            status = exit_status(state, self._now_ms())
            if status is not None:
                self._exited(container_id, status, after_outage)

        def failed(f: Failure) -> None:
            # The engine did not answer: try again while someone still waits.
            if container_id not in self._waiters or self.state != "running":
                return
            log.warn(
                "checking container {id} for exit failed: {error}; retrying in {delay}s",
                id=container_id[:12],
                error=f.getErrorMessage(),
                delay=_RECHECK_DELAY,
            )
            call = self._reactor.callLater(
                _RECHECK_DELAY, self._recheck, container_id, exit_code_hint
            )
            self._rechecks.add(call)

        self._engine.call("container inspect", inspect).addCallbacks(checked, failed)

    def _recheck(self, container_id: str, exit_code_hint: int | None) -> None:
        self._rechecks = {c for c in self._rechecks if c.active()}
        if container_id in self._waiters and self.state == "running":
            self._check_exit(container_id, exit_code_hint)

    def _exited(self, container_id: str, status: ExitStatus, after_outage: bool) -> None:
        kill = self._kills.foreign(container_id)
        if kill is not None and self.health.went_away(kill[1]):
            # Stopped by someone else, and the engine went away right after: it
            # was the engine, stopping.
            self._release(container_id, replace(status, engine_stopped=True))
            return
        outage = self.health.outage
        if (
            after_outage
            and outage is not None
            and not self.health.live_restore
            and status.finished_at_ms >= outage.start_ms - _OUTAGE_MARGIN_MS
        ):
            self._release(container_id, replace(status, engine_stopped=True))
            return
        if kill is None or self._reactor.seconds() - kill[0] > KILL_MEMORY_S:
            self._release_unless_oom_may_follow(container_id, status)
            return
        # Stopped by someone else: the engine, if its stream goes away now.
        call = self._reactor.callLater(self._settle_s, self._settled, container_id, status, kill[1])
        self._settling.add(call)

    def _release_unless_oom_may_follow(self, container_id: str, status: ExitStatus) -> None:
        if container_id in self._oom_seen:
            status = replace(status, oom_killed=True)
        if status.oom_killed or status.exit_code != 137 or self._kills.sigkill_sent(container_id):
            self._release(container_id, status)
            return
        call = self._reactor.callLater(_OOM_EVENT_WAIT_S, self._oom_wait_over, container_id)
        self._oom_waits[container_id] = (call, status)

    def _oom_wait_over(self, container_id: str) -> None:
        waiting = self._oom_waits.pop(container_id, None)
        if waiting is not None and self.state == "running":
            self._release(container_id, waiting[1])

    def _oom_seen_now(self, container_id: str) -> None:
        if container_id not in self._waiters:
            return  # nobody waits for it: nothing to report
        self._oom_seen.add(container_id)
        waiting = self._oom_waits.pop(container_id, None)
        if waiting is not None:
            call, status = waiting
            call.cancel()
            self._release(container_id, replace(status, oom_killed=True))

    def _settled(self, container_id: str, status: ExitStatus, breaks: int) -> None:
        self._settling = {c for c in self._settling if c.active()}
        if self.state != "running":
            return
        engine = self.health.went_away(breaks)
        self._release(container_id, replace(status, engine_stopped=engine) if engine else status)

    def _release(self, container_id: str, status: ExitStatus) -> None:
        self._died.add(container_id)
        self._kills.released(container_id)
        self._oom_seen.discard(container_id)
        self._on_release(container_id)
        for d in self._waiters.pop(container_id, []):
            d.callback(status)

    def fail_waiters(self, container_id: str, error: Exception) -> None:
        """Errback every waiter of the container (full id) with ``error``."""
        for d in self._waiters.pop(container_id, []):
            d.errback(Failure(error))

    # -- events thread ----------------------------------------------------------

    def start(self) -> None:
        """Start the events thread ("stopped" -> "running")."""
        self.state = "running"
        self._events.start()

    def stop(self) -> Deferred[None]:
        """Close the events stream, fail pending waiters; fires once the thread ended."""
        if self.state == "stopped":
            return succeed(None)
        d = self._stopped.wait()
        if self.state == "running":
            self.state = "stopping"
            self._events.close()
            for call in self._rechecks | self._settling:
                if call.active():
                    call.cancel()
            for call, _status in self._oom_waits.values():
                if call.active():
                    call.cancel()
            self._rechecks.clear()
            self._settling.clear()
            self._oom_waits.clear()
            for container_id in list(self._waiters):
                self.fail_waiters(
                    container_id,
                    ContainerError("container wait failed: the container runtime stopped"),
                )
        return d

    def _events_thread_ended(self) -> None:
        self.state = "stopped"
        self._stopped.fire(None)

    def _subscribed(self, live_restore: bool) -> None:
        """The stream is (re)connected: exits missed while it was down show up in a
        fresh inspect of every container still waited for."""
        after_outage = self.health.outage is not None and not self.health.outage.end_ms
        self.health.connected(live_restore)
        for container_id in list(self._waiters):
            self._check_exit(container_id, None, after_outage)

    def _connect_failed(self, reason: str) -> None:
        if self.state == "running":
            self.health.connect_failed(reason)

    def _stream_lost(self) -> None:
        if self.state == "running":
            self.health.stream_lost()

    def _on_event(self, event: dict[str, Any]) -> None:
        if self.state != "running":
            return
        action = event.get("Action") or event.get("status")
        actor = event.get("Actor") or {}
        container_id = actor.get("ID") or event.get("id")
        attributes = actor.get("Attributes") or {}
        if action == "kill" and isinstance(container_id, str):
            self._kills.seen(container_id, str(attributes.get("signal", "")))
            return
        if action == "oom" and isinstance(container_id, str):
            self._oom_seen_now(container_id)
            return
        if action != "die" or not isinstance(container_id, str):
            return
        self._died.add(container_id)
        if container_id not in self._waiters:
            return
        try:
            hint: int | None = int(attributes.get("exitCode", ""))
        except (TypeError, ValueError):
            hint = None
        self._check_exit(container_id, hint)
