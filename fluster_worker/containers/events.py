"""Exit detection for ``ContainerRuntime``: one events-stream thread and the exit
waiters of the containers of one worker id.

One events-stream thread per runtime, not one blocking ``container.wait()`` per
container. A blocking wait holds a BlockingPool thread for the whole life of the job:
with more running jobs than pool threads the pool starves and every other docker call
queues behind the waits. The events stream is one long-lived HTTP request on its own
thread (never a pool thread), filtered by our label, that reports each ``die`` as it
happens for any number of containers. On a ``die`` (and whenever a waiter registers,
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

import signal as _signal
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

import docker.errors
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.common.backoff import Backoff
from fluster_worker.common.waiters import Waiters
from fluster_worker.containers.engine import ContainerError, Engine, explain
from fluster_worker.containers.health import EngineHealth
from fluster_worker.containers.spec import WORKER_ID_LABEL
from fluster_worker.containers.status import ExitStatus, exit_status

__all__ = ["ExitWatcher"]

log = Logger()

_RECONNECT = Backoff(initial_s=0.5, max_s=5.0, factor=2.0, jitter=0.0)
_RECHECK_DELAY = 1.0
# A kill we sent shows up as a kill event within this time; one we did not send
# still counts for an exit this long after it (the engine's stop timeout is 10 s).
_KILL_MEMORY_S = 30.0
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
        # The real reactor provides both; the events thread hands its news over.
        self._from_threads = cast(IReactorFromThreads, reactor)
        self._engine = engine
        self.worker_id = worker_id
        self._on_release = on_release
        # Exit waiters: full container id -> Deferreds, one per wait() call.
        self._waiters: dict[str, list[Deferred[ExitStatus]]] = {}
        # Events thread. State machine: "stopped" -> "running" -> "stopping" -> "stopped".
        self.state = "stopped"
        self._stop_event = threading.Event()
        self._stream_lock = threading.Lock()
        self._stream: Any = None  # docker.types.CancellableStream while connected
        self.thread: threading.Thread | None = None
        self._stopped: Waiters[None] = Waiters()
        self._rechecks: set[IDelayedCall] = set()
        self.health = health if health is not None else EngineHealth(reactor)
        self._settle_s = settle_s
        # Kills we sent (container -> [(signal number, until)]) and kills we did
        # not (container -> when): see the module doc.
        self._expected_kills: dict[str, list[tuple[str, float]]] = {}
        # container -> (when, how many streams were lost by then)
        self._foreign_kills: dict[str, tuple[float, int]] = {}
        self._settling: set[IDelayedCall] = set()
        # Containers whose exit the engine reported (a die event or an exited
        # inspect), until they are removed: they are known not to run.
        self._died: set[str] = set()
        # OOM reporting (see _OOM_EVENT_WAIT_S): containers an ``oom`` event named,
        # those we sent a SIGKILL (their 137 is ours), and exits waiting for an ``oom``.
        self._oom_seen: set[str] = set()
        self._sigkills_sent: set[str] = set()
        self._oom_waits: dict[str, tuple[IDelayedCall, ExitStatus]] = {}

    def _now_ms(self) -> int:
        return int(self._reactor.seconds() * 1000)

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
        self._sigkills_sent.discard(container_id)

    def expect_kill(self, container_id: str, signal_name: str) -> None:
        """We are about to signal the container: its kill event is ours."""
        try:
            number = str(int(_signal.Signals[signal_name]))
        except KeyError:
            return
        if signal_name == "SIGKILL":
            self._sigkills_sent.add(container_id)
        until = self._reactor.seconds() + _KILL_MEMORY_S
        self._expected_kills.setdefault(container_id, []).append((number, until))

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
        kill = self._foreign_kills.get(container_id)
        if kill is not None and self._engine_went_away(kill[1]):
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
        if kill is None or self._reactor.seconds() - kill[0] > _KILL_MEMORY_S:
            self._release_unless_oom_may_follow(container_id, status)
            return
        # Stopped by someone else: the engine, if its stream goes away now.
        call = self._reactor.callLater(self._settle_s, self._settled, container_id, status, kill[1])
        self._settling.add(call)

    def _release_unless_oom_may_follow(self, container_id: str, status: ExitStatus) -> None:
        if container_id in self._oom_seen:
            status = replace(status, oom_killed=True)
        if status.oom_killed or status.exit_code != 137 or container_id in self._sigkills_sent:
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

    def _engine_went_away(self, breaks: int) -> bool:
        return self.health.breaks != breaks or not self.health.up

    def _settled(self, container_id: str, status: ExitStatus, breaks: int) -> None:
        self._settling = {c for c in self._settling if c.active()}
        if self.state != "running":
            return
        engine = self._engine_went_away(breaks)
        self._release(container_id, replace(status, engine_stopped=engine) if engine else status)

    def _release(self, container_id: str, status: ExitStatus) -> None:
        self._died.add(container_id)
        self._foreign_kills.pop(container_id, None)
        self._expected_kills.pop(container_id, None)
        self._oom_seen.discard(container_id)
        self._sigkills_sent.discard(container_id)
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
        self._stop_event.clear()
        self.thread = threading.Thread(
            target=self._events_loop, name=f"docker-events-{self.worker_id[:32]}", daemon=True
        )
        self.thread.start()

    def stop(self) -> Deferred[None]:
        """Close the events stream, fail pending waiters; fires once the thread ended."""
        if self.state == "stopped":
            return succeed(None)
        d = self._stopped.wait()
        if self.state == "running":
            self.state = "stopping"
            self._stop_event.set()
            with self._stream_lock:
                stream, self._stream = self._stream, None
            if stream is not None:
                _close_quietly(stream)
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
        self.thread = None
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
            self._kill_seen(container_id, str(attributes.get("signal", "")))
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

    def _kill_seen(self, container_id: str, number: str) -> None:
        now = self._reactor.seconds()
        expected = [(n, until) for n, until in self._expected_kills.get(container_id, []) if until >= now]
        for i, (n, _) in enumerate(expected):
            if n == number:
                del expected[i]
                break
        else:
            self._foreign_kills.setdefault(container_id, (now, self.health.breaks))
        if expected:
            self._expected_kills[container_id] = expected
        else:
            self._expected_kills.pop(container_id, None)
        # Forget old ones, but not those the engine went away after (their exit
        # may only be found once it is back).
        for cid, (at, breaks) in list(self._foreign_kills.items()):
            if now - at > _KILL_MEMORY_S and (not self._engine_went_away(breaks) or now - at > 3600):
                del self._foreign_kills[cid]

    def _log_from_thread(self, text: str, **fields: object) -> None:
        self._from_threads.callFromThread(lambda: log.warn(text, **fields))

    def _events_loop(self) -> None:
        """The events thread: stream `die` events of our containers to the reactor,
        reconnecting with backoff until stop() sets the stop event."""
        failures = 0
        filters = {
            "type": "container",
            "event": ["die", "kill", "oom"],
            "label": f"{WORKER_ID_LABEL}={self.worker_id}",
        }
        try:
            while not self._stop_event.is_set():
                try:
                    stream = self._engine.api().events(decode=True, filters=filters)
                except Exception as e:
                    if failures == 0:
                        self._log_from_thread(
                            "docker events: connect failed ({error}); retrying with backoff",
                            error=explain(e),
                        )
                    self._from_threads.callFromThread(self._connect_failed, explain(e))
                    self._stop_event.wait(_RECONNECT.base(failures))
                    failures += 1
                    continue
                with self._stream_lock:
                    if self._stop_event.is_set():
                        _close_quietly(stream)
                        break
                    self._stream = stream
                failures = 0
                self._from_threads.callFromThread(self._subscribed, self._live_restore())
                try:
                    for event in stream:
                        if isinstance(event, dict):
                            self._from_threads.callFromThread(self._on_event, event)
                except Exception as e:
                    if not self._stop_event.is_set():
                        self._log_from_thread("docker events: stream failed: {error}", error=explain(e))
                with self._stream_lock:
                    self._stream = None
                _close_quietly(stream)
                if not self._stop_event.is_set():
                    self._from_threads.callFromThread(self._stream_lost)
                    self._log_from_thread("docker events: stream ended; reconnecting")
                    self._stop_event.wait(_RECONNECT.base(failures))
        finally:
            self._from_threads.callFromThread(self._events_thread_ended)


    def _live_restore(self) -> bool:
        """Events thread: whether the engine keeps containers running through its
        restarts (False when it cannot say)."""
        try:
            return bool(self._engine.api().info().get("LiveRestoreEnabled"))
        except Exception:
            return False


def _close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception:
        pass
