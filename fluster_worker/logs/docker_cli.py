"""The ``docker logs`` child processes of a LogFollower (tail.py): how they are
run for one container (``DockerLogsCli``: the command line, an optional wrapper,
the environment: what the CLI needs from ours, nothing else), the protocol of
the tail itself, and the one that reads a container's last entries."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.logs.lines import format_since

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
_CHILD_FDS = {0: "w", 1: "r", 2: "r"}

log = Logger()


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

    def kill(self) -> None:
        """SIGKILL the process; one already gone is fine (its processEnded is on its way)."""
        transport: Any = self.transport
        if transport is None:
            return
        try:
            transport.signalProcess("KILL")
        except Exception:
            pass


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


class DockerLogsCli:
    """``docker logs`` for one container: spawned by the injected
    ``spawnProcess``-compatible callable with an absolute docker path, an
    explicit environment and, when given, under ``command_prefix`` (e.g.
    ``setpriv --pdeathsig KILL --``, so that no tail outlives its worker)."""

    def __init__(
        self,
        spawn_process: Callable[..., Any],
        docker_path: str,
        container_id: str,
        env: dict[str, str],
        command_prefix: Sequence[str] = (),
    ) -> None:
        if not os.path.isabs(docker_path):
            raise ValueError(f"docker_path must be absolute, not {docker_path!r}")
        if not container_id or container_id.startswith("-") or not container_id.isprintable():
            raise ValueError(f"invalid container id {container_id[:80]!r}")
        self.docker_path = docker_path
        self._spawn = spawn_process
        self._container_id = container_id
        self._env = env
        self._prefix = list(command_prefix)

    def tail_args(self, follow: bool, since: int | None) -> list[str]:
        """The tail's command line: ``--follow`` unless the container has
        exited, from ``since`` (ns) when given."""
        args = [self.docker_path, "logs", "--timestamps"]
        if follow:
            args.insert(2, "--follow")
        if since is not None:
            args += ["--since", format_since(since)]
        return [*args, "--", self._container_id]

    def spawn(self, protocol: Any, args: list[str]) -> None:
        """Run ``args`` (a docker command line) with ``protocol``."""
        if self._prefix:
            self._spawn(protocol, self._prefix[0], [*self._prefix, *args], env=self._env, childFDs=_CHILD_FDS)
        else:
            self._spawn(protocol, self.docker_path, args, env=self._env, childFDs=_CHILD_FDS)

    async def last_entries(self, count: int) -> dict[int, bytes] | None:
        """The container's last ``count`` timestamped entries per stream
        (``docker logs --tail``), or None when unknown."""
        check = LastEntriesProtocol()
        args = [self.docker_path, "logs", "--tail", str(count), "--timestamps", "--", self._container_id]
        try:
            self.spawn(check, args)
        except Exception:
            log.failure("spawning docker logs --tail for {cid} failed", cid=self._container_id)
            return None
        return check.output if await check.done else None
