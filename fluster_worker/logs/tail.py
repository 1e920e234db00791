"""LogFollower: a running container's output into its JobLog, through
``docker logs --follow --timestamps``, with no line lost and none stored twice.

The tail is a child process (spawned by the injected ``spawnProcess``-compatible
callable, with an absolute docker path and an explicit environment); the
container's stdout arrives on its stdout and the container's stderr on its stderr
(containers have no TTY). Each stream has its own StreamParser (lines.py).

No gap, no duplicate: the follower remembers, per stream, the timestamp of the
last line it stored and how many stored lines of that stream carry it. When the
tail ends:

* exit 0 means the container's output ended: the unfinished last line (output
  without a final newline) is a line, and ``is_running()`` is asked. If the
  container still runs, the tail is restarted (below). If not, the follower
  checks that the container's last log entries (``docker logs --tail 16
  --timestamps``) end each stream as its stored lines do: Docker 20.10's ``logs
  -f`` sometimes exits 0 before it has sent everything when a container exits
  while the tail lags behind. Docker sends entries in file order, so the last
  one being stored means all are; otherwise (or when unsure) one more tail,
  without ``--follow``, reads the rest. Then the JobLog is flushed (fdatasync)
  and ``follow()``'s Deferred fires. Only then may the container be removed.
* otherwise (killed, daemon error) the unfinished line is dropped, and the tail is
  restarted with ``--since`` = the oldest of the streams' last timestamps minus
  ``resume_margin_s`` (1 s: a stream with no line yet may have one stamped a little
  before the other stream's last line). Per stream, re-delivered lines older than
  its last stored timestamp are skipped, then as many lines with exactly that
  timestamp as were stored, and everything after is stored. This relies on each
  stream's timestamps never decreasing (Docker stamps them in order; a backwards
  step of the host clock during a restart could duplicate a few lines).

A follower started on a JobLog that already has container lines (a worker restart)
resumes from what the store holds: its tail starts ``resume_margin_s`` before the
oldest stream's last stored line, and per stream the lines stored from that
moment on are counted and skipped (resume.py: their stored timestamps may have
been moved).

Restarts that store nothing and end badly back off (0.1 s doubling to 5 s); after
``max_failures`` of them in a row ``follow()`` fails with LogTailError, naming the
CLI's last message. While the engine is away (``engine_ready`` has not fired)
the follower waits for it instead, and its failures start again from zero: an
engine restart is no reason to give up a container's logs. ``stop()`` (worker
shutdown) kills the tail; ``follow()`` then fails with FollowStopped once the
lines received so far are flushed.

``command_prefix`` runs the CLI under a wrapper, e.g. ``setpriv --pdeathsig KILL
--`` so that no tail outlives a worker that dies without stopping it.

Back-pressure: while more than ``max_pending_bytes`` appended bytes wait for the
disk (the writer is behind), the tail's pipes are not read (so memory stays
bounded and Docker waits); nor while the followers' shared budget of reactor
time is spent (ingest.py), so that a log flood cannot starve the RPC.
Batching: the docker CLI writes each log message with its own write(); after a
read that drained a pipe, reading pauses for ``read_delay_s`` (5 ms) so that the
next reads find full pipes (the reactor wakes up per 8 KiB, not per line).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.common.backoff import Backoff
from fluster_worker.common.waiters import Waiters
from fluster_worker.logs.docker_cli import LastEntriesProtocol, TailProtocol, default_env
from fluster_worker.logs.ingest import IngestBudget
from fluster_worker.logs.joblog import JobLog
from fluster_worker.logs.lines import StreamParser, format_since
from fluster_worker.logs.model import DEFAULT_MAX_LINE_BYTES
from fluster_worker.logs.resume import CHECK_LINES, StreamCursor
from fluster_worker.logs.stall import StallWatch

_FDS = {1: "stdout", 2: "stderr"}
_CHILD_FDS = {0: "w", 1: "r", 2: "r"}
_FULL_READ = 8192  # what Twisted's process reader asks for at a time


# Restarts of a dead `docker logs`: at once, then 0.1 s doubling up to 5 s.
_RESTART = Backoff(initial_s=0.1, max_s=5.0, factor=2.0, jitter=0.0)


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
        """``last_entries(n)``, when given, fetches the container's last ``n``
        timestamped entries per stream ({1: stdout bytes, 2: stderr bytes}, as
        ``docker logs --tail n --timestamps`` prints them) without a process,
        e.g. through the Docker API on a thread pool; else the CLI is spawned.
        ``budget`` is the reactor time parsing may take, shared with the other
        followers (ingest.py); by default the one of ``job_log``'s store."""
        if not os.path.isabs(docker_path):
            raise ValueError(f"docker_path must be absolute, not {docker_path!r}")
        if not container_id or container_id.startswith("-") or not container_id.isprintable():
            raise ValueError(f"invalid container id {container_id[:80]!r}")
        self._reactor = reactor
        self._spawn = spawn_process
        self._docker = docker_path
        self._job_log = job_log
        self._container_id = container_id
        self._is_running = is_running
        self._max_line_bytes = max_line_bytes
        self._env = dict(env) if env is not None else default_env()
        self._resume = resume
        self._margin_ns = int(resume_margin_s * 1e9)
        self._max_failures = max_failures
        self._max_pending = max_pending_bytes
        self._budget = budget if budget is not None else job_log.ingest
        self._read_delay = read_delay_s
        self._last_entries = last_entries
        self._engine_ready = engine_ready
        self._engine_wait: Deferred[None] | None = None
        self._prefix = list(command_prefix)
        self._resume_since: int | None = None  # the fixed --since while streams count (resume.py)
        self._streams = {fd: StreamCursor(source, max_line_bytes) for fd, source in _FDS.items()}
        # IDLE -> STARTING -> TAILING <-> (CHECKING | WAITING) -> DONE
        self._state = "idle"
        self._protocol: TailProtocol | None = None
        self._timer: IDelayedCall | None = None
        self._stopping = False
        self._failures = 0
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
        if self._state == "tailing" and self._protocol is not None and self._protocol.transport is not None:
            transport: Any = self._protocol.transport
            try:
                transport.signalProcess("KILL")
            except Exception:  # already gone: processEnded is on its way
                pass
        elif self._state == "waiting":
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            if self._engine_wait is not None:
                wait, self._engine_wait = self._engine_wait, None
                wait.cancel()
            self._finish_stopped()
        # starting / checking: noticed when that step completes

    # -- the tail process ---------------------------------------------------------------

    @property
    def _short(self) -> str:
        return f"container {self._container_id[:12]}"

    async def _start(self) -> None:
        if self._resume:
            stored = []
            for stream in self._streams.values():
                point = await self._job_log.resume_point(stream.source)
                if point is not None:
                    stored.append(point[0])
            if stored:
                since = max(min(stored) - self._margin_ns, 0)
                self._resume_since = since
                for stream in self._streams.values():
                    stream.resume(await self._job_log.lines_since(stream.source, since))
        if self._stopping:
            self._finish_stopped()
            return
        self._spawn_tail()

    def _spawn_tail(self) -> None:
        known = [s.last_ts for s in self._streams.values() if s.last_ts is not None]
        args = [self._docker, "logs", "--timestamps"]
        if not self._draining:
            args.insert(2, "--follow")
        if self._resume_since is not None and any(s.counting for s in self._streams.values()):
            args += ["--since", format_since(self._resume_since)]
        elif known:
            since = max(min(known) - self._margin_ns, 0)
            args += ["--since", format_since(since)]
        for stream in self._streams.values():
            stream.restart(self._max_line_bytes)
        args += ["--", self._container_id]
        self._protocol = TailProtocol(self._received, self._ended)
        self._progress = False
        self._attempts += 1
        self._state = "tailing"
        self.log.debug("tailing {cid}: {args}", cid=self._container_id, args=args[1:])
        try:
            self._spawn_cli(self._protocol, args)
            if self._stall is not None and not self._draining:
                self._stall.start()
        except Exception as e:
            self._protocol = None
            self._last_message = f"cannot run {self._docker}: {e}"
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
        if "budget" not in protocol.pauses and budget.exhausted:
            # The followers have parsed their share of the reactor's time: the
            # output waits in the pipe (and the engine's log) meanwhile.
            protocol.pause("budget")
            budget.wait().addCallback(lambda _: protocol.unpause("budget"))
        if "disk" not in protocol.pauses and self._job_log.pending_bytes > self._max_pending:
            protocol.pause("disk")
            self._job_log.flush(sync=False).addBoth(lambda _: protocol.unpause("disk"))
        if len(data) < _FULL_READ and self._read_delay > 0 and "batch" not in protocol.pauses:
            # The pipe is drained: let it fill for a moment rather than waking up
            # for every few lines docker writes (see the module doc).
            protocol.pause("batch")
            self._reactor.callLater(self._read_delay, protocol.unpause, "batch")

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
            self._failures = 0
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
        elif await self._complete():
            await self._finish(None)
        else:
            # docker logs -f sometimes ends (exit 0) before it has sent everything
            # when the container exits; read what is left, without --follow.
            self.log.info("docker logs -f for {cid} ended early: reading the rest", cid=self._container_id)
            self._draining = True
            self._progress = True  # not a failure
            self._retry()

    async def _complete(self) -> bool:
        """Whether the container's last log entries are stored. Docker sends
        entries in file order, so if the last one is stored, all are. The last
        ``CHECK_LINES`` entries (``docker logs --tail``) must end each stream the
        way the stored lines do (same timestamps and data, and no more lines with
        the last timestamp than stored). Anything unclear answers False: one more
        tail then reads the rest."""
        output = await self._fetch_last_entries()
        if output is None:
            return False
        for fd, raw in output.items():
            parser = StreamParser(self._max_line_bytes)
            stamps, lines = parser.feed(raw)
            more_stamps, more_lines = parser.finish()
            window = list(zip(stamps + more_stamps, lines + more_lines, strict=True))
            if not window:
                continue
            stream = self._streams.get(fd)
            if stream is None or not stream.ends_like(window):
                return False
        return True

    def _behind(self) -> Deferred[bool]:
        """Whether the engine holds an entry newer than the stored ones (the
        tail has delivered nothing for a while: StallWatch asks)."""

        async def check() -> bool:
            protocol = self._protocol
            if protocol is None or protocol.pauses:
                return False  # not reading on purpose (back-pressure)
            output = await self._fetch_last_entries(1)
            if output is None or protocol is not self._protocol:
                return False
            for fd, raw in output.items():
                parser = StreamParser(self._max_line_bytes)
                stamps = parser.feed(raw)[0] + parser.finish()[0]
                stream = self._streams.get(fd)
                if stream is not None and stamps and (stream.last_ts is None or stamps[-1] > stream.last_ts):
                    return True
            return False

        return Deferred.fromCoroutine(check())

    def _stalled(self) -> None:
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            return
        self.log.info("docker logs for {cid} went quiet while its log moved on: restarting it", cid=self._container_id)
        transport: Any = protocol.transport
        try:
            transport.signalProcess("KILL")  # its end restarts the tail with --since
        except Exception:
            pass

    async def _fetch_last_entries(self, count: int = CHECK_LINES) -> dict[int, bytes] | None:
        """The last ``count`` entries per stream, or None when unknown."""
        if self._last_entries is not None:
            try:
                return await self._last_entries(count)
            except Exception:
                self.log.failure("reading the last log entries of {cid} failed", cid=self._container_id)
                return None
        check = LastEntriesProtocol()
        args = [self._docker, "logs", "--tail", str(count), "--timestamps", "--", self._container_id]
        try:
            self._spawn_cli(check, args)
        except Exception:
            self.log.failure("spawning docker logs --tail for {cid} failed", cid=self._container_id)
            return None
        return check.output if await check.done else None

    def _spawn_cli(self, protocol: Any, args: list[str]) -> None:
        if self._prefix:
            self._spawn(protocol, self._prefix[0], [*self._prefix, *args], env=self._env, childFDs=_CHILD_FDS)
        else:
            self._spawn(protocol, self._docker, args, env=self._env, childFDs=_CHILD_FDS)

    def _retry(self) -> None:
        if not self._progress:
            self._failures += 1
        if self._engine_ready is not None:
            ready = self._engine_ready()
            if not ready.called:
                # The engine is away: no failure of the tail; wait for it.
                self.log.info("docker logs for {cid}: waiting for the engine", cid=self._container_id)
                self._failures = 0
                self._state = "waiting"
                self._engine_wait = ready
                ready.addCallbacks(self._engine_back, lambda f: None)
                return
        if self._failures > self._max_failures:
            message = f"docker logs for {self._short} failed {self._failures} times"
            if self._last_message:
                message += f": {self._last_message}"
            Deferred.fromCoroutine(self._finish(Failure(LogTailError(message)))).addErrback(self._crashed)
            return
        delay = 0.0 if self._failures == 0 else _RESTART.base(self._failures - 1)
        self._state = "waiting"
        self._timer = self._reactor.callLater(delay, self._restart)

    def _engine_back(self, _: object) -> None:
        if self._engine_wait is None:
            return  # stopped meanwhile
        self._engine_wait = None
        self._restart()

    def _restart(self) -> None:
        self._timer = None
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
