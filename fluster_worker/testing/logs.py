"""Fakes for the log package: a ``spawnProcess`` that hands out scriptable
``docker logs`` processes, a BlockingPool that runs work inline, and helpers that
write Docker's ``--timestamps`` format."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, execute, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

T = TypeVar("T")


def format_timestamp(timestamp_ns: int) -> str:
    """Docker's RFC3339NanoFixed in UTC: ``2026-11-28T11:37:13.304690917Z``."""
    seconds, nanos = divmod(timestamp_ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def docker_line(timestamp_ns: int, data: bytes | str, newline: bool = True) -> bytes:
    """One line as ``docker logs --timestamps`` prints it."""
    raw = data.encode() if isinstance(data, str) else data
    return format_timestamp(timestamp_ns).encode() + b" " + raw + (b"\n" if newline else b"")


def docker_output(lines: Sequence[tuple[int, bytes | str]], piece: int = 16384) -> bytes:
    """Several lines, each cut into Docker's partial messages of ``piece`` bytes
    (every piece with the line's prefix, only the last with a newline)."""
    out = []
    for stamp, data in lines:
        raw = data.encode() if isinstance(data, str) else data
        prefix = format_timestamp(stamp).encode() + b" "
        pieces = [raw[i : i + piece] for i in range(0, len(raw), piece)] or [b""]
        if len(raw) and len(raw) % piece == 0:
            pieces.append(b"")  # Docker sends the newline as an empty last piece
        out.append(b"".join(prefix + p for p in pieces) + b"\n")
    return b"".join(out)


class InlinePool:
    """A BlockingPool stand-in that runs each call at once on the calling thread."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        self.calls += 1
        return execute(f, *args, **kwargs)


class FakeProcess:
    """The transport of one spawned process; the test plays the process."""

    def __init__(
        self,
        protocol: ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None,
        child_fds: Mapping[int, Any] | None,
        pid: int,
    ) -> None:
        self.protocol = protocol
        self.executable = executable
        self.args = list(args)
        self.env = dict(env) if env is not None else None
        self.child_fds = dict(child_fds) if child_fds is not None else None
        self.pid: int | None = pid
        self.signals: list[str] = []
        self.stdin_closed = False
        self.paused = False
        self.ended = False

    # IProcessTransport, as much as the tail uses
    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, signal: str | int) -> None:
        if self.ended:
            from twisted.internet.error import ProcessExitedAlready

            raise ProcessExitedAlready()
        self.signals.append(str(signal))

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def loseConnection(self) -> None:
        pass

    # what the test makes the process do
    def out(self, data: bytes) -> None:
        self.protocol.childDataReceived(1, data)

    def err(self, data: bytes) -> None:
        self.protocol.childDataReceived(2, data)

    def exit(self, code: int = 0) -> None:
        """The process ends with ``code`` (0: ``docker logs`` saw the output end)."""
        reason = ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code)
        self._end(reason)

    def die(self, signal: int = 9) -> None:
        """The process is killed by ``signal``."""
        self._end(ProcessTerminated(signal=signal))

    def _end(self, reason: Exception) -> None:
        assert not self.ended, "the process already ended"
        self.ended = True
        self.pid = None
        self.protocol.childConnectionLost(1)
        self.protocol.childConnectionLost(2)
        self.protocol.processEnded(Failure(reason))


class FakeSpawner:
    """A ``reactor.spawnProcess`` that records its calls and returns FakeProcess."""

    def __init__(self, on_spawn: Callable[[FakeProcess], None] | None = None) -> None:
        self.processes: list[FakeProcess] = []
        self.fail_with: Exception | None = None
        self.on_spawn = on_spawn  # plays each new process (e.g. answers at once)

    def __call__(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, Any] | None = None,
    ) -> FakeProcess:
        if self.fail_with is not None:
            raise self.fail_with
        process = FakeProcess(processProtocol, executable, args, env, childFDs, 1000 + len(self.processes))
        self.processes.append(process)
        processProtocol.makeConnection(process)  # type: ignore[arg-type]
        if self.on_spawn is not None:
            self.on_spawn(process)
        return process

    @property
    def last(self) -> FakeProcess:
        return self.processes[-1]


class FakeContainer:
    """``is_running`` for a LogFollower: answers ``running``, counts the calls."""

    def __init__(self, running: bool = True) -> None:
        self.running = running
        self.calls = 0

    def is_running(self) -> Deferred[bool]:
        self.calls += 1
        return succeed(self.running)
