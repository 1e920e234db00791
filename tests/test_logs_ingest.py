"""IngestBudget (logs/ingest.py): the followers' share of the reactor's time,
and a follower that stops reading its pipes while it is spent."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from fluster_worker.logs import LogQuery
from fluster_worker.logs.ingest import IngestBudget
from fluster_worker.logs.lines import StreamParser
from fluster_worker.testing.logs import docker_line
from tests.test_logs_follow import T0, Rig, outcome, settle


def test_budget_empties_and_refills_at_its_share() -> None:
    clock = Clock()
    budget = IngestBudget(clock, share=0.5, burst_s=0.004, clock=clock.seconds)
    budget.spend(0.003)
    assert not budget.exhausted
    budget.spend(0.003)
    assert budget.exhausted  # 2 ms short
    waited = outcome(budget.wait())
    second = outcome(budget.wait())
    clock.advance(0.0039)
    assert waited == [] and second == []  # 2 ms at half speed: 4 ms
    clock.advance(0.0002)
    assert waited == [None] and second == [None]
    assert not budget.exhausted
    clock.advance(1.0)
    budget.spend(0.004)
    assert not budget.exhausted  # never more than the burst in store
    budget.spend(0.0001)
    assert budget.exhausted


def test_budget_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        IngestBudget(Clock(), share=0)
    with pytest.raises(ValueError):
        IngestBudget(Clock(), burst_s=0)


def test_a_spent_budget_pauses_the_pipes_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(tmp_path)
    clock = rig.clock
    feed = StreamParser.feed

    def slow_feed(parser: StreamParser, chunk: bytes) -> tuple[list[int], list[bytes]]:
        clock.advance(0.002)  # each chunk "takes" 2 ms to parse
        return feed(parser, chunk)

    monkeypatch.setattr(StreamParser, "feed", slow_feed)
    budget = IngestBudget(clock, share=0.5, burst_s=0.003, clock=clock.seconds)
    rig.follower = rig.make_follower(rig.job_log, budget=budget, read_delay_s=0)
    outcome(rig.start())
    proc = rig.proc
    sent = 0
    pauses = 0
    for _ in range(20):
        if proc.paused:
            pauses += 1
            settle(clock)  # the budget refills; the follower reads again
            assert not proc.paused
        proc.out(b"".join(docker_line(T0 + sent + i, f"line {sent + i}") for i in range(50)))
        sent += 50
    # 2 ms per chunk against 1 ms of refill: spent after a few chunks, every other one after that.
    assert pauses >= 5
    rig.container.running = False
    rig.log = [(1, docker_line(T0 + sent - 1, f"line {sent - 1}"))]
    proc.exit(0)
    settle(clock)
    stored = rig.lines(start_line=0, max_lines=sent + 10)
    assert [d for _, d in stored] == [f"line {i}" for i in range(sent)]


def test_each_store_has_one_budget_its_logs_share(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    other = rig.store.open("other")
    assert rig.job_log.ingest is other.ingest is rig.store.ingest
    assert rig.store.query is not None and LogQuery is not None
