"""EngineNetworks: the subnets of the engine's bridge networks, where job
containers (and ``host.docker.internal``, the bridge gateway) call from.

Learned from the engine (``docker network ls`` with its IPAM config, through
the BlockingPool) when the service starts, whenever the engine comes back,
and every ``refresh_s`` (networks come and go). Until the first answer,
Docker's default bridge subnet stands in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.common.threads import BlockingPool
from fluster_worker.containers.engine import Engine
from fluster_worker.containers.health import EngineHealth

#: Docker's default bridge (docker0), assumed until the engine has answered.
DEFAULT_BRIDGE = ("172.17.0.0/16",)


def bridge_cidrs(api: Any) -> tuple[str, ...]:
    """Subnets and gateways of every bridge network (blocking: the pool only)."""
    found: list[str] = []
    for network in api.networks(filters={"driver": "bridge"}) or []:
        for conf in ((network or {}).get("IPAM") or {}).get("Config") or []:
            for key in ("Subnet", "Gateway"):
                value = (conf or {}).get(key)
                if isinstance(value, str) and value and value not in found:
                    found.append(value)
    return tuple(found)


class EngineNetworks(Service):
    """Keeps ``cidrs``: the engine's bridge subnets and gateways."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        pool: BlockingPool,
        client_factory: Callable[[], Any],
        health: EngineHealth | None = None,
        *,
        refresh_s: float = 300.0,
    ) -> None:
        self._reactor = reactor
        self._engine = Engine(pool, client_factory)
        self._refresh_s = refresh_s
        self.cidrs: tuple[str, ...] = DEFAULT_BRIDGE
        self.known = False
        self._loop: LoopingCall | None = None
        self._learning = False
        if health is not None:
            health.add_listener(self._engine_changed)

    def startService(self) -> None:
        super().startService()
        loop = LoopingCall(self.learn)
        loop.clock = self._reactor
        self._loop = loop
        loop.start(self._refresh_s, now=True)

    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def learn(self) -> None:
        """Ask the engine again (one question at a time)."""
        if self._learning:
            return
        self._learning = True

        def learned(cidrs: tuple[str, ...]) -> None:
            if cidrs != self.cidrs or not self.known:
                self.log.info("container networks: {cidrs}", cidrs=list(cidrs))
            # No bridge at all (an engine without one) leaves the default in place.
            self.cidrs = cidrs or DEFAULT_BRIDGE
            self.known = True

        def failed(failure: Failure) -> None:
            self.log.warn(
                "cannot list the engine's networks ({error}); refusing state changes from {cidrs}",
                error=failure.getErrorMessage(),
                cidrs=list(self.cidrs),
            )

        def done(_: object) -> None:
            self._learning = False

        self._engine.call("listing networks", bridge_cidrs).addCallbacks(learned, failed).addBoth(done)

    def _engine_changed(self, up: bool, reason: str) -> None:
        if up and self.running:
            self.learn()
