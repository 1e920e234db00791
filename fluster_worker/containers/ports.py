"""Host ports for jobs: validation of the (hostile) port names and a round-robin
allocator over a range such as 30000-39999.

A job names its ports (RunJobRequest.ports); each name gets one host port, published
p->p by the container and given to the job as FLUSTER_PORT_<NAME upper-cased>. Names are
therefore restricted to what makes a valid environment variable name, and two names that
upper-case alike are duplicates.

The allocator runs on the reactor thread (it holds no lock). It never hands out a port it
already holds, checks each candidate with ``is_free`` before handing it out, and walks the
range from a moving cursor so that a port released a moment ago is the last to come back.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "DEFAULT_PORT_RANGE",
    "MAX_PORTS_PER_JOB",
    "PortAllocator",
    "PortsExhausted",
    "bind_check",
    "parse_port_range",
    "validate_port_name",
    "validate_port_names",
]

DEFAULT_PORT_RANGE = (30000, 39999)
# A job asking for more than this is hostile or broken; it must not drain the range.
MAX_PORTS_PER_JOB = 64

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}", re.ASCII)
_RANGE_RE = re.compile(r"\s*([0-9]{1,5})\s*-\s*([0-9]{1,5})\s*", re.ASCII)


class PortsExhausted(Exception):
    """Not enough free ports in the range for a job; nothing was held."""


def _show(text: str) -> str:
    """repr() of untrusted text, bounded, on one line."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


def validate_port_name(name: str) -> str:
    """Return ``name`` if it can name a port (a valid FLUSTER_PORT_<NAME> suffix:
    ``[A-Za-z_][A-Za-z0-9_]{0,63}``), else raise ValueError with a one-line message."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        shown = _show(name) if isinstance(name, str) else type(name).__name__
        raise ValueError(
            f"invalid port name {shown}: expected 1-64 letters, digits or _ "
            "not starting with a digit"
        )
    return name


def validate_port_names(names: Sequence[str]) -> list[str]:
    """Validate every name, reject duplicates (case-insensitively, since the env var
    is upper-cased) and more than MAX_PORTS_PER_JOB names. One-line ValueError."""
    if len(names) > MAX_PORTS_PER_JOB:
        raise ValueError(f"too many ports: {len(names)} requested, at most {MAX_PORTS_PER_JOB}")
    seen: dict[str, str] = {}
    for name in names:
        validate_port_name(name)
        key = name.upper()
        if key in seen:
            raise ValueError(
                f"duplicate port name {_show(name)} (same variable FLUSTER_PORT_{key} "
                f"as {_show(seen[key])})"
            )
        seen[key] = name
    return list(names)


def parse_port_range(text: str) -> tuple[int, int]:
    """"30000-39999" -> (30000, 39999); 1 <= low <= high <= 65535, else ValueError."""
    match = _RANGE_RE.fullmatch(text) if len(text) <= 40 else None
    if match is None:
        raise ValueError(f"invalid port range {_show(text)}: expected LOW-HIGH, e.g. 30000-39999")
    low, high = int(match.group(1)), int(match.group(2))
    if not 1 <= low <= high <= 65535:
        raise ValueError(
            f"invalid port range {_show(text)}: need 1 <= LOW <= HIGH <= 65535"
        )
    return low, high


def bind_check(port: int) -> bool:
    """True when a TCP socket can bind ``port`` on 0.0.0.0 and on 127.0.0.1 (each
    bound and closed at once). Docker publishes on 0.0.0.0; a host process listening
    on loopback only would still make the job's own bind collide."""
    for host in ("0.0.0.0", "127.0.0.1"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        finally:
            sock.close()
    return True


class PortAllocator:
    """Hands out host ports from [low, high], round-robin from a moving cursor."""

    def __init__(
        self,
        low: int = DEFAULT_PORT_RANGE[0],
        high: int = DEFAULT_PORT_RANGE[1],
        is_free: Callable[[int], bool] = bind_check,
    ) -> None:
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"invalid port range {low}-{high}: need 1 <= low <= high <= 65535")
        self._low = low
        self._high = high
        self._is_free = is_free
        self._held: set[int] = set()
        self._cursor = low  # the next port to try

    @property
    def range(self) -> tuple[int, int]:
        return self._low, self._high

    @property
    def held(self) -> frozenset[int]:
        """The ports currently handed out and not yet released."""
        return frozenset(self._held)

    def allocate(self, names: Sequence[str]) -> dict[str, int]:
        """One free port per name ({name: port}), or PortsExhausted holding none.

        Names are validated first (validate_port_names: ValueError)."""
        validate_port_names(names)
        if not names:
            return {}
        size = self._high - self._low + 1
        chosen: list[int] = []
        port = self._cursor
        for _ in range(size):
            if port not in self._held and self._is_free(port):
                chosen.append(port)
                if len(chosen) == len(names):
                    break
            port = self._low if port == self._high else port + 1
        if len(chosen) < len(names):
            # The cursor stays put: nothing was handed out.
            raise PortsExhausted(
                f"not enough free ports in {self._low}-{self._high}: "
                f"{len(names)} needed, {len(chosen)} free"
            )
        last = chosen[-1]
        self._cursor = self._low if last == self._high else last + 1
        self._held.update(chosen)
        return dict(zip(names, chosen, strict=True))

    def reserve(self, ports: Iterable[int]) -> None:
        """Hold ports already in use by a job (one a restarted worker re-adopts), so
        they are not handed out again; ports outside the range are held too."""
        self._held.update(ports)

    def release(self, ports: Iterable[int]) -> None:
        """Give ports back; ports not held (already released) are ignored."""
        for port in ports:
            self._held.discard(port)
