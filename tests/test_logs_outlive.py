"""Logs across a worker restart, an engine outage and a full disk, against a fake
``docker logs`` (fluster_worker.testing.logs): resuming counts what an earlier
process stored, the tail waits for the engine instead of giving up, lost lines
are counted, and the CLI can run under a wrapper that dies with the worker."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, succeed

from fluster_worker.common.waiters import Waiters
from fluster_worker.logs import LogQuery, LogStore, LogTailError
from fluster_worker.logs.disk import JobFiles
from fluster_worker.logs.joblog import LogWriteError
from fluster_worker.testing.logs import InlinePool, docker_line
from tests.test_logs_follow import CID, DOCKER, T0, Rig, outcome, settle, since_of

MS = 1_000_000


def query(rig: Rig, store: LogStore) -> list[tuple[str, str, int]]:
    d = store.query("job", LogQuery())
    settle(rig.clock)
    (lines,) = outcome(d)
    return [(x.source, x.data, x.timestamp_ns) for x in lines]


def test_resume_counts_stored_lines_whose_timestamps_were_moved(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    outcome(rig.start())
    rig.proc.out(docker_line(T0 + 10 * MS, "o1"))
    settle(rig.clock)
    assert [d for _, d in rig.lines()] == ["o1"]  # served: the mark is at T0 + 10 ms
    rig.proc.err(docker_line(T0 + 5 * MS, "e1"))  # arrives late: stored at T0 + 11 ms
    settle(rig.clock)
    assert rig.job_log.shifted_lines == 1
    # The worker dies (its tail with it); a new process opens the same files.
    rig.follower.stop()
    rig.proc.die(9)
    settle(rig.clock)
    outcome(rig.job_log.close())
    settle(rig.clock)
    store = LogStore(tmp_path, InlinePool(), rig.clock)  # type: ignore[arg-type]
    job_log = store.open("job")
    again = rig.make_follower(job_log)
    done = outcome(again.follow())
    settle(rig.clock)
    # From a fixed moment before the oldest stream's last stored line...
    assert since_of(rig.proc) == T0 + 10 * MS - 10**9
    # ...Docker sends everything again, with its own timestamps, and more.
    rig.proc.out(docker_line(T0 + 10 * MS, "o1") + docker_line(T0 + 12 * MS, "o2"))
    rig.proc.err(docker_line(T0 + 5 * MS, "e1") + docker_line(T0 + 6 * MS, "e2"))
    rig.container.running = False
    rig.log = [(1, docker_line(T0 + 12 * MS, "o2")), (2, docker_line(T0 + 6 * MS, "e2"))]
    rig.proc.exit(0)
    settle(rig.clock)
    assert done == [None]
    # e2 is older than the moved e1: counting keeps it; timestamps alone lost it.
    assert sorted((s, d) for s, d, _ in query(rig, store)) == [
        ("stderr", "e1"), ("stderr", "e2"), ("stdout", "o1"), ("stdout", "o2"),
    ]


def test_a_resumed_tail_that_dies_while_counting_counts_again(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    outcome(rig.start())
    rig.proc.out(docker_line(T0, "1") + docker_line(T0 + 1, "2"))
    settle(rig.clock)
    rig.follower.stop()
    rig.proc.die(9)
    settle(rig.clock)
    again = rig.make_follower(rig.job_log)
    done = outcome(again.follow())
    settle(rig.clock)
    first = rig.proc
    first.out(docker_line(T0, "1"))  # one of the two stored lines, then the tail dies
    first.die(9)
    settle(rig.clock)
    assert rig.proc is not first and since_of(rig.proc) == since_of(first)
    rig.proc.out(docker_line(T0, "1") + docker_line(T0 + 1, "2") + docker_line(T0 + 2, "3"))
    rig.container.running = False
    rig.log = [(1, docker_line(T0 + 2, "3"))]
    rig.proc.exit(0)
    settle(rig.clock)
    assert done == [None]
    assert [d for _, d in rig.lines()] == ["1", "2", "3"]


class Engine:
    """``engine_ready``: fires at once while up; waits while down."""

    def __init__(self) -> None:
        self.up = True
        self._waiters: Waiters[None] = Waiters()

    def ready(self) -> Deferred[None]:
        return succeed(None) if self.up else self._waiters.wait()

    def back(self) -> None:
        self.up = True
        self._waiters.fire(None)


def test_the_tail_waits_for_the_engine_instead_of_giving_up(tmp_path: Path) -> None:
    engine = Engine()
    rig = Rig(tmp_path, engine_ready=engine.ready, max_failures=2)
    done = outcome(rig.start())
    rig.proc.out(docker_line(T0, "before"))
    settle(rig.clock)
    engine.up = False
    for _ in range(5):  # many more failures than max_failures: the engine is away
        rig.proc.exit(1)
        settle(rig.clock)
        if rig.proc.ended:
            break
    assert done == []
    tails = len(rig.spawner.processes)
    settle(rig.clock)
    assert len(rig.spawner.processes) == tails  # nothing spawned while it waits
    engine.back()
    settle(rig.clock)
    assert len(rig.spawner.processes) == tails + 1
    rig.proc.out(docker_line(T0, "before") + docker_line(T0 + 1, "after"))
    rig.container.running = False
    rig.log = [(1, docker_line(T0 + 1, "after"))]
    rig.proc.exit(0)
    settle(rig.clock)
    assert done == [None]
    assert [d for _, d in rig.lines()] == ["before", "after"]


def test_without_the_engine_gate_the_tail_still_gives_up(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_failures=2)
    done = outcome(rig.start())
    for _ in range(3):
        rig.proc.exit(1)
        settle(rig.clock)
    assert len(done) == 1 and done[0].check(LogTailError)


def test_stop_while_waiting_for_the_engine(tmp_path: Path) -> None:
    engine = Engine()
    rig = Rig(tmp_path, engine_ready=engine.ready)
    done = outcome(rig.start())
    engine.up = False
    rig.proc.exit(1)
    settle(rig.clock)
    rig.follower.stop()
    settle(rig.clock)
    assert len(done) == 1 and "stopped" in done[0].getErrorMessage()
    engine.back()
    settle(rig.clock)
    assert all(p.ended for p in rig.spawner.processes)


def test_the_cli_runs_under_the_prefix(tmp_path: Path) -> None:
    prefix = ["/usr/bin/setpriv", "--pdeathsig", "KILL", "--"]
    rig = Rig(tmp_path, command_prefix=prefix)
    outcome(rig.start())
    proc = rig.spawner.processes[0]
    assert proc.executable == prefix[0]
    assert proc.args[:5] == [*prefix, DOCKER]
    assert proc.args[-2:] == ["--", CID]


def test_lines_lost_to_a_full_disk_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(tmp_path)
    outcome(rig.start())
    rig.proc.out(docker_line(T0, "kept"))
    settle(rig.clock)
    original = JobFiles.write

    def full(self: JobFiles, batches: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(JobFiles, "write", full)
    rig.proc.out(docker_line(T0 + 1, "lost 1") + docker_line(T0 + 2, "lost 2"))
    settle(rig.clock)
    monkeypatch.setattr(JobFiles, "write", original)
    rig.proc.out(docker_line(T0 + 3, "kept again"))
    settle(rig.clock)
    assert rig.job_log.lost_lines == 2
    assert "No space left on device" in rig.job_log.write_error
    assert [d for _, d in rig.lines()] == ["kept", "kept again"]
    failed = outcome(rig.job_log.flush())
    settle(rig.clock)
    assert failed == [None]  # later lines are fine: only lost_lines says what happened
    assert isinstance(LogWriteError("x"), OSError)
