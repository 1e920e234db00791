"""Name lookups through the reactor's own resolver (its thread pool, kept free
for DNS: blocking work goes to a BlockingPool). One copy, for the access guard
(the controller's addresses) and the bundle downloads (the address check)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostResolution, IReactorPluggableNameResolver, IResolutionReceiver
from zope.interface import implementer

__all__ = ["Resolve", "reactor_resolver"]

#: host -> its addresses (IPv4 and IPv6 text); an empty list when it has none.
Resolve = Callable[[str], Deferred[Sequence[str]]]


def reactor_resolver(reactor: object) -> Resolve:
    """Name lookups through the reactor's own resolver (it never blocks the reactor)."""
    resolver = IReactorPluggableNameResolver(reactor).nameResolver

    def resolve(host: str) -> Deferred[Sequence[str]]:
        d: Deferred[Sequence[str]] = Deferred()
        found: list[str] = []

        @implementer(IResolutionReceiver)
        class Receiver:
            def resolutionBegan(self, resolution: IHostResolution) -> None:
                pass

            def addressResolved(self, address: object) -> None:
                host = getattr(address, "host", None)
                if isinstance(host, str) and host not in found:
                    found.append(host)

            def resolutionComplete(self) -> None:
                if not d.called:
                    d.callback(found)

        resolver.resolveHostName(Receiver(), host, portNumber=0)
        return d

    return resolve
