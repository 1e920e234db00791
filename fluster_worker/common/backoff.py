"""Exponential backoff with jitter: the one retry schedule of the worker (registration,
report delivery, the docker events stream, the log tail)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delay before retry number ``attempt`` (0-based): ``initial_s * factor**attempt``
    capped at ``max_s``, then shortened by up to ``jitter`` of itself, so a delay lies
    in ``[base * (1 - jitter), base]`` and never exceeds ``max_s``. The jitter spreads
    the retries of many workers after a controller restart."""

    initial_s: float = 0.5
    max_s: float = 8.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("backoff needs 0 < initial_s <= max_s")
        if self.factor < 1:
            raise ValueError("backoff factor must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("backoff jitter must be in [0, 1)")

    def base(self, attempt: int) -> float:
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        # Stop multiplying once capped: factor**attempt overflows for huge attempts.
        delay = self.initial_s
        for _ in range(attempt):
            delay *= self.factor
            if delay >= self.max_s:
                return self.max_s
        return min(delay, self.max_s)

    def delay(self, attempt: int, random: Callable[[], float]) -> float:
        """``random`` returns a float in [0, 1) (``random.random`` in production)."""
        r = min(max(random(), 0.0), 1.0)
        return self.base(attempt) * (1.0 - self.jitter * r)
