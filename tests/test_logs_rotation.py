"""The engine's log of a job rotates (it is capped), and Docker 20.10's
``logs --follow`` loses its place in a rotating file: it sends a rotated file
again, or goes quiet for good. The follower stores nothing twice and restarts a
quiet tail whose log has moved on (fakes and task.Clock; the real engine in
tests/test_containment_e2e.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fluster_worker.logs import JobLog, LogFollower
from fluster_worker.logs.resume import StreamCursor
from fluster_worker.testing.logs import docker_line
from tests.test_logs_follow import CID, DOCKER, T0, Rig, outcome, since_of


def test_a_tail_that_goes_back_stores_nothing_twice() -> None:
    cursor = StreamCursor("stdout", 1024)
    ms = 1_000_000
    # Lines share timestamps (Docker stamps a read, not a line).
    first = [T0, T0 + ms, T0 + ms, T0 + 2 * ms]
    assert cursor.accept(first, [b"a", b"b1", b"b2", b"c"]) == (first, [b"a", b"b1", b"b2", b"c"])
    # The rotated file again, from its start, then what is new; all in one read.
    again = [T0 + ms, T0 + ms, T0 + 2 * ms, T0 + 2 * ms, T0 + 3 * ms]
    assert cursor.accept(again, [b"b1", b"b2", b"c", b"c2", b"d"]) == (
        [T0 + 2 * ms, T0 + 3 * ms], [b"c2", b"d"])
    # Going back inside a read of new lines.
    mixed = [T0 + 4 * ms, T0 + 2 * ms, T0 + 3 * ms, T0 + 4 * ms, T0 + 5 * ms]
    assert cursor.accept(mixed, [b"e", b"c2", b"d", b"e", b"f"]) == ([T0 + 4 * ms, T0 + 5 * ms], [b"e", b"f"])
    assert (cursor.last_ts, cursor.count) == (T0 + 5 * ms, 1)
    # The same file sent again twice over, in one read (what Docker 20.10 did).
    twice = [T0 + 4 * ms, T0 + 5 * ms, T0 + 4 * ms, T0 + 5 * ms]
    assert cursor.accept(twice, [b"e", b"f", b"e", b"f"]) == ([], [])
    # A read that starts again at the very line stored last.
    assert cursor.accept([T0 + 5 * ms, T0 + 6 * ms], [b"f", b"g"]) == ([T0 + 6 * ms], [b"g"])
    # The same stamp with other bytes is a line of its own.
    assert cursor.accept([T0 + 6 * ms], [b"g2"]) == ([T0 + 6 * ms], [b"g2"])


class StallRig(Rig):
    def make_follower(self, job_log: JobLog, **kw: Any) -> LogFollower:
        return LogFollower(
            self.clock, self.spawner, DOCKER, job_log, CID, self.container.is_running,
            env={"PATH": "/bin"}, stall_s=10.0, **kw,
        )


def advance(rig: Rig, seconds: float) -> None:
    for _ in range(int(seconds * 10)):
        rig.clock.advance(0.1)


def test_a_quiet_tail_whose_log_moved_on_is_restarted(tmp_path: Path) -> None:
    rig = StallRig(tmp_path)
    done = outcome(rig.follower.follow())
    advance(rig, 0.5)
    first = rig.proc
    first.out(docker_line(T0, "before the rotation"))
    rig.log = [(1, docker_line(T0, "before the rotation"))]
    advance(rig, 25)  # quiet, but nothing newer in the engine's log: a quiet job
    assert rig.proc is first and first.signals == []
    assert rig.checks >= 2
    rig.log.append((1, docker_line(T0 + 1000, "after the rotation")))
    advance(rig, 11)
    assert first.signals == ["KILL"]
    first.die(9)
    advance(rig, 1)
    second = rig.proc
    assert second is not first and since_of(second) == T0 - 10**9
    second.out(docker_line(T0, "before the rotation") + docker_line(T0 + 1000, "after the rotation"))
    rig.container.running = False
    second.exit(0)
    advance(rig, 1)
    assert done == [None]
    assert rig.lines() == [("stdout", "before the rotation"), ("stdout", "after the rotation")]


def test_a_tail_that_delivers_is_never_checked(tmp_path: Path) -> None:
    rig = StallRig(tmp_path)
    outcome(rig.follower.follow())
    advance(rig, 0.5)
    for i in range(40):
        rig.proc.out(docker_line(T0 + i, f"line {i}"))
        advance(rig, 1)
    assert rig.checks == 0 and rig.follower.attempts == 1
    rig.follower.stop()
    advance(rig, 1)
