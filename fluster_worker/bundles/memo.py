"""The fetcher's memories of sources (a file's or object's last digest, an
URL's HTTP validators): bounded, the least recently remembered goes first."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

__all__ = ["remember"]

_REMEMBERED = 10_000  # sources whose last digest is kept in memory


def remember(memory: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > _REMEMBERED:
        memory.popitem(last=False)
