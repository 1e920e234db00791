"""The controller address option: "host:port" or "http://host:port".

Parsing is strict (the option is operator input, but it also ends up in every
job container's environment), and host checks are exact matches, never
substring matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from fluster_worker.host import is_local_host

MAX_ADDRESS_LENGTH = 2048

# The container runtime maps this name to the host (`--add-host
# host.docker.internal:host-gateway`); a loopback controller is reachable there.
CONTAINER_HOST_ALIAS = "host.docker.internal"


@dataclass(frozen=True)
class ControllerAddress:
    """A parsed controller address. ``host`` has no IPv6 brackets; ``path`` has no
    trailing slash ("" for none); ``scheme_given`` remembers whether the option
    spelled the scheme out."""

    scheme: str
    host: str
    port: int | None
    path: str
    scheme_given: bool

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The base URL that Connect paths are appended to."""
        return f"{self.scheme}://{self.netloc}{self.path}"

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 443 if self.scheme == "https" else 80


def parse_controller_address(address: str) -> ControllerAddress:
    """Parse "host:port", "http://host:port" (or https, with an optional path
    prefix). Raises ValueError with a one-line reason."""
    text = address.strip()
    if not text:
        raise ValueError("controller address is empty")
    if len(text) > MAX_ADDRESS_LENGTH:
        raise ValueError("controller address is too long")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise ValueError(f"controller address {text!r} contains whitespace or control characters")
    scheme_given = "://" in text
    try:
        parts = urlsplit(text if scheme_given else f"http://{text}")
        port = parts.port
    except ValueError as e:
        raise ValueError(f"controller address {text!r} is not host:port or a URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"controller address {text!r}: scheme must be http or https")
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"controller address {text!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"controller address {text!r} must not carry credentials")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"controller address {text!r} must not have a query or fragment")
    if port == 0:
        raise ValueError(f"controller address {text!r} has port 0")
    return ControllerAddress(
        scheme=scheme,
        host=host,
        port=port,
        path=parts.path.rstrip("/"),
        scheme_given=scheme_given,
    )


def normalize_controller_url(address: str) -> str:
    """ "host:port" → "http://host:port"; a URL keeps its scheme and loses a
    trailing slash."""
    return parse_controller_address(address).url



def container_controller_address(controller_address: str) -> str:
    """FLUSTER_CONTROLLER_ADDRESS for job containers: the controller option with a
    local host (see `is_local_host`) replaced by ``host.docker.internal``; scheme
    (present or not), port and path stay as the option gave them. Any other host
    is returned unchanged (whitespace stripped)."""
    parsed = parse_controller_address(controller_address)
    if not is_local_host(parsed.host):
        return controller_address.strip()
    netloc = CONTAINER_HOST_ALIAS if parsed.port is None else f"{CONTAINER_HOST_ALIAS}:{parsed.port}"
    if not parsed.scheme_given:
        return netloc + parsed.path
    return f"{parsed.scheme}://{netloc}{parsed.path}"


def container_controller_url(controller: str | None) -> str:
    """Always a URL (``http://host:port``), whatever form the option took, with a
    loopback controller host rewritten to one a container reaches; "" for none."""
    if not controller:
        return ""
    return container_controller_address(normalize_controller_url(controller))
