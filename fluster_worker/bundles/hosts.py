"""Which hosts an http(s) bundle may come from, checked where the connection is made.

A bundle URL is chosen by whoever calls RunJob, so an unchecked download makes the
worker a proxy into its own network: loopback services, the cloud's metadata server
(link-local), the machines of a private network. By default only globally routable
addresses are reached; ``--allow-private-bundle-hosts`` names the private networks
(or ``yes``: all of them) that may serve bundles too.

The check lives in the connection path, not in the URL: `GuardedEndpointFactory`
resolves the name itself (the reactor's resolver, `common/resolve.py`), refuses it when any of its
addresses is not allowed, and connects to the very address it checked. So no
second lookup can answer differently (DNS rebinding), and every redirect, which
makes a new connection through the same factory, is checked the same way. TLS is
layered over the checked connection with the URL's host name (SNI, certificate).

An IPv6 address that carries an IPv4 one (mapped ``::ffff:a.b.c.d``, 6to4,
Teredo, the NAT64 well-known prefix) is judged by the IPv4 address as well.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from fluster_worker.common.http import QuietConnectionPool
from fluster_worker.common.resolve import Resolve, reactor_resolver

__all__ = [
    "AddressPolicy",
    "HostRefused",
    "GuardedEndpointFactory",
    "bundle_http_client",
    "parse_private_hosts",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

EVERYWHERE = ("0.0.0.0/0", "::/0")
CONNECT_TIMEOUT = 30  # seconds for one TCP connect
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class HostRefused(Exception):
    """The host resolves to an address that bundles may not come from."""

    def __init__(self, host: str) -> None:
        super().__init__(f"{host} resolves to a private address")
        self.host = host


def parse_private_hosts(text: str) -> tuple[str, ...]:
    """``--allow-private-bundle-hosts``: ``no`` (none), ``yes`` (every address),
    or CIDR[,CIDR]. ValueError names the bad part."""
    word = text.strip().lower()
    if word in ("", "no", "false", "0", "off", "none"):
        return ()
    if word in ("yes", "true", "1", "on", "all", "*"):
        return EVERYWHERE
    networks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ValueError(f"{part[:60]!r} is not an address or CIDR network") from None
    return tuple(networks)


@dataclass(frozen=True)
class AddressPolicy:
    """Global unicast addresses are allowed; others only inside ``private``."""

    private: tuple[Network, ...] = ()

    @classmethod
    def of(cls, networks: Sequence[str]) -> AddressPolicy:
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in networks))

    @property
    def allows_all(self) -> bool:
        return any(n.prefixlen == 0 for n in self.private)

    def allows(self, text: str) -> bool:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            return False
        if any(address in n for n in self.private if n.version == address.version):
            return True
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            if not self.allows(str(embedded)):
                return False
            if _carries(address):  # mapped, NAT64: the IPv4 address is the one reached
                return True
        return _is_public(address)


def _carries(address: Address) -> bool:
    """An IPv6 address whose meaning is the IPv4 address inside it."""
    return isinstance(address, ipaddress.IPv6Address) and (
        address.ipv4_mapped is not None or address in _NAT64
    )


def _embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _is_public(address: Address) -> bool:
    return not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
        or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)
        or not address.is_global
    )


@implementer(IStreamClientEndpoint)
class GuardedEndpoint:
    """Resolve, check every address, connect to a checked one (TLS over it for https)."""

    def __init__(
        self, reactor: Any, host: str, port: int, policy: AddressPolicy, resolve: Resolve,
        tls: IPolicyForHTTPS | None,
    ) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._policy = policy
        self._resolve = resolve
        self._tls = tls

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: IProtocolFactory) -> Any:
        addresses = list(await self._resolve(self._host))
        if not addresses:
            raise ConnectionError(f"{self._host} has no address")
        if not all(self._policy.allows(a) for a in addresses):
            raise HostRefused(self._host)
        error: BaseException | None = None
        for address in addresses:
            endpoint = self._endpoint(address)
            try:
                return await endpoint.connect(factory)
            except Exception as e:  # the next address, as a browser would
                error = e
        assert error is not None
        raise error

    def _endpoint(self, address: str) -> IStreamClientEndpoint:
        tcp: IStreamClientEndpoint
        if ":" in address:
            tcp = TCP6ClientEndpoint(self._reactor, address, self._port, timeout=CONNECT_TIMEOUT)
        else:
            tcp = TCP4ClientEndpoint(self._reactor, address, self._port, timeout=CONNECT_TIMEOUT)
        if self._tls is None:
            return tcp
        creator = self._tls.creatorForNetloc(self._host.encode("idna"), self._port)
        return wrapClientTLS(creator, tcp)


@implementer(IAgentEndpointFactory)
class GuardedEndpointFactory:
    """An Agent's endpoints for http and https URLs, each a `GuardedEndpoint`."""

    def __init__(
        self, reactor: Any, policy: AddressPolicy, resolve: Resolve,
        tls: IPolicyForHTTPS | None = None,
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._resolve = resolve
        self._tls = tls if tls is not None else BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        scheme = uri.scheme.decode("ascii", "replace")
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r}")
        host = uri.host.decode("ascii", "replace")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        tls = self._tls if scheme == "https" else None
        return GuardedEndpoint(self._reactor, host, uri.port, self._policy, self._resolve, tls)


def bundle_http_client(
    reactor: Any, private: Sequence[str], *,
    resolve: Resolve | None = None, tls: IPolicyForHTTPS | None = None,
    max_per_host: int = 4, idle_timeout_s: int = 30,
) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client whose every connection is checked against ``private`` (CIDR
    strings, `parse_private_hosts`), over its own quiet persistent pool."""
    connections = QuietConnectionPool(reactor, persistent=True)
    connections.maxPersistentPerHost = max_per_host
    connections.cachedConnectionTimeout = idle_timeout_s
    connections.retryAutomatically = False
    factory = GuardedEndpointFactory(
        reactor, AddressPolicy.of(private), resolve or reactor_resolver(reactor), tls
    )
    agent = Agent.usingEndpointFactory(reactor, factory, pool=connections)
    return HTTPClient(agent), connections
