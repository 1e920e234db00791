"""Stopping and starting the machine's Docker engine, for the tests marked
``engine_outage`` (they hold the engine alone: ``engine_exclusive``). The engine
is always started again: ``engine_down()`` is a context manager."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENSURE_DOCKER = Path(__file__).resolve().parent.parent / "scripts" / "ensure-docker.sh"


def dockerd_pid() -> int | None:
    out = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def stop_engine(timeout: float = 90.0) -> None:
    """SIGTERM the engine (by its pid) and wait until it is gone."""
    pid = dockerd_pid()
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            raise AssertionError("dockerd did not stop")
        time.sleep(0.05)


def start_engine() -> None:
    subprocess.run([str(ENSURE_DOCKER)], check=True, timeout=180)


@contextmanager
def engine_down() -> Iterator[None]:
    """The engine stopped for the block; started again whatever happens."""
    try:
        stop_engine()
        yield
    finally:
        start_engine()
