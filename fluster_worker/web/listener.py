"""WebService: the worker's HTTP site on a Twisted endpoint string (``tcp:...``,
``ssl:...``), with its connection cap and read deadline (``rpc.site``); knows the
real port once listening."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from fluster_worker.common.waiters import Once
from fluster_worker.web.rpc.channel import DEFAULT_READ_TIMEOUT_S
from fluster_worker.web.rpc.site import DEFAULT_MAX_CONNECTIONS, limit_connections


class WebService(Service):
    """Listens on a Twisted endpoint string; knows the real port afterwards."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        description: str,
        site: Site,
        *,
        max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
        read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S,
    ) -> None:
        self._reactor = reactor
        self._description = description
        self._site = site
        limit_connections(site, max_connections, read_timeout_s)
        self.port: IListeningPort | None = None
        self._listening: Once[int] = Once()

    def when_listening(self) -> Deferred[int]:
        """A new Deferred that fires with the real port once listening."""
        return self._listening.wait()

    def startService(self) -> Deferred[IListeningPort]:  # type: ignore[override]
        super().startService()
        d: Deferred[IListeningPort] = serverFromString(self._reactor, self._description).listen(self._site)

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            host = port.getHost()
            self.log.info("listening on {host}:{port}", host=host.host, port=host.port)  # type: ignore[attr-defined]
            self._listening.fire(self.listening_port)
            return port

        def failed(failure: Failure) -> Failure:
            self.log.failure("cannot listen on {description}", failure, description=self._description)
            self._listening.fail(failure)
            # A worker nobody can reach is worse than one that is visibly down.
            self._reactor.stop()
            return failure

        return d.addCallbacks(listening, failed)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        if self.port is None:
            return Deferred.fromCoroutine(_noop())
        return Deferred.fromCoroutine(_stop_listening(self.port))

    @property
    def site(self) -> Site:
        """The site served (its connection counters are read by the metrics)."""
        return self._site

    @property
    def listening_port(self) -> int:
        return self.port.getHost().port if self.port is not None else 0  # type: ignore[attr-defined]


async def _noop() -> None:
    return None


async def _stop_listening(port: IListeningPort) -> None:
    await maybeDeferred(port.stopListening)  # type: ignore[call-overload]
