"""DiskWatch: free space where the worker writes (its state and cache
directories), as the ``disk`` node condition.

Checked every ``interval_s`` on the BlockingPool (``statvfs``), and at once when
asked (``check_now``: a write just failed). Below ``low_bytes`` free: a warning
(shown on the dashboard, in /metrics and the JSON API); below ``floor_bytes``:
new jobs are refused (``resource_exhausted``) and the node is unhealthy. A
failure that the free space does not show (``problems``, e.g. job records that
cannot be saved) also refuses new jobs, naming it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from fluster_worker.common.threads import BlockingPool
from fluster_worker.node.conditions import EXHAUSTED, WARNING, NodeConditions

__all__ = ["DiskWatch", "FreeSpace", "free_space"]

CONDITION = "disk"


@dataclass(frozen=True)
class FreeSpace:
    path: Path
    free_bytes: int  # available to an unprivileged writer
    total_bytes: int


def free_space(paths: Sequence[Path], statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> list[FreeSpace]:
    """Blocking: the free space of each distinct filesystem under ``paths`` (the
    nearest existing parent of a path that does not exist yet)."""
    seen: set[int] = set()
    found: list[FreeSpace] = []
    for path in paths:
        probe = Path(path)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            device = probe.stat().st_dev
            st = statvfs(str(probe))
        except OSError:
            continue
        if device in seen:
            continue
        seen.add(device)
        found.append(FreeSpace(Path(path), st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize))
    return found


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


class DiskWatch(Service):
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        pool: BlockingPool,
        conditions: NodeConditions,
        paths: Sequence[Path],
        *,
        floor_bytes: int,
        low_bytes: int,
        interval_s: float = 5.0,
        problems: Sequence[Callable[[], str]] = (),
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
    ) -> None:
        self._clock = clock
        self._pool = pool
        self._conditions = conditions
        self._paths = list(paths)
        self.floor_bytes = floor_bytes
        self.low_bytes = max(low_bytes, floor_bytes)
        self._interval = interval_s
        self._problems = list(problems)
        self._statvfs = statvfs
        self._loop: LoopingCall | None = None
        self._checking = False
        #: The last reading, per filesystem.
        self.space: list[FreeSpace] = []

    @property
    def free_bytes(self) -> int | None:
        """The least free space of the watched filesystems (None before a reading)."""
        return min((s.free_bytes for s in self.space), default=None)

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.check_now)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(lambda f: self.log.failure("disk check failed", f))

    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def check_now(self) -> Deferred[None] | None:
        """Read the free space and update the condition (a check already running
        is not doubled)."""
        if self._checking:
            return None
        self._checking = True
        d = self._pool.run(free_space, self._paths, self._statvfs)
        d.addCallback(self._update)
        d.addErrback(lambda f: self.log.failure("reading the free disk space failed", f))

        def done(_: object) -> None:
            self._checking = False

        return d.addBoth(done)

    def _update(self, space: list[FreeSpace]) -> None:
        self.space = space
        problems = [p for p in (problem() for problem in self._problems) if p]
        tightest = min(space, key=lambda s: s.free_bytes, default=None)
        if tightest is not None and tightest.free_bytes < self.floor_bytes:
            self._conditions.set(
                CONDITION,
                EXHAUSTED,
                f"disk nearly full: {_size(tightest.free_bytes)} free under {tightest.path}, "
                f"below the floor of {_size(self.floor_bytes)}: new jobs are refused",
                cause="disk nearly full: below the free-space floor",
            )
        elif problems:
            self._conditions.set(CONDITION, EXHAUSTED, problems[0], cause="job records cannot be saved")
        elif tightest is not None and tightest.free_bytes < self.low_bytes:
            self._conditions.set(
                CONDITION,
                WARNING,
                f"low disk space: {_size(tightest.free_bytes)} free under {tightest.path} "
                f"(new jobs are refused below {_size(self.floor_bytes)})",
                cause="low disk space",
            )
        else:
            self._conditions.clear(CONDITION)
