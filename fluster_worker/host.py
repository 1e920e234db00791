"""Local machine facts: cores, memory, GPUs, the address to advertise (for the
controller link and the pages).

Everything here is local (procfs, sockets, nvidia-smi); nothing asks a cloud metadata
endpoint. The probes block (file reads, a subprocess, maybe a DNS lookup): call
`probe_machine` through the BlockingPool.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
MIB = 1024**2

# A documentation address (TEST-NET-1): connect()ing a UDP socket to it makes the
# kernel pick the interface of the default route; no packet is sent.
_DEFAULT_ROUTE_PROBE = "192.0.2.1"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})

_MEMORY = re.compile(r"(?i)(\d{1,12}(?:\.\d{1,6})?)(?:b|[kmgt]i?b?)?")
_GPU_FAMILIES = (
    "GB200", "B200", "H200", "H100", "GH200", "A100", "A10G", "A10", "A30", "A40",
    "L40S", "L40", "L4", "V100", "T4", "P100", "P4", "K80",
)  # fmt: skip


@dataclass(frozen=True)
class GpuInfo:
    count: int
    name: str  # as nvidia-smi names it ("NVIDIA A100-SXM4-80GB"), "" when unknown
    memory_mb: int  # per device, 0 when unknown
    # nvidia-smi's indexes ("0", "1", ...): what Docker's device requests name.
    ids: tuple[str, ...] = ()

    @property
    def device_ids(self) -> tuple[str, ...]:
        return self.ids or tuple(str(i) for i in range(self.count))

    @property
    def variant(self) -> str:
        """The family name the contract uses ("A100", "H100"), else "auto"."""
        tokens = set(re.split(r"[^A-Z0-9]+", self.name.upper()))
        for family in _GPU_FAMILIES:
            if family in tokens or any(t.startswith(family + "-") for t in tokens):
                return family
        return "auto"


@dataclass(frozen=True)
class MachineFacts:
    hostname: str
    ip_address: str  # detected: the local address toward the controller
    cpu_count: int
    memory_bytes: int
    gpu: GpuInfo | None = None
    advertise_host: str | None = None  # the advertise_host option, when given

    @property
    def address_host(self) -> str:
        """The host part of the advertised address."""
        return self.advertise_host or self.ip_address


def cpu_cores() -> int:
    """Cores this process may run on (affinity), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def memory_total_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemTotal from /proc/meminfo, else physical pages × page size, else 0."""
    try:
        for line in meminfo.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("MemTotal:"):
                fields = line.split()
                scale = 1024 if len(fields) > 2 and fields[2].lower() == "kb" else 1
                return int(fields[1]) * scale
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def format_memory(total_bytes: int) -> str:
    """Whole GiB, floored ("23g"); below 1 GiB whole MiB ("512m")."""
    if total_bytes >= GIB:
        return f"{total_bytes // GIB}g"
    return f"{max(total_bytes // MIB, 0)}m"


def validate_memory_option(text: str) -> str:
    value = text.strip()
    match = _MEMORY.fullmatch(value)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"memory {text!r} is not a size like 8g, 512m or 16Gi")
    return value


def detect_gpu(
    *,
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
    dev_dir: Path = Path("/dev"),
) -> GpuInfo | None:
    """NVIDIA GPUs, from ``nvidia-smi`` when it works, else from /dev/nvidia<N> device
    nodes; None when the machine has none."""
    smi = which("nvidia-smi")
    if smi is not None:
        try:
            done = run(
                [smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=15,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            done = None
        if done is not None and done.returncode == 0:
            rows = [[f.strip() for f in line.split(",")] for line in done.stdout.splitlines() if line.strip()]
            rows = [row for row in rows if len(row) >= 2 and re.fullmatch(r"\d{1,4}", row[0])]
            if rows:
                name = rows[0][1][:200]
                try:
                    memory_mb = int(float(rows[0][2])) if len(rows[0]) > 2 else 0
                except ValueError:
                    memory_mb = 0
                return GpuInfo(
                    count=len(rows), name=name, memory_mb=memory_mb, ids=tuple(row[0] for row in rows)
                )
    try:
        nodes = [p for p in dev_dir.iterdir() if re.fullmatch(r"nvidia\d+", p.name)]
    except OSError:
        nodes = []
    if nodes:
        return GpuInfo(count=len(nodes), name="", memory_mb=0)
    return None


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _usable_ip(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return not addr.is_unspecified


def local_ip_toward(host: str, port: int) -> str:
    """The local address the kernel would use to reach ``host`` (a UDP connect():
    route lookup only, nothing is sent). May resolve ``host``: blocking."""
    last: OSError | None = None
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.connect(sockaddr)
                ip = str(s.getsockname()[0]).split("%", 1)[0]
            except OSError as e:
                last = e
                continue
        if _usable_ip(ip):
            return ip
    raise last or OSError(f"no local address reaches {host}")


def advertise_host(
    configured: str | None,
    controller_host: str | None,
    controller_port: int = 80,
    *,
    probe: Callable[[str, int], str] = local_ip_toward,
) -> str:
    """The host part of the worker's advertised address.

    The ``advertise_host`` option wins (0.0.0.0 / :: are refused: the controller
    cannot reach them). Otherwise 127.0.0.1 for a loopback controller, else the
    local address of the route to the controller, else of the default route, else
    the address the hostname resolves to, else 127.0.0.1. Never unspecified."""
    if configured is not None and configured.strip():
        host = configured.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if _is_unspecified(host):
            raise ValueError(f"advertise host {configured!r} is not reachable by the controller")
        return host
    if controller_host is not None and is_local_host(controller_host):
        return "127.0.0.1"
    targets = [(controller_host, controller_port)] if controller_host else []
    targets.append((_DEFAULT_ROUTE_PROBE, 9))
    for host, port in targets:
        try:
            return probe(host, port)
        except OSError:
            continue
    try:
        ip = socket.gethostbyname(socket.gethostname())
        if _usable_ip(ip) and not ipaddress.ip_address(ip).is_loopback:
            return ip
    except OSError:
        pass
    return "127.0.0.1"


def advertise_address(host: str, port: int) -> str:
    """``host:port`` (IPv6 hosts bracketed) for RegisterWorkerRequest.address.
    Refuses port 0 and unspecified hosts: the controller could not call them."""
    if not 0 < port < 65536:
        raise ValueError(f"cannot advertise port {port}: the worker is not listening yet")
    bare = host.strip().strip("[]")
    if not bare:
        raise ValueError("cannot advertise an empty host")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return f"{bare}:{port}"
    if ip.is_unspecified:
        raise ValueError(f"cannot advertise {bare}: the controller cannot reach it")
    return f"[{bare}]:{port}" if ip.version == 6 else f"{bare}:{port}"


def probe_machine(
    controller_host: str | None,
    controller_port: int = 80,
    configured_host: str | None = None,
) -> MachineFacts:
    """All local facts at once. Blocking: run it on the BlockingPool."""
    configured = (
        advertise_host(configured_host, None) if configured_host and configured_host.strip() else None
    )
    return MachineFacts(
        hostname=socket.gethostname(),
        ip_address=advertise_host(None, controller_host, controller_port),
        cpu_count=cpu_cores(),
        memory_bytes=memory_total_bytes(),
        gpu=detect_gpu(),
        advertise_host=configured,
    )

def is_local_host(host: str) -> bool:
    """True when ``host`` (exactly, no substring matching) names this machine as
    seen from itself only: loopback names and addresses (127.0.0.0/8, ::1, and
    their IPv4-mapped forms) and the unspecified addresses 0.0.0.0 / ::, which a
    connect() also sends to the local host."""
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name in _LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified
