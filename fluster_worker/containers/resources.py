"""Parsing of the resource limits a job asks for (ResourceSpec.cpu and .memory).

Memory strings come from peers we do not control. Existing peers write "8g", "512m",
"1024" (a bare number is megabytes) and "2GB"; we also accept "8Gi", "512MiB", "1.5g",
"64k", "64KiB" and "1t", case-insensitively, with optional spaces around the value and
between the number and its unit ("8 GB"). Anything else is rejected with a one-line
ValueError.

Every unit is binary: k, kb, ki and kib all mean 2**10; m/mb/mi/mib 2**20; g/gb/gi/gib
2**30; t/tb/ti/tib 2**40. Peers that write "8g" or "2GB" mean GiB in practice (that is
how Docker, Kubernetes' "Gi" and the existing workers read them), and a limit that is 7%
larger than a decimal reading never hurts a job that was sized for it.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction

__all__ = [
    "MAX_CPU_CORES",
    "MAX_MEMORY_BYTES",
    "MIN_MEMORY_BYTES",
    "parse_cpu",
    "parse_disk",
    "parse_memory",
]

# Docker refuses a memory limit below 6 MiB; say so when parsing rather than at create.
MIN_MEMORY_BYTES = 6 * 2**20
MAX_MEMORY_BYTES = 2**62
# A sanity bound: proto int32 cores; no machine we run on has more.
MAX_CPU_CORES = 4096
_NANO = 10**9

# Hostile input is bounded before any regex or arithmetic runs on it.
_MAX_TEXT = 64
_MEMORY_RE = re.compile(
    r"\s*(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>(?:[kmgt](?:ib?|b)?)?)\s*",
    re.ASCII | re.IGNORECASE,
)
_UNIT_SHIFT = {"": 20, "k": 10, "m": 20, "g": 30, "t": 40}
_EXPECTED = 'expected a number with an optional unit (k, m, g, t; e.g. "512m", "8g", "1.5Gi")'


def _quote(text: str) -> str:
    """The user's text, double-quoted, escaped to one line and bounded."""
    shown = text if len(text) <= 40 else text[:40] + "..."
    return json.dumps(shown)


def parse_memory(text: str) -> int | None:
    """Bytes for a memory limit like "8g", "512m", "1024" (MiB) or "1.5Gi".

    "" (or only spaces) means no limit: None. Raises ValueError (one line) for anything
    else that is not a positive size between MIN_MEMORY_BYTES and MAX_MEMORY_BYTES.
    Fractional bytes are rounded down.
    """
    if not isinstance(text, str):
        raise TypeError(f"memory must be a str, not {type(text).__name__}")
    if not text.strip():
        return None
    if len(text) > _MAX_TEXT:
        raise ValueError(f"invalid memory {_quote(text)}: {_EXPECTED}")
    match = _MEMORY_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid memory {_quote(text)}: {_EXPECTED}")
    unit = match.group("unit").lower()
    shift = _UNIT_SHIFT[unit[:1]]
    # Fraction: exact decimal arithmetic, no float rounding for "1.1g".
    value = Fraction(match.group("number")) * (1 << shift)
    size = int(value)  # floor: value is non-negative
    if size <= 0:
        raise ValueError(f"invalid memory {_quote(text)}: must be greater than zero")
    if size > MAX_MEMORY_BYTES:
        raise ValueError(f"invalid memory {_quote(text)}: larger than the maximum of 4Ei")
    if size < MIN_MEMORY_BYTES:
        raise ValueError(
            f"invalid memory {_quote(text)}: below the minimum of 6m that Docker accepts"
        )
    return size


def parse_disk(text: str) -> int | None:
    """Bytes for a disk size like "10g" or "512Mi" (same units as memory; a bare
    number is megabytes); "" means none given (None). ValueError (one line) for
    anything else, or a size under 1 MiB."""
    if not isinstance(text, str):
        raise TypeError(f"disk must be a str, not {type(text).__name__}")
    if not text.strip():
        return None
    match = _MEMORY_RE.fullmatch(text) if len(text) <= _MAX_TEXT else None
    if match is None:
        raise ValueError(f"invalid disk {_quote(text)}: {_EXPECTED}")
    shift = _UNIT_SHIFT[match.group("unit").lower()[:1]]
    size = int(Fraction(match.group("number")) * (1 << shift))
    if size < 2**20:
        raise ValueError(f"invalid disk {_quote(text)}: below the minimum of 1m")
    if size > MAX_MEMORY_BYTES:
        raise ValueError(f"invalid disk {_quote(text)}: larger than the maximum of 4Ei")
    return size


def parse_cpu(cores: int) -> int | None:
    """Docker NanoCpus for a limit of ``cores`` CPU cores; 0 means no limit (None).

    Raises ValueError (one line) for a negative or absurdly large count.
    """
    if isinstance(cores, bool) or not isinstance(cores, int):
        raise TypeError(f"cpu cores must be an int, not {type(cores).__name__}")
    if cores < 0:
        raise ValueError(f"invalid cpu {cores}: must be 0 (no limit) or a positive core count")
    if cores > MAX_CPU_CORES:
        raise ValueError(f"invalid cpu {cores}: more than {MAX_CPU_CORES} cores")
    if cores == 0:
        return None
    return cores * _NANO
