"""FakeContainer: one container of a FakeContainerRuntime (containers.py), whose
process the test plays: it decides when the process exits and how, what it
prints, how it answers SIGTERM. Exit codes are as Docker reports them with
``init``: 128 + the signal. Hold: a runtime call held back by the test.
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from twisted.internet.defer import Deferred, succeed

from fluster_worker.common.waiters import Waiters
from fluster_worker.containers.runtime import ContainerSpec, ExitStatus, UsageSample

if TYPE_CHECKING:
    from fluster_worker.testing.containers import FakeContainerRuntime

SIGTERM_EXIT = 128 + _signal.SIGTERM  # 143
SIGKILL_EXIT = 128 + _signal.SIGKILL  # 137

ContainerState = Literal["created", "running", "exited", "removed"]


@dataclass
class FakeContainer:
    """One container of a FakeContainerRuntime; the test plays its process."""

    runtime: FakeContainerRuntime
    id: str
    spec: ContainerSpec
    state: ContainerState = "created"
    started: bool = False
    status: ExitStatus | None = None
    signals: list[str] = field(default_factory=list)
    # What the process does on SIGTERM: exit with 143 after ``term_delay_s``
    # ("exit"), or carry on until SIGKILL ("ignore").
    on_sigterm: Literal["exit", "ignore"] = "exit"
    term_delay_s: float = 0.0
    usage: UsageSample | None = None  # what ``sample`` answers while it runs
    output: list[tuple[str, int, str]] = field(default_factory=list)  # (source, timestamp_ns, line)
    stored: int = 0  # lines of ``output`` a FakeLogFollower stored
    _exits: Waiters[ExitStatus] = field(default_factory=Waiters)
    # Called after each printed line and at the exit (the log followers).
    watchers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.spec.labels)

    def exit(self, code: int = 0, *, oom_killed: bool = False, engine_stopped: bool = False) -> None:
        """The process ends (no-op unless running); ``engine_stopped``: the engine
        stopped it (it was going down)."""
        if self.state != "running":
            return
        self.state = "exited"
        now_ms = int(self.runtime.clock.seconds() * 1000)
        self.status = ExitStatus(code, oom_killed, now_ms, engine_stopped)
        self.runtime._waiting.pop(self.id, None)
        self._exits.fire(self.status)
        self._notify()

    def print(self, source: Literal["stdout", "stderr"], line: str) -> None:
        """The process writes one line (a FakeLogFollower stores it)."""
        self.output.append((source, int(self.runtime.clock.seconds() * 1e9), line))
        self._notify()

    def deliver(self, sig: str) -> None:
        """A signal reaches the process (while it runs)."""
        if self.state != "running":
            return
        self.signals.append(sig)
        if sig == "SIGKILL":
            self.exit(SIGKILL_EXIT)
        elif sig == "SIGTERM" and self.on_sigterm == "exit":
            if self.term_delay_s > 0:
                self.runtime.clock.callLater(self.term_delay_s, self.exit, SIGTERM_EXIT)
            else:
                self.exit(SIGTERM_EXIT)

    def _notify(self) -> None:
        for watcher in list(self.watchers):
            watcher()

    def waiter(self) -> Deferred[ExitStatus]:
        if self.status is not None:
            return succeed(self.status)
        return self._exits.wait()


@dataclass
class Hold:
    """The next call of one runtime operation, held back until ``release()``."""

    operation: str
    reached: Deferred[None] = field(default_factory=Deferred)  # the call arrived
    _go: Deferred[None] = field(default_factory=Deferred)

    @property
    def released(self) -> bool:
        return self._go.called

    def release(self) -> None:
        self._go.callback(None)


__all__ = ["SIGKILL_EXIT", "SIGTERM_EXIT", "ContainerState", "FakeContainer", "Hold"]
