"""How ContainerRuntime ends a container: SIGTERM, then SIGKILL if it is still
alive when its grace runs out. While one termination is under way, another sends
no second SIGTERM: it only brings the SIGKILL forward when its grace ends sooner.

``send_signal`` is the signal call itself (pool thread), shared with
``ContainerRuntime.signal``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import docker.errors
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fluster_worker.containers.engine import ContainerError, Engine
from fluster_worker.containers.events import ExitWatcher
from fluster_worker.containers.grace import GraceDeadline
from fluster_worker.containers.status import ExitStatus

__all__ = ["Terminations", "send_signal"]

log = Logger()


class Terminations:
    """The terminations under way, by the id ``terminate`` was given. ``wait``
    and ``signal`` are the runtime's own (a new exit waiter; a signal that the
    exit watcher expects)."""

    def __init__(
        self,
        reactor: IReactorTime,
        engine: Engine,
        exits: ExitWatcher,
        wait: Callable[[str], Deferred[ExitStatus]],
        signal: Callable[[str, str], Deferred[None]],
    ) -> None:
        self._reactor = reactor
        self._engine = engine
        self._exits = exits
        self._wait = wait
        self._signal = signal
        self._graces: dict[str, GraceDeadline] = {}

    def terminate(
        self,
        container_id: str,
        grace_seconds: float,
        on_sigterm: Callable[[bool], None] | None = None,
    ) -> Deferred[ExitStatus]:
        """See ``ContainerRuntime.terminate`` (which checks that it runs first)."""
        pending = self._graces.get(container_id)
        if pending is not None:
            pending.shorten(grace_seconds)
            return self._wait(container_id)
        grace = GraceDeadline(self._reactor, grace_seconds, lambda: self._kill_after_grace(container_id))
        self._graces[container_id] = grace

        async def run() -> ExitStatus:
            exited = self._wait(container_id)  # registered before the signal: no race
            try:
                self._exits.expect_kill(container_id, "SIGTERM")
                sent = await self._engine.call("container SIGTERM", send_signal, container_id, "SIGTERM")
                if on_sigterm is not None:
                    on_sigterm(sent)
                if not sent and not exited.called:
                    # Not running: exited (the waiter sees it) or never started.
                    info = await self._engine.call(
                        "container inspect", lambda api: api.inspect_container(container_id)
                    )
                    if info["State"].get("Status") == "created":
                        raise ContainerError(
                            f"container terminate failed: {container_id[:64]} was never started"
                        )
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

    def _kill_after_grace(self, container_id: str) -> None:
        log.info("container {id} outlived its grace period: SIGKILL", id=container_id[:12])
        self._signal(container_id, "SIGKILL").addErrback(
            lambda f: log.failure("SIGKILL of {id} failed", f, id=container_id[:12])
        )


def send_signal(api: Any, container_id: str, sig: str) -> bool:
    """Signal the container (pool thread); False when it is gone or not running."""
    try:
        api.kill(container_id, signal=sig)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as e:
        # 409 Conflict: "Container ... is not running".
        if e.status_code != 409:
            raise
        return False
    return True
