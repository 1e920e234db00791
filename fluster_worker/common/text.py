"""One short line of text: what every error message a caller or a log reader sees
is made of."""

from __future__ import annotations


def one_line(text: object, limit: int = 300) -> str:
    """``text`` with all whitespace runs (newlines included) collapsed to one space,
    cut to ``limit`` characters with "..." when longer."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: max(0, limit - 3)] + "..."
