"""LogFollower: a running container's output into its JobLog, through
``docker logs --follow --timestamps``, with no line lost and none stored twice.

The tail is a child process (docker_cli.py: spawned by the injected
``spawnProcess``-compatible callable, with an absolute docker path and an explicit
environment); the container's stdout arrives on its stdout and the container's
stderr on its stderr (containers have no TTY). Each stream has its own
StreamParser (lines.py) and StreamCursor (resume.py).

No gap, no duplicate: per stream, the cursor remembers the timestamp of the last
line stored and how many stored lines carry it. When the tail ends:

* exit 0 means the container's output ended: the unfinished last line (output
  without a final newline) is a line, and ``is_running()`` is asked. If the
  container still runs, the tail is restarted (below). If not, the follower
  checks that the container's last log entries end each stream as its stored
  lines do (last_entries.py); otherwise (or when unsure) one more tail, without
  ``--follow``, reads the rest. Then the JobLog is flushed (fdatasync) and
  ``follow()``'s Deferred fires. Only then may the container be removed.
* otherwise (killed, daemon error) the unfinished line is dropped, and the tail is
  restarted with ``--since`` = the oldest of the streams' last timestamps minus
  ``resume_margin_s`` (1 s: a stream with no line yet may have one stamped a little
  before the other stream's last line); each cursor skips what its stream
  already stored. This relies on each stream's timestamps never decreasing
  (a backwards step of the host clock during a restart could duplicate a few lines).

A follower started on a JobLog that already has container lines (a worker restart)
resumes from what the store holds (resume.py, ``resume_streams``).

Restarts back off and wait for an engine that is away (restarts.py); after
``max_failures`` in a row ``follow()`` fails with LogTailError, naming the CLI's
last message. ``stop()`` (worker shutdown) kills the tail; ``follow()`` then
fails with FollowStopped once the lines received so far are flushed.

``command_prefix`` runs the CLI under a wrapper, e.g. ``setpriv --pdeathsig KILL
--`` so that no tail outlives a worker that dies without stopping it.

Back-pressure and batching (read_pacing.py): the tail's pipes are not read while
more than ``max_pending_bytes`` wait for the disk, while the followers' shared
budget of reactor time is spent, and for ``read_delay_s`` (5 ms) after a read
that drained a pipe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.common.waiters import Waiters
from fluster_worker.logs.docker_cli import DockerLogsCli, TailProtocol, default_env
from fluster_worker.logs.ingest import IngestBudget
from fluster_worker.logs.joblog import JobLog
from fluster_worker.logs.last_entries import LastEntries, newer_entry
from fluster_worker.logs.model import DEFAULT_MAX_LINE_BYTES
from fluster_worker.logs.read_pacing import pace_reads
from fluster_worker.logs.restarts import TailRestarts
from fluster_worker.logs.resume import StreamCursor, resume_streams, tail_since
from fluster_worker.logs.stall import StallWatch

_FDS = {1: "stdout", 2: "stderr"}


class LogTailError(Exception):
    """``docker logs`` kept failing; the container's remaining output is unknown."""


class FollowStopped(Exception):
    """``stop()`` was called before the container's output ended."""


class LogFollower:
    """Follows one container's output into ``job_log`` (see the module doc)."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        spawn_process: Callable[..., Any],
        docker_path: str,
        job_log: JobLog,
        container_id: str,
        is_running: Callable[[], Deferred[bool]],
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        env: Mapping[str, str] | None = None,
        resume: bool = True,
        resume_margin_s: float = 1.0,
        max_failures: int = 8,
        max_pending_bytes: int = 8 * 2**20,
        read_delay_s: float = 0.005,
        last_entries: Callable[[int], Deferred[dict[int, bytes]]] | None = None,
        engine_ready: Callable[[], Deferred[None]] | None = None,
        command_prefix: Sequence[str] = (),
        stall_s: float | None = None,
        budget: IngestBudget | None = None,
    ) -> None:
        """``last_entries(n)``: see last_entries.py. ``budget`` is the reactor
        time parsing may take, shared with the other followers (ingest.py); by
        default the one of ``job_log``'s store."""
        self._reactor = reactor
        self._cli = DockerLogsCli(
            spawn_process, docker_path, container_id, dict(env) if env is not None else default_env(), command_prefix
        )
        self._job_log = job_log
        self._container_id = container_id
        self._is_running = is_running
        self._max_line_bytes = max_line_bytes
        self._resume = resume
        self._margin_ns = int(resume_margin_s * 1e9)
        self._max_pending = max_pending_bytes
        self._budget = budget if budget is not None else job_log.ingest
        self._read_delay = read_delay_s
        self._last_entries = LastEntries(self._cli, last_entries, container_id)
        self._restarts = TailRestarts(reactor, max_failures, engine_ready, self._restart, container_id)
        self._resume_since: int | None = None  # the fixed --since while streams count (resume.py)
        self._streams = {fd: StreamCursor(source, max_line_bytes) for fd, source in _FDS.items()}
        # IDLE -> STARTING -> TAILING <-> (CHECKING | WAITING) -> DONE
        self._state = "idle"
        self._protocol: TailProtocol | None = None
        self._stopping = False
        self._progress = False
        self._draining = False  # the container has exited: tails no longer --follow
        self._attempts = 0
        self._last_message = ""
        self._followers: Waiters[None] = Waiters()
        self._result: Failure | None = None
        # Only where the engine's log rotates (a capped json-file log): see stall.py.
        self._stall = StallWatch(reactor, stall_s, self._behind, self._stalled) if stall_s else None

    # -- public ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The pid of the running ``docker logs`` process, if any."""
        if self._protocol is None or self._protocol.transport is None:
            return None
        return getattr(self._protocol.transport, "pid", None)

    @property
    def attempts(self) -> int:
        """How many ``docker logs`` processes were started so far."""
        return self._attempts

    def follow(self) -> Deferred[None]:
        """Fires once the container has exited and all its lines are stored and
        synced; fails with LogTailError or FollowStopped."""
        if self._state == "done":
            return succeed(None) if self._result is None else fail(self._result)
        d = self._followers.wait()
        if self._state == "idle":
            self._state = "starting"
            Deferred.fromCoroutine(self._start()).addErrback(self._crashed)
        return d

    def stop(self) -> None:
        """Kill the tail (worker shutdown); ``follow()`` then fails with FollowStopped."""
        if self._stopping or self._state in ("done", "idle"):
            if self._state == "idle":
                self._state = "done"
                self._result = Failure(FollowStopped(f"following {self._short} was stopped"))
            return
        self._stopping = True
        if self._state == "tailing" and self._protocol is not None:
            self._protocol.kill()
        elif self._state == "waiting":
            self._restarts.cancel()
            self._finish_stopped()
        # starting / checking: noticed when that step completes

    # -- the tail process ---------------------------------------------------------------

    @property
    def _short(self) -> str:
        return f"container {self._container_id[:12]}"

    async def _start(self) -> None:
        if self._resume:
            self._resume_since = await resume_streams(self._job_log, list(self._streams.values()), self._margin_ns)
        if self._stopping:
            self._finish_stopped()
            return
        self._spawn_tail()

    def _spawn_tail(self) -> None:
        since = tail_since(list(self._streams.values()), self._resume_since, self._margin_ns)
        for stream in self._streams.values():
            stream.restart(self._max_line_bytes)
        args = self._cli.tail_args(not self._draining, since)
        self._protocol = TailProtocol(self._received, self._ended)
        self._progress = False
        self._attempts += 1
        self._state = "tailing"
        self.log.debug("tailing {cid}: {args}", cid=self._container_id, args=args[1:])
        try:
            self._cli.spawn(self._protocol, args)
            if self._stall is not None and not self._draining:
                self._stall.start()
        except Exception as e:
            self._protocol = None
            self._last_message = f"cannot run {self._cli.docker_path}: {e}"
            self.log.failure("spawning docker logs for {cid} failed", cid=self._container_id)
            self._after_attempt(clean=False)

    def _received(self, protocol: TailProtocol, fd: int, data: bytes) -> None:
        stream = self._streams.get(fd)
        if protocol is not self._protocol or stream is None:
            return
        if self._stall is not None:
            self._stall.saw_data()
        budget = self._budget
        started = budget.clock()
        try:
            stamps, lines = stream.parser.feed(data)
            self._store(stream, stamps, lines)
            self._diagnostics(stream)
        except Exception:
            self.log.failure("parsing the logs of {cid} failed", cid=self._container_id)
        budget.spend(budget.clock() - started)
        pace_reads(self._reactor, protocol, data, budget, self._job_log, self._max_pending, self._read_delay)

    def _store(self, stream: StreamCursor, stamps: list[int], lines: list[bytes]) -> None:
        # After a restart, what this stream already stored is dropped (resume.py).
        stamps, lines = stream.accept(stamps, lines)
        if lines:
            self._progress = True
            self._job_log.append_batch(stream.source, stamps, lines)

    def _diagnostics(self, stream: StreamCursor) -> None:
        for message in stream.parser.take_diagnostics():
            self._last_message = message
            self.log.warn("docker logs {cid}: {message}", cid=self._container_id, message=message)

    def _ended(self, protocol: TailProtocol, reason: Failure) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        if self._stall is not None:
            self._stall.stop()
        clean = reason.check(ProcessDone) is not None and not self._stopping
        for stream in self._streams.values():
            if clean:
                stamps, lines = stream.parser.finish()
                self._store(stream, stamps, lines)
            else:
                stream.parser.discard()
            self._diagnostics(stream)
        if not clean:
            self.log.info(
                "docker logs for {cid} ended: {reason}",
                cid=self._container_id,
                reason=reason.getErrorMessage(),
            )
        self._after_attempt(clean)

    def _after_attempt(self, clean: bool) -> None:
        if self._stopping:
            self._finish_stopped()
            return
        if self._progress:
            self._restarts.succeeded()
        if clean and self._draining:
            Deferred.fromCoroutine(self._finish(None)).addErrback(self._crashed)
        elif clean:
            self._state = "checking"
            Deferred.fromCoroutine(self._check()).addErrback(self._crashed)
        else:
            self._retry()

    async def _check(self) -> None:
        try:
            running = await self._is_running()
        except Exception:
            self.log.failure("asking whether {cid} runs failed", cid=self._container_id)
            running = True  # unknown: follow on
        if self._stopping:
            self._finish_stopped()
        elif running:
            self._retry()
        elif await self._last_entries.stored(self._streams, self._max_line_bytes):
            await self._finish(None)
        else:
            # docker logs -f sometimes ends (exit 0) before it has sent everything
            # when the container exits; read what is left, without --follow.
            self.log.info("docker logs -f for {cid} ended early: reading the rest", cid=self._container_id)
            self._draining = True
            self._progress = True  # not a failure
            self._retry()

    def _behind(self) -> Deferred[bool]:
        """Whether the engine holds an entry newer than the stored ones (the
        tail has delivered nothing for a while: StallWatch asks)."""

        async def check() -> bool:
            protocol = self._protocol
            if protocol is None or protocol.pauses:
                return False  # not reading on purpose (back-pressure)
            output = await self._last_entries.read(1)
            if output is None or protocol is not self._protocol:
                return False
            return newer_entry(output, self._streams, self._max_line_bytes)

        return Deferred.fromCoroutine(check())

    def _stalled(self) -> None:
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            return
        self.log.info("docker logs for {cid} went quiet while its log moved on: restarting it", cid=self._container_id)
        protocol.kill()  # its end restarts the tail with --since

    def _retry(self) -> None:
        if self._restarts.schedule(self._progress):
            self._state = "waiting"
            return
        message = f"docker logs for {self._short} failed {self._restarts.failures} times"
        if self._last_message:
            message += f": {self._last_message}"
        Deferred.fromCoroutine(self._finish(Failure(LogTailError(message)))).addErrback(self._crashed)

    def _restart(self) -> None:
        if self._stopping:
            self._finish_stopped()
        else:
            self._spawn_tail()

    def _finish_stopped(self) -> None:
        if self._state == "done":
            return
        error = Failure(FollowStopped(f"following {self._short} was stopped"))
        Deferred.fromCoroutine(self._finish(error)).addErrback(self._crashed)

    async def _finish(self, result: Failure | None) -> None:
        if self._state == "done":
            return
        self._state = "done"
        if self._stall is not None:
            self._stall.stop()
        try:
            await self._job_log.flush(sync=True)
        except Exception:
            if result is None:
                result = Failure()
        self._result = result
        if result is None:
            self._followers.fire(None)
        else:
            self._followers.fail(result)

    def _crashed(self, failure: Failure) -> None:
        self.log.failure("following {cid} crashed", failure, cid=self._container_id)
        if self._state != "done":
            self._state = "done"
            self._result = failure
            self._followers.fail(failure)
