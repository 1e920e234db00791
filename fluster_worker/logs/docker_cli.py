"""The ``docker logs`` child processes of a LogFollower (tail.py): the protocol
of the tail itself, the one that reads a container's last entries, and the
environment they run in (what the CLI needs from ours, nothing else)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

_ENV_KEYS = (
    "PATH",
    "HOME",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "DOCKER_CONTEXT",
    "DOCKER_CERT_PATH",
    "DOCKER_TLS_VERIFY",
    "XDG_RUNTIME_DIR",
)
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def death_signal_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL --`` when this machine has a setpriv that knows
    the option (util-linux): a child run under it dies with its parent, even
    one killed with SIGKILL. [] when it has none."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    try:
        out = subprocess.run(
            [setpriv, "--help"], capture_output=True, text=True, timeout=10, env={"PATH": _DEFAULT_PATH}
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"] if "--pdeathsig" in out.stdout else []


def default_env() -> dict[str, str]:
    """The environment for the docker CLI: what it needs from ours, nothing else."""
    env = {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}
    env.setdefault("PATH", _DEFAULT_PATH)
    return env


class TailProtocol(ProcessProtocol):
    """One ``docker logs --follow`` process: hands its output and its end to the
    follower; its pipes can be paused for several reasons at once."""

    def __init__(
        self,
        received: Callable[[TailProtocol, int, bytes], None],
        ended: Callable[[TailProtocol, Failure], None],
    ) -> None:
        self._received = received
        self._ended = ended
        self.pauses: set[str] = set()  # why the pipes are not being read

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._received(self, childFD, data)

    def processEnded(self, reason: Failure) -> None:
        self._ended(self, reason)

    def pause(self, reason: str) -> None:
        if not self.pauses:
            transport: Any = self.transport
            transport.pauseProducing()
        self.pauses.add(reason)

    def unpause(self, reason: str) -> None:
        if reason in self.pauses:
            self.pauses.discard(reason)
            if not self.pauses and self.transport is not None:
                transport: Any = self.transport
                transport.resumeProducing()


class LastEntriesProtocol(ProcessProtocol):
    """Collects the output of ``docker logs --tail N`` (at most 4 MiB a stream)."""

    limit = 4 << 20

    def __init__(self) -> None:
        self.output: dict[int, bytes] = {1: b"", 2: b""}
        self.overflow = False
        self.done: Deferred[bool] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD in self.output:
            if len(self.output[childFD]) + len(data) > self.limit:
                self.overflow = True
            else:
                self.output[childFD] += data

    def processEnded(self, reason: Failure) -> None:
        self.done.callback(reason.check(ProcessDone) is not None and not self.overflow)
