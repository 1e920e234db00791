"""LogStore and JobLog against the real file system, with an inline pool and a
fake clock (deterministic), plus a few runs on the real reactor and pool."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from fluster_worker.logs import (
    InvalidLogQuery,
    JobLog,
    LogLine,
    LogQuery,
    LogQueryTimeout,
    LogStore,
    LogWriteError,
    Page,
    disk,
)
from fluster_worker.logs import query as query_module
from fluster_worker.testing.logs import InlinePool

T = TypeVar("T")
MS = 1_000_000
T0 = 1_795_000_000_000 * MS


def settle(clock: Clock) -> None:
    """Run the writer until it is idle (the clock jumps over its batching delay)."""
    for _ in range(10000):
        calls: list[Any] = list(clock.getDelayedCalls())
        if not calls:
            return
        clock.advance(max(0.0, min(c.getTime() for c in calls) - clock.seconds()))
    raise AssertionError("the store never settles")


def result(clock: Clock, d: Deferred[T]) -> T:
    settle(clock)
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred did not fire"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]  # type: ignore[no-any-return]


def returns_within(seconds: float, f: Callable[[], T]) -> T:
    """``f()``, run on a thread of its own; fails the test if it has not returned
    after ``seconds`` (the thread is left behind: only a bug makes it hang)."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(f())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if errors:
        raise errors[0]
    return out[0]


def make_store(root: Path, clock: Clock, **kw: Any) -> LogStore:
    return LogStore(root, InlinePool(), clock, **kw)  # type: ignore[arg-type]


def query(store: LogStore, clock: Clock, job_id: str, **kw: Any) -> list[LogLine]:
    return result(clock, store.query(job_id, LogQuery(**kw)))


def data(lines: list[LogLine]) -> list[str]:
    return [line.data for line in lines]


def add(job_log: JobLog, source: str, texts: list[str], start_ms: int = 0) -> None:
    stamps = [T0 + (start_ms + i) * MS for i in range(len(texts))]
    job_log.append_batch(source, stamps, [t.encode() for t in texts])


@pytest.fixture
def clock() -> Clock:
    return Clock()


# -- appending, flushing, reopening -----------------------------------------------------------


def test_append_flush_query(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job-1")
    assert store.open("job-1") is log
    add(log, "stdout", ["a", "b"])
    log.append("stderr", "err", T0 + 1 * MS + 5)
    result(clock, log.flush())
    lines = query(store, clock, "job-1")
    assert [(x.source, x.data, x.seq) for x in lines] == [
        ("stdout", "a", 0),
        ("stdout", "b", 1),
        ("stderr", "err", 2),
    ]
    assert lines[2].timestamp_ns == T0 + 1 * MS + 5
    assert lines[2].timestamp_ms == (T0 + 1 * MS) // MS
    assert store.line_count("job-1") == 3
    assert (tmp_path / "job-1" / "stdout.0.dat").read_bytes() == b"a\nb\n"


def test_flush_means_on_disk(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("j")
    add(log, "stdout", ["x"] * 10)
    d = log.flush()
    assert not (tmp_path / "j" / "stdout.0.dat").exists() or (tmp_path / "j" / "stdout.0.dat").stat().st_size == 0
    result(clock, d)
    assert (tmp_path / "j" / "stdout.0.dat").stat().st_size == 20
    assert (tmp_path / "j" / "stdout.0.idx").stat().st_size == 240


def test_append_splits_lines_and_stamps_now(tmp_path: Path, clock: Clock) -> None:
    clock.advance(1_700_000_000.25)
    store = make_store(tmp_path, clock)
    log = store.open("j")
    log.append("build", "step 1\r\nstep 2\n")
    log.append("error", "x" * 3000)
    lines = query(store, clock, "j")
    assert data(lines)[:2] == ["step 1", "step 2"]
    assert lines[0].timestamp_ns == 1_700_000_000_250_000_000
    store2 = make_store(tmp_path / "other", clock, max_line_bytes=1000)
    log2 = store2.open("j")
    log2.append("error", "x" * 3000)
    assert data(query(store2, clock, "j")) == ["x" * 1000 + " [fluster: line truncated, 2000 bytes dropped]"]
    with pytest.raises(ValueError):
        log.append("stdin", "nope")


def test_reopen_after_restart(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    add(log, "stdout", ["one", "two"])
    add(log, "stderr", ["e1"], start_ms=5)
    result(clock, log.close())
    # a new worker process: a new store on the same root
    store2 = make_store(tmp_path, clock)
    assert data(query(store2, clock, "job")) == ["one", "two", "e1"]
    log2 = store2.open("job")
    add(log2, "stdout", ["three"], start_ms=10)
    result(clock, log2.flush())
    lines = query(store2, clock, "job")
    assert data(lines) == ["one", "two", "e1", "three"]
    assert [x.seq for x in lines] == [0, 1, 2, 3]
    assert result(clock, log2.resume_point("stdout")) == (T0 + 10 * MS, 1)
    assert result(clock, log2.resume_point("build")) is None


def test_resume_point_counts_equal_timestamps(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    log.append_batch("stdout", [T0, T0 + 1, T0 + 1, T0 + 1], [b"a", b"b", b"c", b"d"])
    assert result(clock, log.resume_point("stdout")) == (T0 + 1, 3)


def test_close_then_open_again_and_appends_after_close(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    add(log, "stdout", ["a"])
    closing = log.close()
    log.append("stdout", "dropped: appended after close")
    again = store.open("job")
    assert again is not log
    add(again, "stdout", ["b"], start_ms=1)
    result(clock, closing)
    result(clock, again.flush())
    assert data(query(store, clock, "job")) == ["a", "b"]


def test_torn_records_are_cut_on_reopen(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    add(log, "stdout", ["first", "second"])
    result(clock, log.close())
    job = tmp_path / "job"
    # a crash mid-batch: data written but the index only partly, then garbage
    with open(job / "stdout.0.dat", "ab") as f:
        f.write(b"third\nfour")
    with open(job / "stdout.0.idx", "ab") as f:
        f.write(b"\x01" * 13)
    assert data(query(make_store(tmp_path, clock), clock, "job")) == ["first", "second"]
    store2 = make_store(tmp_path, clock)
    log2 = store2.open("job")
    add(log2, "stdout", ["after"], start_ms=3)
    result(clock, log2.close())
    assert (job / "stdout.0.idx").stat().st_size == 3 * 24
    assert (job / "stdout.0.dat").read_bytes() == b"first\nsecond\nafter\n"
    assert [(x.data, x.seq) for x in query(store2, clock, "job")] == [("first", 0), ("second", 1), ("after", 2)]


def test_zero_filled_index_tail_is_cut(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    add(log, "stdout", ["a", "b"])
    result(clock, log.close())
    with open(tmp_path / "job" / "stdout.0.idx", "ab") as f:
        f.write(bytes(24 * 5))
    with open(tmp_path / "job" / "stdout.0.dat", "ab") as f:
        f.write(bytes(100))
    store2 = make_store(tmp_path, clock)
    assert data(query(store2, clock, "job")) == ["a", "b"]
    log2 = store2.open("job")
    add(log2, "stdout", ["c"], start_ms=5)
    result(clock, log2.flush())
    assert data(query(store2, clock, "job")) == ["a", "b", "c"]


def test_timestamps_never_go_back_within_a_source(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    log.append_batch("stdout", [T0 + 5 * MS, T0 + 2 * MS], [b"late", b"clock stepped back"])
    lines = query(store, clock, "job")
    assert [x.timestamp_ns for x in lines] == [T0 + 5 * MS, T0 + 5 * MS]


# -- the cap -----------------------------------------------------------------------------------


def test_cap_keeps_head_marker_and_tail(tmp_path: Path, clock: Clock) -> None:
    cap = 8000
    store = make_store(tmp_path, clock, max_stream_bytes=cap)
    log = store.open("job")
    texts = [f"line {i:05d}" for i in range(3000)]  # 10 bytes + 25 of overhead each
    for i in range(0, 3000, 100):
        add(log, "stdout", texts[i : i + 100], start_ms=i)
        settle(clock)
    add(log, "stderr", ["err"], start_ms=5000)
    result(clock, log.flush())
    lines = query(store, clock, "job")
    out = data(lines)
    # the head: lines while stdout stayed under cap/2
    marker = [x for x in out if x.startswith("[fluster:")]
    assert len(marker) == 1
    n_head = out.index(marker[0])
    assert out[:n_head] == texts[:n_head]
    assert n_head == -(-4000 // 35)  # lines go in while the head is below cap/2
    dropped = int(marker[0].split()[1])
    assert marker[0] == f"[fluster: {dropped} lines ({dropped * 35} bytes) of stdout dropped]"
    tail = out[n_head + 1 : -1]
    assert tail == texts[3000 - len(tail) :]
    assert n_head + dropped + len(tail) == 3000
    assert out[-1] == "err"
    # bounded on disk
    used = sum(f.stat().st_size for f in (tmp_path / "job").glob("stdout.*"))
    assert used <= cap + 2 * 35
    assert 3 * cap // 8 - 35 <= len(tail) * 35
    # the marker sits at the first dropped line's place
    marker_line = lines[n_head]
    assert marker_line.seq == n_head
    assert marker_line.source == "stdout"
    # and everything survives a restart
    result(clock, log.close())
    assert data(query(make_store(tmp_path, clock, max_stream_bytes=cap), clock, "job")) == out
    stats = result(clock, make_store(tmp_path, clock).stats("job"))
    assert stats is not None
    assert stats.dropped_lines_by_source["stdout"] == dropped
    assert stats.lines_by_source["stderr"] == 1


def test_cap_applies_to_lines_from_append_too(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock, max_stream_bytes=2000)
    log = store.open("job")
    for i in range(400):
        log.append("build", f"step {i}", T0 + i * MS)
    result(clock, log.flush())
    out = data(query(store, clock, "job"))
    assert out[0] == "step 0"
    assert out[-1] == "step 399"
    assert any("of build dropped]" in x for x in out)


# -- query semantics -------------------------------------------------------------------------------


def test_unknown_and_hostile_job_ids(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    assert query(store, clock, "nope") == []
    assert query(store, clock, "../etc") == []
    assert query(store, clock, ".") == []
    for bad in ("..", "../x", "a//b", "", "a/./b", "x\x00y"):
        with pytest.raises(ValueError):
            store.open(bad)
    # Hierarchical ids are fine: each gets a directory of its own (common.jobnames).
    assert store.open("a/b").job_id == "a/b"


def test_filters(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    add(log, "stdout", [f"out {i}" for i in range(10)])  # ms 0..9
    add(log, "stderr", [f"err {i}" for i in range(3)], start_ms=3)  # ms 3..5
    add(log, "build", ["build a"], start_ms=-1)
    result(clock, log.flush())
    everything = data(query(store, clock, "job"))
    assert everything[:6] == ["build a", "out 0", "out 1", "out 2", "out 3", "err 0"]
    assert data(query(store, clock, "job", start_line=-2)) == ["out 8", "out 9"]
    assert data(query(store, clock, "job", start_line=12)) == ["out 8", "out 9"]
    assert data(query(store, clock, "job", start_ms=T0 // MS + 7)) == ["out 8", "out 9"]
    assert data(query(store, clock, "job", end_ms=T0 // MS)) == ["build a", "out 0"]
    assert data(query(store, clock, "job", regex=r"err [12]$")) == ["err 1", "err 2"]
    assert data(query(store, clock, "job", regex="out", max_lines=2)) == ["out 0", "out 1"]
    assert data(query(store, clock, "job", sources=frozenset({"stderr"}))) == ["err 0", "err 1", "err 2"]
    assert data(query(store, clock, "job", sources=frozenset({"stderr"}), start_line=-1)) == ["err 2"]
    with pytest.raises(InvalidLogQuery):
        query(store, clock, "job", sources=frozenset({"stdin"}))


def test_paging_with_cursor_is_exact_within_a_millisecond(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    log.append_batch("stdout", [T0 + i for i in range(50)], [f"o{i}".encode() for i in range(50)])
    log.append_batch("stderr", [T0 + 10 + i for i in range(50)], [f"e{i}".encode() for i in range(50)])
    expected = data(query(store, clock, "job"))
    pages: list[str] = []
    cursor = None
    while True:
        page = query(store, clock, "job", max_lines=7, after_seq=cursor)
        if not page:
            break
        pages += data(page)
        cursor = page[-1].seq
    assert pages == expected


def test_regex_validation(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    add(log, "stdout", ["x"])
    for bad in ("(", "a{2,1}", r"(a)\1", "(?<=a)b", "x" * 1025):
        with pytest.raises(InvalidLogQuery) as info:
            query(store, clock, "job", regex=bad)
        assert "\n" not in str(info.value)
    # also for unknown jobs: a bad query is bad whatever the job
    with pytest.raises(InvalidLogQuery):
        query(store, clock, "nope", regex="(")


def test_catastrophic_regex_is_linear(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock, max_line_bytes=2 << 20)
    log = store.open("job")
    log.append("stdout", "a" * (1 << 20) + "b", T0)
    log.append("stdout", "aaaa", T0 + 1)
    result(clock, log.flush())
    # A backtracking engine would never return (2^(2^20) ways to split the a's);
    # RE2 takes milliseconds. The deadline only keeps a hang from stalling the suite.
    lines = returns_within(60, lambda: query(store, clock, "job", regex=r"(a+)+$"))
    assert data(lines) == ["aaaa"]
    assert len(data(query(store, clock, "job", regex=r"^(a|aa)+b$"))) == 1


def test_scan_budget(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock, query_budget_s=0.0)
    log = store.open("job")
    add(log, "stdout", [f"line {i}" for i in range(2000)])
    with pytest.raises(LogQueryTimeout) as info:
        query(store, clock, "job", regex="nothing matches this")
    assert "narrow it" in str(info.value)
    assert len(query(store, clock, "job", regex="line", max_lines=5)) == 5  # found before the first check
    assert len(query(store, clock, "job")) == 2000  # no regex, no scan budget


def test_tail_reads_only_what_it_returns(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock, page=Page(lines=10**6))  # a full read below is one page
    log = store.open("job")
    n = 200_000
    for start in range(0, n, 50_000):
        log.append_batch(
            "stdout",
            [T0 + i * 1000 for i in range(start, start + 50_000)],
            [b"%08d some text of the line" % i for i in range(start, start + 50_000)],
        )
        log.append_batch("stderr", [T0 + start * 1000 + 7], [b"err %d" % start])
        settle(clock)
    result(clock, log.flush())
    on_disk = sum(f.stat().st_size for f in (tmp_path / "job").iterdir())
    for kw, expect_last, budget in (
        ({"start_line": -100}, b"%08d some text of the line" % (n - 1), 20_000),
        ({"start_line": n - 50}, b"%08d some text of the line" % (n - 1), 20_000),
        ({"start_line": 1000, "max_lines": 100}, None, 2 * 1000 * 24 + 20_000),
        ({"start_ms": (T0 + (n - 100) * 1000) // MS}, None, 20_000),
        ({"end_ms": T0 // MS + 5, "max_lines": 10}, None, 1001 * 60 + 20_000),
        ({"start_ms": T0 // MS + 5, "max_lines": 10}, None, 1000 * 60 + 20_000),
    ):
        before = store.bytes_read
        lines = query(store, clock, "job", **kw)
        cost = store.bytes_read - before
        assert cost < budget, (kw, cost, on_disk)
        if expect_last is not None:
            assert lines[-1].data.encode() == expect_last
        if kw.get("max_lines") == 10:
            # 1000 lines a millisecond: the group rule answers the whole first one
            assert len(lines) == 1000 + ("end_ms" in kw)  # + "err 0", stamped in T0's millisecond
            assert {x.timestamp_ms for x in lines} == {lines[0].timestamp_ms}
    # the binary search (far from both ends) agrees with a full read
    before = store.bytes_read
    middle = query(store, clock, "job", start_line=100_000, max_lines=3)
    assert store.bytes_read - before < 50_000
    # (the third line opens a millisecond that goes on: the group rule drops it)
    assert data(middle) == data(query(store, clock, "job"))[100_000:100_002]
    assert middle[-1].timestamp_ms + 1 == (T0 + 100_000 * 1000) // MS


# -- max_lines never splits a millisecond (the group rule) -----------------------------------


def stamped(job_log: JobLog, source: str, rows: list[tuple[int, str]]) -> None:
    """Lines at (millisecond after T0, text); lines of one millisecond 1 ns apart."""
    stamps = [T0 + ms * MS + i for i, (ms, _) in enumerate(rows)]
    job_log.append_batch(source, stamps, [text.encode() for _, text in rows])


def test_max_lines_drops_a_partial_last_millisecond(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    stamped(log, "stdout", [(0, "a"), (0, "b"), (1, "c"), (1, "d"), (1, "e"), (2, "f")])
    assert data(query(store, clock, "job", max_lines=2)) == ["a", "b"]  # cut between milliseconds
    assert data(query(store, clock, "job", max_lines=3)) == ["a", "b"]  # would split ms 1
    assert data(query(store, clock, "job", max_lines=4)) == ["a", "b"]
    assert data(query(store, clock, "job", max_lines=5)) == ["a", "b", "c", "d", "e"]
    assert data(query(store, clock, "job", max_lines=6)) == ["a", "b", "c", "d", "e", "f"]
    assert data(query(store, clock, "job", max_lines=9)) == ["a", "b", "c", "d", "e", "f"]
    first = T0 // MS
    assert data(query(store, clock, "job", start_ms=first, max_lines=2)) == ["c", "d", "e"]  # whole group
    assert data(query(store, clock, "job", start_ms=first, max_lines=3)) == ["c", "d", "e"]
    assert data(query(store, clock, "job", start_ms=first, max_lines=4)) == ["c", "d", "e", "f"]


def test_one_millisecond_longer_than_max_lines_comes_whole(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    stamped(log, "stdout", [(0, f"o{i}") for i in range(30)] + [(1, "next")])
    stamped(log, "stderr", [(0, "err")])  # the same millisecond, another source
    lines = query(store, clock, "job", max_lines=4)
    assert data(lines) == [f"o{i}" for i in range(30)] + ["err"]
    assert data(query(store, clock, "job", max_lines=4, sources=frozenset({"stderr"}))) == ["err"]
    assert data(query(store, clock, "job", start_line=-3, max_lines=1)) == ["o29", "err"]  # the tail's group


def test_group_rule_counts_matching_entries_only(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    stamped(log, "stdout", [(0, "x1"), (1, "x2"), (1, "y"), (1, "y"), (2, "x3"), (2, "x4")])
    # after "x2" ms 1 only holds lines that do not match: it is not split
    assert data(query(store, clock, "job", regex="x", max_lines=2)) == ["x1", "x2"]
    # ms 2 is split by a cut after "x3": dropped
    assert data(query(store, clock, "job", regex="x", max_lines=3)) == ["x1", "x2"]
    assert data(query(store, clock, "job", regex="x", max_lines=1, start_ms=T0 // MS + 1)) == ["x3", "x4"]
    # end_ms bounds the look-ahead too
    assert data(query(store, clock, "job", max_lines=2, end_ms=T0 // MS + 1)) == ["x1"]


def test_cursor_pages_are_cut_at_max_lines_exactly(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    stamped(log, "stdout", [(0, f"o{i}") for i in range(10)])
    assert data(query(store, clock, "job", max_lines=3, after_seq=-1)) == ["o0", "o1", "o2"]
    assert data(query(store, clock, "job", max_lines=3, after_seq=2)) == ["o3", "o4", "o5"]


# -- every answer is at most a page ------------------------------------------------------------


@pytest.mark.parametrize("max_lines", [0, -1, -(2**31), 25, 2**31 - 1])
def test_an_answer_is_at_most_a_page_of_lines_whatever_max_lines_says(
    tmp_path: Path, clock: Clock, max_lines: int
) -> None:
    store = make_store(tmp_path, clock, page=Page(lines=20))
    log = store.open("job")
    add(log, "stdout", [f"l{i}" for i in range(100)])
    lines = query(store, clock, "job", max_lines=max_lines)
    assert data(lines) == [f"l{i}" for i in range(20)]
    assert data(query(store, clock, "job", start_line=-50, max_lines=max_lines)) == [f"l{i}" for i in range(50, 70)]
    assert len(query(store, clock, "job", max_lines=max_lines, regex="l")) == 20


def test_an_answer_is_at_most_a_page_of_bytes_and_always_one_line(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock, page=Page(bytes=10_000))
    log = store.open("job")
    add(log, "stdout", ["x" * 999 + str(i % 10) for i in range(50)])
    assert len(query(store, clock, "job")) == 10
    assert len(query(store, clock, "job", max_bytes=3000)) == 3  # a caller may ask for less
    assert len(query(store, clock, "job", max_bytes=10**9)) == 10  # never more
    add(log, "stderr", ["y" * 50_000], start_ms=100)
    big = query(store, clock, "job", start_ms=T0 // MS + 99)
    assert data(big) == ["y" * 50_000]  # a line larger than the page still comes: paging goes on


def test_paging_by_start_line_or_start_ms_or_after_seq_reads_everything_once(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock, page=Page(lines=10))
    log = store.open("job")
    # three lines a millisecond: a page of 10 would split one
    stamped(log, "stdout", [(i // 3, f"o{i}") for i in range(95)])
    stamped(log, "stderr", [(7, "e7"), (20, "e20")])
    expected = data(_all(store, clock))
    assert len(expected) == 97 and len(set(expected)) == 97
    by_line: list[str] = []
    while page := query(store, clock, "job", start_line=len(by_line)):
        assert len(page) <= 10
        by_line += data(page)
    assert by_line == expected
    by_ms: list[str] = []
    last_ms = 0
    while page := query(store, clock, "job", start_ms=last_ms):
        assert len(page) <= 10
        by_ms += data(page)
        last_ms = page[-1].timestamp_ms
    assert by_ms == expected
    by_seq: list[str] = []
    cursor = -1
    while page := query(store, clock, "job", after_seq=cursor):
        assert len(page) == 10 or len(by_seq) + len(page) == 97  # cursor pages are exact
        by_seq += data(page)
        cursor = page[-1].seq
    assert by_seq == expected


def _all(store: LogStore, clock: Clock) -> list[LogLine]:
    out: list[LogLine] = []
    cursor = -1
    while page := query(store, clock, "job", after_seq=cursor):
        out += page
        cursor = page[-1].seq
    return out


def test_one_millisecond_longer_than_a_page_is_cut_at_the_page(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock, page=Page(lines=10, bytes=1000))
    log = store.open("job")
    stamped(log, "stdout", [(0, f"o{i:02d}") for i in range(30)] + [(1, "next")])
    assert data(query(store, clock, "job")) == [f"o{i:02d}" for i in range(10)]
    assert data(query(store, clock, "job", max_lines=4)) == [f"o{i:02d}" for i in range(10)]
    assert data(query(store, clock, "job", start_line=10)) == [f"o{i:02d}" for i in range(10, 20)]
    # the byte bound cuts the group too
    stamped(log, "stderr", [(5, "z" * 400) for _ in range(5)])
    assert len(query(store, clock, "job", start_ms=T0 // MS + 4)) == 2


def test_group_look_ahead_is_bounded_by_the_group(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    n = 100_000
    # ten lines a millisecond, and one millisecond of 3000 lines in the middle
    stamps = [T0 + (i // 10) * MS + i for i in range(n)]
    big = T0 + 5000 * MS
    stamps[50_000:53_000] = [big + i for i in range(3000)]
    stamps[53_000:] = [max(s, big + MS) for s in stamps[53_000:]]
    log.append_batch("stdout", stamps, [b"line %06d" % i for i in range(n)])
    result(clock, log.flush())
    before = store.bytes_read
    lines = query(store, clock, "job", start_ms=T0 // MS + 4999, max_lines=5)
    assert len(lines) == 3000 and lines[0].data == "line 050000"
    budget = (3000 + 1024) * (24 + 12) + 20_000  # the group, and at most a block of 1024 lines more
    assert store.bytes_read - before < budget
    before = store.bytes_read
    lines = query(store, clock, "job", start_ms=T0 // MS + 4999, max_lines=5, regex="5")
    assert lines[0].data == "line 050000" and all("5" in x.data for x in lines)
    assert {x.timestamp_ms for x in lines} == {big // MS}
    assert store.bytes_read - before < budget


# -- the model: FetchLogs semantics as the contract states them ------------------------------


def model_answer(entries: list[tuple[str, int, str, int]], q: LogQuery) -> list[tuple[int, str, str, int]]:
    """entries: (source, stored timestamp_ns, data, seq)."""
    import re

    rows = [(ts // MS, seq, ts, src, d) for src, ts, d, seq in entries if q.sources is None or src in q.sources]
    rows.sort()
    if q.start_line >= 0:
        rows = rows[q.start_line :]
    else:
        rows = rows[q.start_line :] if -q.start_line <= len(rows) else rows
    if q.start_ms > 0:
        rows = [r for r in rows if r[0] > q.start_ms]
    if q.end_ms > 0:
        rows = [r for r in rows if r[0] <= q.end_ms]
    if q.after_seq is not None:
        keys = {r[1]: (r[0], r[1]) for r in all_rows(entries, q)}
        key = keys.get(q.after_seq)
        if key is None:
            before = [k for s, k in keys.items() if s < q.after_seq]
            key = max(before) if before else None
        if key is not None:
            rows = [r for r in rows if (r[0], r[1]) > key]
    if q.regex:
        rx = re.compile(q.regex)
        rows = [r for r in rows if rx.search(r[4])]
    if q.max_lines > 0 and len(rows) > q.max_lines:
        answer = rows[: q.max_lines]
        last_ms = answer[-1][0]
        if q.after_seq is None and rows[q.max_lines][0] == last_ms:
            # The group rule: never split the answer's last millisecond.
            kept = [r for r in answer if r[0] != last_ms]
            answer = kept or [r for r in rows if r[0] == last_ms]
        rows = answer
    return [(r[2], r[3], r[4], r[1]) for r in rows]


def all_rows(entries: list[tuple[str, int, str, int]], q: LogQuery) -> list[tuple[int, int]]:
    return [(ts // MS, seq) for src, ts, _, seq in entries if q.sources is None or src in q.sources]


SOURCE = st.sampled_from(["stdout", "stderr", "build", "error"])
APPEND = st.tuples(
    SOURCE,
    st.one_of(  # steps back now and then; often stays within a millisecond (groups)
        st.integers(min_value=-2 * MS, max_value=3 * MS),
        st.integers(min_value=0, max_value=1000),
    ),
    st.sampled_from(["a", "b", "ab", "ba", "c", "", "abc", "xyz"]),
    st.booleans(),  # settle (write a batch) after it
)
QUERY = st.builds(
    LogQuery,
    regex=st.sampled_from(["", "a", "^b", "c$", "a|x", "^$", "b+"]),
    start_line=st.integers(min_value=-30, max_value=30),
    start_ms=st.one_of(st.just(0), st.integers(min_value=T0 // MS - 2, max_value=T0 // MS + 40)),
    end_ms=st.one_of(st.just(0), st.integers(min_value=T0 // MS - 2, max_value=T0 // MS + 40)),
    max_lines=st.integers(min_value=-1, max_value=8),
    sources=st.one_of(st.none(), st.frozensets(SOURCE)),
    after_seq=st.one_of(st.none(), st.integers(min_value=-1, max_value=40)),
)


# (no pytest.mark.parametrize with @given: pytest-twisted rewraps the shared function)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    small_rank=st.sampled_from([0, 2, 4096]),  # exercise each way of finding start_line
    appends=st.lists(APPEND, max_size=35),
    queries=st.lists(QUERY, min_size=1, max_size=6),
)
def test_query_matches_the_model(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    small_rank: int,
    appends: list[tuple[str, int, str, bool]],
    queries: list[LogQuery],
) -> None:
    monkeypatch.setattr(query_module, "_SMALL_RANK", small_rank)
    clock = Clock()
    store = make_store(tmp_path_factory.mktemp("model"), clock)
    log = store.open("job")
    entries: list[tuple[str, int, str, int]] = []
    now = T0
    last: dict[str, int] = {}
    for seq, (source, step, text, write) in enumerate(appends):
        now += step
        log.append(source, text, now)
        stored = max(now, last.get(source, now))  # a source's timestamps never go back
        last[source] = stored
        entries.append((source, stored, text, seq))
        if write:
            settle(clock)
    for q in queries:
        got = [(x.timestamp_ns, x.source, x.data, x.seq) for x in query(store, clock, "job", **q.__dict__)]
        assert got == model_answer(entries, q), q


# -- polling clients get every line exactly once (the served high-water mark) ---------------------


def poll(store: LogStore, clock: Clock, cursor: int, max_lines: int = 100) -> list[LogLine]:
    return query(store, clock, "job", start_ms=cursor, max_lines=max_lines)


def test_a_late_line_is_stored_after_what_was_served(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    stamped(log, "stdout", [(10, "o1"), (11, "o2")])
    served = poll(store, clock, 0)
    assert data(served) == ["o1", "o2"]
    cursor = served[-1].timestamp_ms
    # stderr's pipe was slower: a line stamped before what was served arrives now
    log.append_batch("stderr", [T0 + 5 * MS + 123], [b"late"])
    log.append_batch("stdout", [T0 + 11 * MS + 999, T0 + 12 * MS + 7], [b"o3", b"o4"])
    lines = poll(store, clock, cursor)
    assert [(x.data, x.timestamp_ns) for x in lines] == [
        ("late", T0 + 12 * MS),  # moved to the millisecond after the mark, no sub-ms part
        ("o3", T0 + 12 * MS),
        ("o4", T0 + 12 * MS + 7),
    ]
    assert log.shifted_lines == 2
    # the order among the moved lines is their arrival order (seq)
    assert [x.seq for x in lines] == [2, 3, 4]


def test_without_a_query_nothing_is_moved(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    stamped(log, "stdout", [(10, "o1")])
    settle(clock)
    log.append_batch("stderr", [T0 + 5 * MS + 123], [b"late"])
    assert [(x.data, x.timestamp_ns) for x in query(store, clock, "job")] == [
        ("late", T0 + 5 * MS + 123),
        ("o1", T0 + 10 * MS),
    ]
    assert log.shifted_lines == 0


def test_a_reopened_log_puts_new_lines_after_the_stored_ones(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    stamped(log, "stdout", [(10, "o1")])
    assert data(poll(store, clock, 0)) == ["o1"]
    result(clock, log.close())
    assert data(poll(store, clock, 0)) == ["o1"]  # a closed job: read from disk
    # Reopened (a restarted worker follows the job again): every stored line may
    # have been served, so the mark starts at the newest one.
    again = store.open("job")
    again.append_batch("stderr", [T0 + 5 * MS], [b"early"])
    assert [(x.data, x.timestamp_ns) for x in query(store, clock, "job")] == [
        ("o1", T0 + 10 * MS),
        ("early", T0 + 11 * MS),
    ]
    assert again.shifted_lines == 1


class QueuedPool:
    """A BlockingPool stand-in that holds every call until the test runs it, in the
    order the test picks: any interleaving of query reads and batch writes."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self.queue.append((lambda: f(*args, **kwargs), d))
        return d

    def run_one(self, index: int) -> None:
        call, d = self.queue.pop(index)
        try:
            value = call()
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(value)


class PollingClient:
    """The clients' loop: FetchLogs with start_ms = the last timestamp seen."""

    def __init__(self, store: LogStore, max_lines: int, regex: str = "") -> None:
        self.store = store
        self.max_lines = max_lines
        self.regex = regex
        self.cursor = 0
        self.seen: list[LogLine] = []
        self.in_flight = False
        self.answers: list[int] = []

    def poll(self) -> None:
        if self.in_flight:
            return
        self.in_flight = True
        d = self.store.query("job", LogQuery(regex=self.regex, start_ms=self.cursor, max_lines=self.max_lines))
        d.addCallback(self._answered)

    def _answered(self, lines: list[LogLine]) -> None:
        self.in_flight = False
        self.answers.append(len(lines))
        self.seen += lines
        if lines:
            self.cursor = lines[-1].timestamp_ms


def check_exactly_once(seen: list[LogLine], sent: dict[str, list[tuple[int, bytes]]]) -> None:
    """Every sent line seen once, each source in order; timestamps only moved
    forward, and a moved one to a whole millisecond."""
    for source, rows in sent.items():
        got = [x for x in seen if x.source == source]
        assert [x.data for x in got] == [d.decode() for _, d in rows], source
        for line, (stamp, _) in zip(got, rows, strict=True):
            assert line.timestamp_ns >= stamp
            assert line.timestamp_ns == stamp or line.timestamp_ns % MS == 0


BURST = st.tuples(
    st.sampled_from(["stdout", "stderr"]),
    st.integers(min_value=0, max_value=2),  # milliseconds since the previous burst
    st.integers(min_value=1, max_value=6),  # lines
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bursts=st.lists(BURST, min_size=1, max_size=25), max_lines=st.integers(1, 5), script=st.data())
def test_polling_clients_get_every_line_once_under_any_interleaving(
    tmp_path_factory: pytest.TempPathFactory,
    bursts: list[tuple[str, int, int]],
    max_lines: int,
    script: st.DataObject,
) -> None:
    clock = Clock()
    pool = QueuedPool()
    store = LogStore(tmp_path_factory.mktemp("poll"), pool, clock)  # type: ignore[arg-type]
    log = store.open("job")
    # What the container printed: per stream, in order, many lines a millisecond.
    sent: dict[str, list[tuple[int, bytes]]] = {"stdout": [], "stderr": []}
    chunks: dict[str, list[tuple[list[int], list[bytes]]]] = {"stdout": [], "stderr": []}
    now = T0
    for number, (source, step, count) in enumerate(bursts):
        now += step * MS + 17
        rows = [(now + i, b"%s %d.%d" % (source.encode(), number, i)) for i in range(count)]
        sent[source] += rows
        chunks[source].append(([s for s, _ in rows], [d for _, d in rows]))
    # Each stream arrives in order, the two in any interleaving (separate pipes).
    clients = [PollingClient(store, max_lines), PollingClient(store, max_lines + 3, regex=r"\.[02468]$")]

    def busy() -> bool:
        return bool(pool.queue or clock.getDelayedCalls() or any(c.in_flight for c in clients))

    def step_any() -> None:
        if pool.queue:
            pool.run_one(0)
        else:
            calls: list[Any] = list(clock.getDelayedCalls())
            clock.advance(max(0.0, min(c.getTime() for c in calls) - clock.seconds()))

    for _ in range(300):
        if not (chunks["stdout"] or chunks["stderr"]):
            break
        action = script.draw(st.sampled_from(["stdout", "stderr", "pool", "clock", "poll", "poll2"]))
        if action in chunks:
            if chunks[action]:
                log.append_batch(action, *chunks[action].pop(0))
        elif action == "pool":
            if pool.queue:
                pool.run_one(script.draw(st.integers(0, len(pool.queue) - 1)))
        elif action == "clock":
            calls = list(clock.getDelayedCalls())
            if calls:
                clock.advance(max(0.0, min(c.getTime() for c in calls) - clock.seconds()))
        else:
            clients[action == "poll2"].poll()
    for source, rest in chunks.items():
        for stamps, lines in rest:
            log.append_batch(source, stamps, lines)
    while busy():
        step_any()
    if script.draw(st.booleans()):
        log.close()  # the job ended: its log is read from disk from now on
        while busy():
            step_any()
    # The final polls, once everything is stored: until one answers nothing.
    for client in clients:
        while True:
            client.poll()
            while busy():
                step_any()
            if not client.answers[-1]:
                break
    check_exactly_once(clients[0].seen, sent)
    even = {s: [r for r in rows if r[1][-1] in b"02468"] for s, rows in sent.items()}
    check_exactly_once(clients[1].seen, even)


# -- deleting ----------------------------------------------------------------------------------------


def test_delete(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    add(log, "stdout", ["a"])
    result(clock, log.flush())
    add(log, "stdout", ["pending"])
    result(clock, store.delete("job"))
    assert not (tmp_path / "job").exists()
    assert query(store, clock, "job") == []
    assert store.line_count("job") == 0
    log.append("stdout", "after delete: dropped")
    settle(clock)
    assert not (tmp_path / "job").exists()
    fresh = store.open("job")
    add(fresh, "stdout", ["new"])
    lines = query(store, clock, "job")
    assert [(x.data, x.seq) for x in lines] == [("new", 0)]
    result(clock, store.delete("never-existed"))


# -- on the real reactor and pool ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_real_pool_appends_while_querying(tmp_path: Path, blocking_pool: Any) -> None:
    from twisted.internet import reactor

    store = LogStore(tmp_path, blocking_pool, reactor)
    log = store.open("job")
    total = 0
    for batch in range(50):
        stamps = [T0 + (total + i) * 1000 for i in range(2000)]
        log.append_batch("stdout", stamps, [b"%d" % (total + i) for i in range(2000)])
        total += 2000
        if batch % 10 == 0:
            tail = await store.query("job", LogQuery(start_line=-1))
            assert tail and tail[-1].data == str(total - 1)
    await log.flush()
    lines = await store.query("job", LogQuery())
    assert [int(x.data) for x in lines] == list(range(total))
    assert [x.seq for x in lines] == list(range(total))
    await log.close()
    reopened = LogStore(tmp_path, blocking_pool, reactor)
    assert len(await reopened.query("job", LogQuery(regex="^99"))) == len(
        [i for i in range(total) if str(i).startswith("99")]
    )
    await reopened.delete("job")
    assert not os.path.exists(tmp_path / "job")


@pytest_twisted.ensureDeferred
async def test_real_pool_queries_while_the_cap_rolls(tmp_path: Path, blocking_pool: Any) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    store = LogStore(tmp_path, blocking_pool, reactor, max_stream_bytes=64 * 1024)
    log = store.open("job")
    total = 0
    for _ in range(60):
        log.append_batch(
            "stdout", [T0 + (total + i) * 1000 for i in range(300)], [b"%d" % (total + i) for i in range(300)]
        )
        total += 300
        lines = await store.query("job", LogQuery())
        numbers = [int(x.data) for x in lines if not x.data.startswith("[fluster:")]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
        assert sum(x.data.startswith("[fluster:") for x in lines) <= 1
        await deferLater(reactor, 0.001, lambda: None)
    await store.close_all()
    lines = await LogStore(tmp_path, blocking_pool, reactor).query("job", LogQuery(start_line=-1))
    assert [x.data for x in lines] == [str(total - 1)]
    assert store.line_count("job") > 0


@pytest_twisted.ensureDeferred
async def test_real_pool_polling_clients_get_every_line_once(tmp_path: Path, blocking_pool: Any) -> None:
    """Bursts of stdout lines with stderr lines that reach the store a few bursts
    late, while clients poll the way existing clients do, on real threads."""
    import random

    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    store = LogStore(tmp_path, blocking_pool, reactor, batch_delay_s=0.002)
    log = store.open("job")
    rng = random.Random(7)
    sent: dict[str, list[tuple[int, bytes]]] = {"stdout": [], "stderr": []}
    done = False

    async def produce() -> None:
        nonlocal done
        late: list[tuple[int, bytes]] = []
        for burst in range(400):
            base = T0 + burst * 250_000  # four bursts a millisecond
            rows = [(base + i, b"o%d.%d" % (burst, i)) for i in range(rng.randint(1, 40))]
            sent["stdout"] += rows
            log.append_batch("stdout", [s for s, _ in rows], [d for _, d in rows])
            late.append((base + 5, b"e%d" % burst))
            while late and (len(late) > 12 or rng.random() < 0.3):  # stderr lags 0-3 ms behind
                stamp, line = late.pop(0)
                sent["stderr"].append((stamp, line))
                log.append_batch("stderr", [stamp], [line])
            await deferLater(reactor, 0.0005 * rng.random(), lambda: None)
        for stamp, line in late:
            sent["stderr"].append((stamp, line))
            log.append_batch("stderr", [stamp], [line])
        await log.flush()
        done = True

    async def client(max_lines: int, regex: str = "") -> list[LogLine]:
        cursor = 0
        seen: list[LogLine] = []
        while True:
            finished = done
            lines = await store.query("job", LogQuery(regex=regex, start_ms=cursor, max_lines=max_lines))
            seen += lines
            if lines:
                cursor = lines[-1].timestamp_ms
            elif finished:
                return seen
            await deferLater(reactor, 0.001, lambda: None)

    from twisted.internet.defer import gatherResults

    polling = [Deferred.fromCoroutine(client(n, regex)) for n, regex in ((7, ""), (50, ""), (3, "^e"))]
    await produce()
    everyone, more, errors = await gatherResults(polling)
    check_exactly_once(everyone, sent)
    check_exactly_once(more, sent)
    check_exactly_once(errors, {"stdout": [], "stderr": sent["stderr"]})
    assert log.shifted_lines > 0  # the late lines were there, and were moved
    await log.close()


def test_a_failed_write_loses_its_batch_only(tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store(tmp_path, clock)
    log = store.open("job")
    add(log, "stdout", ["before"])
    result(clock, log.flush())
    real = disk._write_all
    calls = []

    def full_disk(fd: int, data: Any) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the data went in, the index does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(disk, "_write_all", full_disk)
    add(log, "stdout", ["lost 1", "lost 2"], start_ms=1)
    with pytest.raises(LogWriteError) as info:
        result(clock, log.flush())
    assert "No space left" in str(info.value)
    add(log, "stdout", ["after"], start_ms=2)
    result(clock, log.flush())
    assert [(x.data, x.seq) for x in query(store, clock, "job")] == [("before", 0), ("after", 3)]
    result(clock, log.close())
    assert data(query(make_store(tmp_path, clock), clock, "job")) == ["before", "after"]
