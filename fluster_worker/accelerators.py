"""The accelerators this worker may hand to jobs, found once at start: the GPUs that
``--gpus`` allows (by default every GPU nvidia-smi finds) and the TPU device nodes
that ``--tpu-devices`` matches, with the TPU variables of the worker's environment.

Also what a request must match to be possible at all: a GPU variant ("auto" or ""
means any) and a TPU type and topology. Discovery blocks (nvidia-smi, globbing
/dev): run ``discover`` on the BlockingPool.
"""

from __future__ import annotations

import glob
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fluster_worker.host import GpuInfo, detect_gpu

__all__ = [
    "DEFAULT_TPU_DEVICE_GLOBS",
    "TPU_ENV_NAMES",
    "Accelerators",
    "GpuInventory",
    "GpuSelection",
    "TpuDevice",
    "TpuInventory",
    "discover",
    "find_tpu_devices",
    "parse_gpus",
    "parse_tpu_devices",
    "resolve_gpus",
    "tpu_environment",
]

DEFAULT_TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/*")

# The worker's own variables that describe its TPU slice to libtpu, JAX and
# PyTorch/XLA; a TPU job gets those that are set (its own env_vars win).
TPU_ENV_NAMES = (
    "TPU_NAME",
    "TPU_WORKER_ID",
    "TPU_WORKER_HOSTNAMES",
    "TPU_ACCELERATOR_TYPE",
    "TPU_TOPOLOGY",
    "TPU_TOPOLOGY_WRAP",
    "TPU_TOPOLOGY_ALT",
    "TPU_CHIPS_PER_HOST_BOUNDS",
    "TPU_HOST_BOUNDS",
    "TPU_CHIPS_PER_PROCESS_BOUNDS",
    "TPU_PROCESS_BOUNDS",
    "TPU_VISIBLE_CHIPS",
    "TPU_SKIP_MDS_QUERY",
    "TPU_RUNTIME_METRICS_PORTS",
    "TPU_MESH_CONTROLLER_ADDRESS",
    "TPU_MESH_CONTROLLER_PORT",
    "TPU_HOSTNAME_OVERRIDE",
    "CLOUD_TPU_TASK_ID",
    "LIBTPU_INIT_ARGS",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "MEGASCALE_NUM_SLICES",
    "MEGASCALE_PORT",
    "MEGASCALE_SLICE_ID",
)

# nvidia-smi indexes, or GPU/MIG UUIDs: what Docker's nvidia device requests take.
_GPU_ID = re.compile(r"[0-9]{1,4}|(?:GPU|MIG)-[A-Za-z0-9/-]{1,120}", re.ASCII)
_MAX_GLOBS = 16
_MAX_TPU_DEVICES = 256
_MAX_ENV_VALUE = 4096


def _show(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:60] + "...")


# -- options ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSelection:
    """``--gpus``: ``all`` (what nvidia-smi finds), ``none``, or explicit ids."""

    mode: str = "all"  # "all" | "none" | "ids"
    ids: tuple[str, ...] = ()


def parse_gpus(text: str | None) -> GpuSelection:
    """``all`` | ``none`` | ``0,1,3`` (indexes or GPU-/MIG- UUIDs); ValueError, one line."""
    value = (text or "all").strip()
    if value.lower() == "all":
        return GpuSelection("all")
    if value.lower() == "none":
        return GpuSelection("none")
    ids = tuple(part.strip() for part in value.split(","))
    for gpu in ids:
        if not _GPU_ID.fullmatch(gpu):
            raise ValueError(f"invalid GPU id {_show(gpu)}: use all, none or ids like 0,1,3 (or GPU-<uuid>)")
    if len(set(ids)) != len(ids):
        raise ValueError(f"GPU ids repeat in {_show(value)}")
    return GpuSelection("ids", ids)


def parse_tpu_devices(text: str | None) -> tuple[str, ...]:
    """``GLOB[,GLOB]`` of absolute paths; "" or None gives the known patterns."""
    if text is None or not text.strip():
        return DEFAULT_TPU_DEVICE_GLOBS
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    if len(patterns) > _MAX_GLOBS:
        raise ValueError(f"too many TPU device patterns: {len(patterns)}, at most {_MAX_GLOBS}")
    for pattern in patterns:
        if not pattern.startswith("/") or ":" in pattern or "\x00" in pattern:
            raise ValueError(f"invalid TPU device pattern {_show(pattern)}: an absolute path glob without ':'")
    return patterns


# -- what the worker has ----------------------------------------------------------------


def _token(text: str) -> str:
    return re.sub(r"[^A-Z0-9]+", "", text.upper())


@dataclass(frozen=True)
class GpuInventory:
    """The GPUs the worker may hand out, in the order it hands them out."""

    ids: tuple[str, ...] = ()
    name: str = ""  # nvidia-smi's name of the first one, "" when unknown
    variant: str = "auto"  # the contract's family name ("A100"), "auto" when unknown
    memory_mb: int = 0

    def mismatch(self, wanted: str) -> str | None:
        """Why GPUs of variant ``wanted`` cannot be had here, or None. "" and "auto"
        match anything, and so does anything when the model is unknown."""
        want = _token(wanted)
        if want in ("", "AUTO") or (self.variant == "auto" and not self.name):
            return None
        # The family, or any run of words of the model's name ("RTX 4090", "A100-80GB").
        words = [w for w in re.split(r"[\s_-]+", self.name[:200]) if w][:16]
        names = {_token(self.variant)}
        names.update(_token("".join(words[i:j])) for i in range(len(words)) for j in range(i + 1, len(words) + 1))
        if want in names - {"", "AUTO"}:
            return None
        model = self.variant if self.variant != "auto" else self.name
        return f"this worker's GPUs are {model}, not {wanted[:40]}"


@dataclass(frozen=True)
class TpuDevice:
    path: str  # the host's path, also the path inside the container
    gid: int  # its group: added to the job's groups when not root's


@dataclass(frozen=True)
class TpuInventory:
    """The TPU device nodes of this host (a TPU job gets them all) and the
    variables describing its slice."""

    devices: tuple[TpuDevice, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    patterns: tuple[str, ...] = DEFAULT_TPU_DEVICE_GLOBS

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(d.path for d in self.devices)

    @property
    def accelerator_type(self) -> str:
        return self.env.get("TPU_ACCELERATOR_TYPE", "")

    @property
    def topology(self) -> str:
        return self.env.get("TPU_TOPOLOGY", "")

    def mismatch(self, variant: str, topology: str) -> str | None:
        """Why a TPU of ``variant`` and ``topology`` cannot be had here, or None.
        What the worker does not know (no TPU_ACCELERATOR_TYPE / TPU_TOPOLOGY)
        matches anything, as do "" and "auto"."""
        known = self.accelerator_type
        if _token(variant) not in ("", "AUTO") and known and _token(variant) != _token(known):
            return f"this worker's TPU is {known[:40]}, not {variant[:40]}"
        if topology.strip() and self.topology and topology.strip().lower() != self.topology.lower():
            return f"this worker's TPU topology is {self.topology[:40]}, not {topology[:40]}"
        return None


@dataclass(frozen=True)
class Accelerators:
    gpus: GpuInventory = GpuInventory()
    tpus: TpuInventory = TpuInventory()


# -- discovery (blocking) ---------------------------------------------------------------


def resolve_gpus(selection: GpuSelection, detected: GpuInfo | None) -> GpuInventory:
    """The GPUs ``selection`` allows among those ``detected``. Explicit ids are
    taken as given (the operator may know better than a missing nvidia-smi); the
    model comes from detection when there is one."""
    if selection.mode == "none":
        return GpuInventory()
    if selection.mode == "ids":
        ids = selection.ids
    else:
        ids = detected.device_ids if detected is not None else ()
    if not ids:
        return GpuInventory()
    if detected is None:
        return GpuInventory(ids)
    return GpuInventory(ids, detected.name, detected.variant, detected.memory_mb)


def find_tpu_devices(patterns: tuple[str, ...]) -> tuple[TpuDevice, ...]:
    """Character devices matching ``patterns`` (symlinks followed), sorted, once each."""
    found: dict[str, TpuDevice] = {}
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) and ":" not in path and path not in found:
                found[path] = TpuDevice(path, st.st_gid)
            if len(found) >= _MAX_TPU_DEVICES:
                break
    return tuple(found[p] for p in sorted(found))


def tpu_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The TPU variables set in ``environ`` (bounded, no NUL)."""
    return {
        name: environ[name]
        for name in TPU_ENV_NAMES
        if name in environ and len(environ[name]) <= _MAX_ENV_VALUE and "\x00" not in environ[name]
    }


def discover(
    gpus: str | None,
    tpu_devices: tuple[str, ...],
    *,
    detect: Callable[[], GpuInfo | None] = detect_gpu,
    environ: Mapping[str, str] = os.environ,
) -> Accelerators:
    """Everything above, at once. Blocking: run it on the BlockingPool."""
    selection = parse_gpus(gpus)
    detected = detect() if selection.mode != "none" else None
    tpus = find_tpu_devices(tpu_devices)
    return Accelerators(
        gpus=resolve_gpus(selection, detected),
        tpus=TpuInventory(tpus, tpu_environment(environ) if tpus else {}, tpu_devices),
    )
