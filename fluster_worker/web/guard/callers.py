"""Who a caller is, by address: the rules of ``--allow-control-from`` and
``--allow-read-from``, and the controller's addresses behind them.

A rule is a comma list of CIDRs or addresses plus two words: ``loopback``
(127.0.0.0/8 and ::1) and ``controller`` (what the ``--controller`` host
resolves to); ``*`` allows everyone.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fluster_worker.common.resolve import Resolve
from fluster_worker.common.waiters import Waiters

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
WORDS = ("loopback", "controller")
#: Docker's default bridge: where job containers call from when nobody told us more.
DEFAULT_CONTAINER_NETWORKS = ("172.17.0.0/16",)


@functools.lru_cache(maxsize=4096)
def parse_ip(text: str) -> Address | None:
    """(Cached: callers come back.) An address, IPv4-mapped IPv6 unmapped and any zone dropped; None if not one."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0].strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class Rule:
    """A parsed address rule: anyone, or the listed networks (and the words)."""

    anyone: bool = False
    networks: tuple[Network, ...] = ()
    loopback: bool = False
    controller: bool = False

    @classmethod
    def parse(cls, text: str) -> Rule:
        """``*``, or CIDRs, addresses and the words ``loopback``/``controller``,
        comma separated. Raises ValueError naming the bad item."""
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise ValueError("empty address list (use * for anyone)")
        if "*" in items:
            if len(items) > 1:
                raise ValueError("* allows anyone: list nothing beside it")
            return cls(anyone=True)
        networks: list[Network] = []
        words = set()
        for item in items:
            if item.lower() in WORDS:
                words.add(item.lower())
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                raise ValueError(f"{item[:60]!r} is not a CIDR, an address, loopback or controller") from None
        return cls(
            networks=tuple(networks), loopback="loopback" in words, controller="controller" in words
        )

    def describe(self) -> str:
        """Who the rule allows, in words (``loopback, the controller, 10.0.0.0/8``)."""
        if self.anyone:
            return "anywhere"
        parts = (["loopback"] if self.loopback else []) + (["the controller"] if self.controller else [])
        shown = [*parts, *(str(n) for n in self.networks[:8])]
        if len(self.networks) > 8:
            shown.append(f"{len(self.networks) - 8} more networks")
        return ", ".join(shown) or "nowhere"

    def matches(self, ip: Address, controller: Iterable[Address] = ()) -> bool:
        if self.anyone:
            return True
        if self.loopback and any(ip in n for n in LOOPBACK):
            return True
        if any(ip.version == n.version and ip in n for n in self.networks):
            return True
        return self.controller and ip in set(controller)


def controller_host(controller: str | None) -> str | None:
    """The host of the ``--controller`` option (validated elsewhere), or None."""
    if not controller or not controller.strip():
        return None
    text = controller.strip()
    try:
        return urlsplit(text if "://" in text else f"http://{text}").hostname or None
    except ValueError:
        return None


class ControllerAddresses:
    """What the controller's host resolves to, looked up at start and again
    when a caller does not match (at most once per ``min_interval_s``)."""

    log = Logger()

    def __init__(
        self,
        host: str | None,
        resolve: Resolve,
        clock: IReactorTime,
        *,
        min_interval_s: float = 30.0,
        timeout_s: float = 3.0,
    ) -> None:
        self._host = host
        self._resolve = resolve
        self._clock = clock
        self._min_interval_s = min_interval_s
        self._timeout_s = timeout_s
        literal = parse_ip(host) if host else None
        self._fixed = literal is not None or host is None
        self.addresses: frozenset[Address] = frozenset([literal]) if literal is not None else frozenset()
        self._last_lookup = float("-inf")
        self._lookup: Waiters[None] | None = None

    def start(self) -> Deferred[None]:
        """The first lookup (its Deferred fires once it is done, even if it failed)."""
        return self.refresh(force=True)

    def refresh(self, force: bool = False) -> Deferred[None]:
        """Look the host up again unless it was looked up lately; fires when the
        answer (or the time bound) is in."""
        if self._fixed or self._host is None:
            return succeed(None)
        if self._lookup is not None:
            return self._lookup.wait()
        if not force and self._clock.seconds() - self._last_lookup < self._min_interval_s:
            return succeed(None)
        self._last_lookup = self._clock.seconds()
        waiters: Waiters[None] = Waiters()
        self._lookup = waiters
        mine = waiters.wait()
        d = self._resolve(self._host)
        d.addTimeout(self._timeout_s, self._clock)

        def found(names: Sequence[str]) -> None:
            found = frozenset(ip for ip in (parse_ip(n) for n in names) if ip is not None)
            if found != self.addresses:
                self.log.info(
                    "controller {host} is at {addresses}", host=self._host, addresses=sorted(map(str, found))
                )
            self.addresses = found or self.addresses

        def failed(failure: object) -> None:
            self.log.warn(
                "looking up controller {host} failed; keeping {addresses}",
                host=self._host,
                addresses=sorted(map(str, self.addresses)),
            )

        def done(_: object) -> None:
            self._lookup = None
            waiters.fire(None)

        d.addCallbacks(found, failed).addBoth(done)
        return mine
