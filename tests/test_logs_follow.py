"""LogFollower against a fake ``docker logs`` process (fluster_worker.testing.logs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from fluster_worker.logs import FollowStopped, JobLog, LogFollower, LogQuery, LogStore, LogTailError
from fluster_worker.logs.lines import parse_timestamp
from fluster_worker.testing.logs import FakeContainer, FakeProcess, FakeSpawner, InlinePool, docker_line

T0 = 1_795_000_000_000_000_000
DOCKER = "/usr/local/bin/docker"
CID = "0123456789abcdef" * 4


def settle(clock: Clock) -> None:
    for _ in range(10000):
        calls: list[Any] = list(clock.getDelayedCalls())
        if not calls:
            return
        clock.advance(min(c.getTime() for c in calls) - clock.seconds())
    raise AssertionError("never settles")


def outcome(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


class Rig:
    def __init__(self, root: Path, **kw: Any) -> None:
        self.clock = Clock()
        self.store = LogStore(root, InlinePool(), self.clock)  # type: ignore[arg-type]
        self.job_log = self.store.open("job")
        self.spawner = FakeSpawner(on_spawn=self._answer_check)
        self.container = FakeContainer(running=True)
        # what ``docker logs --tail N`` answers: the container's last entries
        self.log: list[tuple[int, bytes]] = []
        self.checks = 0
        self.follower = self.make_follower(self.job_log, **kw)

    def make_follower(self, job_log: JobLog, **kw: Any) -> LogFollower:
        return LogFollower(
            self.clock, self.spawner, DOCKER, job_log, CID, self.container.is_running, env={"PATH": "/bin"}, **kw
        )

    def _answer_check(self, proc: FakeProcess) -> None:
        if "--tail" not in proc.args:
            return
        self.checks += 1
        assert proc.args[:3] == [DOCKER, "logs", "--tail"]
        assert proc.args[4:] == ["--timestamps", "--", CID]
        for fd, raw in self.log[-int(proc.args[3]) :]:
            (proc.out if fd == 1 else proc.err)(raw)
        proc.exit(0)

    def start(self) -> Deferred[None]:
        d = self.follower.follow()
        settle(self.clock)
        return d

    @property
    def proc(self) -> FakeProcess:
        """The newest ``docker logs`` tail process."""
        return [p for p in self.spawner.processes if "--tail" not in p.args][-1]

    def lines(self, **kw: Any) -> list[tuple[str, str]]:
        d = self.store.query("job", LogQuery(**kw))
        settle(self.clock)
        (result,) = outcome(d)
        if isinstance(result, Failure):
            result.raiseException()
        return [(x.source, x.data) for x in result]


def since_of(proc: FakeProcess) -> int | None:
    if "--since" not in proc.args:
        return None
    seconds, nanos = proc.args[proc.args.index("--since") + 1].split(".")
    return int(seconds) * 10**9 + int(nanos)


def test_spawns_docker_logs_and_stores_both_streams(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    done = outcome(rig.start())
    proc = rig.proc
    assert proc.executable == DOCKER
    assert proc.args == [DOCKER, "logs", "--follow", "--timestamps", "--", CID]
    assert proc.env == {"PATH": "/bin"}
    assert proc.child_fds == {0: "w", 1: "r", 2: "r"}
    assert proc.stdin_closed
    proc.out(docker_line(T0, "out 1") + docker_line(T0 + 2, "out")[:20])
    proc.err(docker_line(T0 + 1, "err 1"))
    proc.out(docker_line(T0 + 2, "out 2")[20:] + docker_line(T0 + 3, "last, no newline", newline=False))
    rig.container.running = False
    rig.log = [
        (1, docker_line(T0, "out 1")),
        (2, docker_line(T0 + 1, "err 1")),
        (1, docker_line(T0 + 2, "out 2")),
        (1, docker_line(T0 + 3, "last, no newline", newline=False)),
    ]
    proc.exit(0)
    assert done == []  # not before the lines are on disk
    settle(rig.clock)
    assert done == [None]
    assert rig.lines() == [
        ("stdout", "out 1"),
        ("stderr", "err 1"),
        ("stdout", "out 2"),
        ("stdout", "last, no newline"),
    ]
    assert rig.container.calls == 1
    assert rig.checks == 1
    assert rig.follower.attempts == 1
    assert outcome(rig.follower.follow()) == [None]  # a later waiter gets its own answer


def test_killed_tail_restarts_without_gap_or_duplicate(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    done = outcome(rig.start())
    same = T0 + 500
    first = rig.proc
    first.out(docker_line(T0, "a") + docker_line(same, "b1") + docker_line(same, "b2"))
    first.out(docker_line(same, "b3")[:25])  # cut mid-line by the kill
    first.err(docker_line(T0 + 100, "e1"))
    first_pid = rig.follower.pid
    first.die(9)
    settle(rig.clock)
    second = rig.proc
    assert second is not first and rig.follower.pid != first_pid
    assert since_of(second) == T0 + 100 - 10**9  # the oldest stream's last line, minus the margin
    # docker re-sends everything since then
    second.out(docker_line(T0, "a") + docker_line(same, "b1") + docker_line(same, "b2") + docker_line(same, "b3"))
    second.err(docker_line(T0 + 100, "e1") + docker_line(T0 + 600, "e2"))
    second.out(docker_line(same + 1, "c"))
    rig.container.running = False
    second.exit(0)
    settle(rig.clock)
    assert done == [None]
    assert rig.lines(sources=frozenset({"stdout"})) == [("stdout", x) for x in ("a", "b1", "b2", "b3", "c")]
    assert rig.lines(sources=frozenset({"stderr"})) == [("stderr", "e1"), ("stderr", "e2")]


def test_a_stream_with_no_line_before_the_kill_loses_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    done = outcome(rig.start())
    ms = 1_000_000
    rig.proc.out(docker_line(T0 + 10 * ms, "o1"))
    rig.proc.die(15)
    settle(rig.clock)
    rig.proc.err(docker_line(T0 + 9 * ms, "stamped before o1 but never received"))
    rig.proc.out(docker_line(T0 + 10 * ms, "o1") + docker_line(T0 + 11 * ms, "o2"))
    rig.container.running = False
    rig.proc.exit(0)
    settle(rig.clock)
    assert done == [None]
    assert rig.lines() == [
        ("stderr", "stamped before o1 but never received"),
        ("stdout", "o1"),
        ("stdout", "o2"),
    ]


def test_clean_exit_while_still_running_restarts(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    done = outcome(rig.start())
    rig.proc.out(docker_line(T0, "x"))
    rig.proc.exit(0)  # e.g. the daemon closed the stream; the container still runs
    settle(rig.clock)
    assert rig.follower.attempts == 2
    assert since_of(rig.proc) == T0 - 10**9
    rig.proc.out(docker_line(T0, "x") + docker_line(T0 + 1, "y"))
    rig.container.running = False
    rig.proc.exit(0)
    settle(rig.clock)
    assert done == [None]
    assert rig.lines() == [("stdout", "x"), ("stdout", "y")]


def test_died_after_container_exit_still_drains(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    done = outcome(rig.start())
    rig.proc.out(docker_line(T0, "x"))
    rig.container.running = False
    rig.proc.die(9)
    settle(rig.clock)
    assert rig.follower.attempts == 2  # a killed tail is always followed by another
    rig.proc.out(docker_line(T0, "x") + docker_line(T0 + 1, "y"))
    rig.proc.exit(0)
    settle(rig.clock)
    assert done == [None]
    assert rig.lines() == [("stdout", "x"), ("stdout", "y")]


def test_early_clean_exit_is_caught_and_drained(tmp_path: Path) -> None:
    """Docker 20.10: ``logs -f`` may exit 0 before sending all lines."""
    rig = Rig(tmp_path)
    done = outcome(rig.start())
    rig.proc.out(docker_line(T0, "1") + docker_line(T0 + 1, "2"))
    rig.container.running = False
    rig.log = [
        (1, docker_line(T0, "1")),
        (1, docker_line(T0 + 1, "2")),
        (1, docker_line(T0 + 2, "3")),
        (2, docker_line(T0 + 3, "the end")),
    ]
    rig.proc.exit(0)
    settle(rig.clock)
    assert rig.checks == 1
    assert done == []
    drain = rig.proc
    assert drain.args == [
        DOCKER,
        "logs",
        "--timestamps",
        "--since",
        f"{(T0 + 1 - 10**9) // 10**9}.{(T0 + 1 - 10**9) % 10**9:09d}",
        "--",
        CID,
    ]
    drain.out(docker_line(T0, "1") + docker_line(T0 + 1, "2") + docker_line(T0 + 2, "3"))
    drain.err(docker_line(T0 + 3, "the end"))
    drain.exit(0)
    settle(rig.clock)
    assert done == [None]
    assert rig.checks == 1  # a tail started after the exit reads everything
    assert [d for _, d in rig.lines()] == ["1", "2", "3", "the end"]


def test_gives_up_after_repeated_failures(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_failures=3)
    done = outcome(rig.start())
    for _ in range(4):
        rig.proc.err(b"Error response from daemon: No such container: abc\n")
        rig.proc.exit(1)
        settle(rig.clock)
    assert rig.follower.attempts == 4
    assert 0.1 + 0.2 + 0.4 <= rig.clock.seconds() < 0.8  # backing off
    assert len(done) == 1 and isinstance(done[0], Failure)
    assert done[0].check(LogTailError)
    assert "No such container" in done[0].getErrorMessage()
    assert rig.lines() == []  # CLI messages are not job output


def test_spawn_failure_is_retried(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_failures=2)
    rig.spawner.fail_with = OSError("exec format error")
    done = outcome(rig.start())
    assert len(done) == 1 and done[0].check(LogTailError)
    assert "exec format error" in done[0].getErrorMessage()


def test_stop_kills_the_tail(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    done = outcome(rig.start())
    rig.proc.out(docker_line(T0, "kept"))
    rig.follower.stop()
    assert rig.proc.signals == ["KILL"]
    rig.proc.die(9)
    settle(rig.clock)
    assert len(done) == 1 and done[0].check(FollowStopped)
    assert rig.lines() == [("stdout", "kept")]
    assert rig.follower.attempts == 1


def test_stop_while_backing_off(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    done = outcome(rig.start())
    rig.proc.exit(1)  # no progress: wait before the next try
    rig.follower.stop()
    settle(rig.clock)
    assert len(done) == 1 and done[0].check(FollowStopped)
    assert rig.follower.attempts == 1


def test_back_pressure_pauses_the_pipes(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_pending_bytes=100)
    outcome(rig.start())
    rig.proc.out(b"".join(docker_line(T0 + i, "x" * 50) for i in range(10)))
    assert rig.proc.paused
    settle(rig.clock)
    assert not rig.proc.paused


def test_resumes_from_what_the_store_holds(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    outcome(rig.start())
    rig.proc.out(docker_line(T0, "1") + docker_line(T0 + 1, "2") + docker_line(T0 + 1, "3"))
    settle(rig.clock)
    # the worker restarts: a new follower (same store files) for the same container
    rig.follower.stop()
    rig.proc.die(9)
    settle(rig.clock)
    again = rig.make_follower(rig.job_log)
    done = outcome(again.follow())
    settle(rig.clock)
    assert since_of(rig.proc) == T0 + 1 - 10**9
    rig.proc.out(docker_line(T0, "1") + docker_line(T0 + 1, "2") + docker_line(T0 + 1, "3") + docker_line(T0 + 2, "4"))
    rig.container.running = False
    rig.proc.exit(0)
    settle(rig.clock)
    assert done == [None]
    assert [d for _, d in rig.lines()] == ["1", "2", "3", "4"]


def test_rejects_relative_docker_and_odd_container_ids(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    with pytest.raises(ValueError):
        LogFollower(rig.clock, rig.spawner, "docker", rig.job_log, CID, rig.container.is_running)
    with pytest.raises(ValueError):
        LogFollower(rig.clock, rig.spawner, DOCKER, rig.job_log, "--help", rig.container.is_running)


def test_default_env_is_explicit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/docker.sock")
    monkeypatch.setenv("SECRET_TOKEN", "x")
    rig = Rig(tmp_path)
    follower = LogFollower(rig.clock, rig.spawner, DOCKER, rig.job_log, CID, rig.container.is_running)
    outcome(follower.follow())
    settle(rig.clock)
    env = rig.proc.env
    assert env is not None
    assert env["DOCKER_HOST"] == "unix:///run/docker.sock"
    assert "PATH" in env and "SECRET_TOKEN" not in env


# -- the property: kills at any byte never lose or repeat a line ------------------------------

ENTRY = st.tuples(
    st.sampled_from([1, 2]),  # fd
    st.integers(min_value=0, max_value=3),  # timestamp step (0: same nanosecond)
    st.sampled_from([0, 0, 0, 1, 2]),  # stamped that many 0.1 s before its place in the file
    st.text(alphabet="abcé✓ ", max_size=12),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(entries=[(1, 0, 0, ""), (2, 0, 1, "")], kills=[(1, 0, "kill")], chunk=100)  # stderr stamped before
@given(
    entries=st.lists(ENTRY, min_size=1, max_size=30),
    # end the tail after that many lines it sends plus that many bytes of the next:
    # killed, or (early) exit 0 once the container has exited (docker's bug)
    kills=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=30),
            st.sampled_from([0, 0, 1, 5, 31, 32, 40]),
            st.sampled_from(["kill", "kill", "early"]),
        ),
        max_size=4,
    ),
    chunk=st.integers(min_value=1, max_value=300),
)
def test_any_kill_points(
    tmp_path_factory: pytest.TempPathFactory,
    entries: list[tuple[int, int, int, str]],
    kills: list[tuple[int, int, str]],
    chunk: int,
) -> None:
    rig = Rig(tmp_path_factory.mktemp("kills"))
    clock = T0
    last = {1: 0, 2: 0}
    log: list[tuple[int, int, bytes]] = []  # the container's json log: (fd, ts, raw line)
    for i, (fd, step, early, text) in enumerate(entries):
        clock += step * 400_000_000  # steps of 0.4 s: since's margin re-sends some lines
        # Docker stamps a line before writing it: across streams the file order is
        # not quite the timestamp order; within a stream it is. Two lines may share
        # a stamp, but never stamp and bytes both (that is a line sent again: resume.py).
        stamp = max(last[fd], clock - early * 100_000_000)
        last[fd] = stamp
        log.append((fd, stamp, docker_line(stamp, f"{text}{i}")))
    rig.log = [(fd, raw) for fd, _, raw in log]
    done = outcome(rig.start())
    for kill in [*kills, *[None] * 3]:  # (a clean end may be followed by a drain)
        proc = rig.proc
        since = since_of(proc)
        # docker logs --since: the entries at or after it, in file order; each pipe
        # carries its stream's bytes, read in chunks of up to ``chunk`` bytes.
        events: list[tuple[int, bytes]] = []
        sent = [raw for _, ts, raw in log if since is None or ts >= since]
        budget = None if kill is None else sum(map(len, sent[: kill[0]])) + kill[1]
        for fd, ts, raw in log:
            if since is not None and ts < since:
                continue
            if events and events[-1][0] == fd:
                events[-1] = (fd, events[-1][1] + raw)
            else:
                events.append((fd, raw))
        for fd, run in events:
            if budget is not None:
                run = run[:budget]
                budget -= len(run)
            for i in range(0, len(run), chunk):
                (proc.out if fd == 1 else proc.err)(run[i : i + chunk])
            if budget == 0:
                break
        if kill is None:
            rig.container.running = False
            proc.exit(0)
        elif kill[2] == "early" and kill[1] == 0 and "--follow" in proc.args:
            # docker logs -f stops between two lines, exit 0 (without -f it does not)
            rig.container.running = False
            proc.exit(0)
        else:
            proc.die(9)
        settle(rig.clock)
        if done:
            break
    assert done == [None]
    drains = [p for p in rig.spawner.processes if "--follow" not in p.args and "--tail" not in p.args]
    if not any(k[2] == "early" for k in kills):
        assert drains == []  # the check found the complete log complete
    for fd, source in ((1, "stdout"), (2, "stderr")):
        expected = [raw.split(b" ", 1)[1][:-1].decode() for f, _, raw in log if f == fd]
        assert [d for _, d in rig.lines(sources=frozenset({source}))] == expected
    assert all(parse_timestamp(raw[:30]) == ts for _, ts, raw in log)
    assert os.path.isdir(rig.store.root / "job")
