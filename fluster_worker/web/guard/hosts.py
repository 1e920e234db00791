"""The Host allowlist: a request names this worker, not some other site.

A web page on ``evil.example`` whose name the attacker re-points at 127.0.0.1
(DNS rebinding) reaches a worker on loopback with ``Host: evil.example``; a
worker answers only the names that are its own. IP literals are safe when they
are the address the connection arrived on (the browser then treats the worker
itself as the origin), so the listening address is covered by the request's own
local address.

Host values are compared without port, case-insensitively, with IPv6 brackets
and a trailing dot removed.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable

from fluster_worker.host import is_local_host
from fluster_worker.web.guard.callers import parse_ip

#: A DNS name (labels of letters, digits, "-" and "_"), an IPv4 literal, or a
#: bracketed IPv6 literal; then an optional port.
_HOST = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]{2,45}(?:%[\w.-]{1,32})?\]|[A-Za-z0-9_.-]{1,253})(?::(?P<port>\d{1,5}))?")
#: Verdicts remembered (then forgotten all at once: a flood of made-up names costs nothing more).
MAX_CACHED = 1024
#: Names every worker answers to besides its own addresses.
ALWAYS = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


@functools.lru_cache(maxsize=1024)
def host_name(header: str) -> str | None:
    """The host of a ``Host`` header, normalized (lower case, no port, no
    brackets, no trailing dot); None when it is not a host[:port]."""
    match = _HOST.fullmatch(header.strip())
    if match is None:
        return None
    host = match.group("host").lower()
    if host.startswith("["):
        host = host[1:-1].split("%", 1)[0]
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return None
    host = host.rstrip(".")
    return host or None


def normalize(name: str) -> str:
    """A configured name or address (``host``, ``host:port``, ``[v6]:port``,
    a bare IPv6 address) in the form ``host_name`` returns."""
    text = name.strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return host_name(text) or text.lower()


class HostAllowlist:
    """Decides whether a ``Host`` header names this worker.

    ``names`` are fixed (``--allowed-hosts``, the advertise-host option, the
    machine's hostname); ``dynamic`` gives names known only later (the
    advertised address once listening). ``"*"`` among the names turns the
    check off.
    """

    def __init__(self, names: Iterable[str], dynamic: Callable[[], Iterable[str]] = lambda: ()) -> None:
        cleaned = {normalize(n) for n in names if n.strip()}
        self.open = "*" in {n.strip() for n in names}
        self._names = frozenset(cleaned | ALWAYS)
        self._dynamic = dynamic
        #: What the fixed names say of a (host, local address): callers come back.
        self._fixed_verdicts: dict[tuple[str, str | None], bool] = {}
        self._dynamic_seen: tuple[tuple[str, ...], frozenset[str]] = ((), frozenset())
        #: The raw (Host header, local address) pairs the fixed names allow.
        self._fixed_allowed: set[tuple[bytes, str | None]] = set()

    def refusal(self, header: bytes | None, local_ip: str | None) -> str | None:
        """None when the request may go on, else the one-line reason."""
        if self.open or header is None:
            # No Host at all is no browser (HTTP/1.0 probes): rebinding needs one.
            return None
        key = (header, local_ip)
        if key in self._fixed_allowed:  # (every call of a client that came before)
            return None
        text = header.decode("latin-1")
        host = host_name(text)
        if host is None:
            return f"malformed Host header {text[:60]!r}"
        if self.allows(host, local_ip):
            if self._fixed_verdicts.get((host, local_ip)):  # allowed by names that do not change
                if len(self._fixed_allowed) >= MAX_CACHED:
                    self._fixed_allowed.clear()
                self._fixed_allowed.add(key)
            return None
        return f"Host {host[:80]!r} is not a name of this worker (see --allowed-hosts)"

    def allows(self, host: str, local_ip: str | None) -> bool:
        key = (host, local_ip)
        fixed = self._fixed_verdicts.get(key)
        if fixed is None:
            fixed = host in self._names or is_local_host(host) or (local_ip is not None and _same_ip(host, local_ip))
            if len(self._fixed_verdicts) >= MAX_CACHED:
                self._fixed_verdicts.clear()
            self._fixed_verdicts[key] = fixed
        return fixed or host in self._dynamic_names()

    def _dynamic_names(self) -> frozenset[str]:
        raw = tuple(self._dynamic())
        if raw != self._dynamic_seen[0]:
            self._dynamic_seen = (raw, frozenset(normalize(n) for n in raw if n))
        return self._dynamic_seen[1]


def _same_ip(host: str, local_ip: str) -> bool:
    ip = parse_ip(host)
    return ip is not None and ip == parse_ip(local_ip)
