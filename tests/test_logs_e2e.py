"""Job logs end to end: a worker on the real engine, FetchLogs through its RPC,
the way the existing clients call it (wire contract section 5)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from fluster_worker.testing.client import RpcError
from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import TERMINAL, Harness, entrypoint, make_bundle, start_worker, worker_config

pytestmark = pytest.mark.docker


# -- the jobs (pickled by value; they run inside the container) ---------------


def two_streams(count: int) -> None:
    import sys

    for i in range(count):
        sys.stdout.write(f"out {i}\n")
        sys.stdout.flush()
        sys.stderr.write(f"err {i}\n")
        sys.stderr.flush()


def bursts(count: int, per_burst: int, errors_per_burst: int, pause_s: float) -> None:
    """Bursts of stdout lines (many a millisecond) with stderr lines in between."""
    import sys
    import time

    n = 0
    for b in range(count):
        half = per_burst // 2
        sys.stdout.write("".join(f"out {n + i}\n" for i in range(half)))
        sys.stdout.flush()
        sys.stderr.write("".join(f"err {b}.{j}\n" for j in range(errors_per_burst)))
        sys.stderr.flush()
        sys.stdout.write("".join(f"out {n + i}\n" for i in range(half, per_burst)))
        sys.stdout.flush()
        n += per_burst
        time.sleep(pause_s)


def spaced_rows(count: int, pause_s: float) -> None:
    """One line at a time, a few milliseconds apart (one millisecond each)."""
    import time

    for i in range(count):
        print(f"row {i} {'even' if i % 2 == 0 else 'odd'}", flush=True)
        time.sleep(pause_s)


def long_lines(count: int, length: int) -> None:
    for _ in range(count):
        print("a" * length + "b", flush=True)
    print("aaaa", flush=True)


def exit_with(code: int) -> None:
    import sys

    print(f"exiting with {code}", flush=True)
    sys.exit(code)


def no_final_newline() -> None:
    import sys

    sys.stdout.write("first line\n")
    sys.stdout.write("the last line has no newline")
    sys.stdout.flush()


# -- helpers ------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_worker(worker_config(tmp_path))
    yield h
    await h.worker.stopService()


def job(bundle: Path, fn: Any, *args: Any, job_id: str = "") -> pb.RunJobRequest:
    return pb.RunJobRequest(
        job_id=job_id or f"logs-{uuid.uuid4().hex[:8]}",
        serialized_entrypoint=entrypoint(fn, *args),
        bundle_gcs_path=f"file://{bundle}",
    )


def of(entries: list[pb.LogEntry], source: str) -> list[str]:
    return [e.data for e in entries if e.source == source]


def keys(entries: list[pb.LogEntry]) -> list[tuple[int, str, str]]:
    return [(e.timestamp_ms, e.source, e.data) for e in entries]


def first_lines_of_matching(entries: list[pb.LogEntry], match: Any, max_lines: int) -> list[pb.LogEntry]:
    """What FetchLogs answers for a regex and max_lines over ``entries`` (the
    whole log): the first matching ones, never splitting the last millisecond."""
    matching = [e for e in entries if match(e.data)]
    answer = matching[:max_lines]
    if len(matching) > max_lines and matching[max_lines].timestamp_ms == answer[-1].timestamp_ms:
        last = answer[-1].timestamp_ms
        answer = [e for e in answer if e.timestamp_ms != last] or [e for e in matching if e.timestamp_ms == last]
    return answer


# -- tests --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stdout_and_stderr_are_separate_and_each_in_order(harness: Harness, tmp_path: Path) -> None:
    status = await harness.run(job(make_bundle(tmp_path), two_streams, 300))
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    entries = await harness.client.fetch_logs(status.job_id)
    assert of(entries, "stdout") == [f"out {i}" for i in range(300)]
    assert of(entries, "stderr") == [f"err {i}" for i in range(300)]
    assert [e.timestamp_ms for e in entries] == sorted(e.timestamp_ms for e in entries)
    assert {e.source for e in entries} <= {"stdout", "stderr", "build"}


@pytest_twisted.ensureDeferred
async def test_polling_client_gets_every_line_exactly_once_while_the_job_runs(harness: Harness, tmp_path: Path) -> None:
    # 20,000 stdout lines in bursts of 100 (about a millisecond each) with stderr
    # lines in between, slow enough overall that the client mostly polls at the
    # head, where lines of one millisecond reach the worker in separate reads.
    count, per_burst, errors_per_burst = 200, 100, 5
    request = job(make_bundle(tmp_path), bursts, count, per_burst, errors_per_burst, 0.04)
    await harness.client.run_job(request)
    job_id = request.job_id
    # The clients' loop: start_ms = the last timestamp seen, max_lines = 100, every
    # ~20 ms, until the job is terminal and one more poll brings nothing new.
    seen: list[pb.LogEntry] = []
    cursor = 0
    polls = 0
    during_run = 0  # polls that brought lines while the job was still running
    deadline = time.monotonic() + 300
    while True:
        state = (await harness.client.status(job_id)).state
        entries = await harness.client.fetch_logs(job_id, start_ms=cursor, max_lines=100)
        polls += 1
        assert all(e.timestamp_ms > cursor for e in entries)
        seen += entries
        if entries:
            cursor = entries[-1].timestamp_ms
            during_run += state == pb.JOB_STATE_RUNNING
        elif state in TERMINAL:
            break
        assert time.monotonic() < deadline, f"still polling after {polls} polls, job {pb.JobState.Name(state)}"
        await deferLater(reactor, 0.02, lambda: None)
    assert state == pb.JOB_STATE_SUCCEEDED
    assert during_run > 10  # the loop really ran alongside the job
    assert of(seen, "stdout") == [f"out {i}" for i in range(count * per_burst)]
    assert of(seen, "stderr") == [f"err {b}.{j}" for b in range(count) for j in range(errors_per_burst)]
    # ... and every other line too (build), once: the polls add up to the whole log
    everything = await harness.client.fetch_logs(job_id)
    assert sorted(keys(seen)) == sorted(keys(everything))
    # the data gave the group rule something to do: lines that share a millisecond
    per_ms: dict[int, int] = {}
    for e in everything:
        per_ms[e.timestamp_ms] = per_ms.get(e.timestamp_ms, 0) + 1
    assert max(per_ms.values()) > 1


@pytest_twisted.ensureDeferred
async def test_tail_and_regex_with_max_lines(harness: Harness, tmp_path: Path) -> None:
    status = await harness.run(job(make_bundle(tmp_path), spaced_rows, 60, 0.005))
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    c = harness.client
    everything = await c.fetch_logs(status.job_id)
    assert of(everything, "stdout") == [f"row {i} {'even' if i % 2 == 0 else 'odd'}" for i in range(60)]
    tail = await c.fetch_logs(status.job_id, start_line=-5)
    assert [e.data for e in tail] == [f"row {i} {'even' if i % 2 == 0 else 'odd'}" for i in range(55, 60)]
    assert keys(tail) == keys(everything[-5:])
    # a regex (a search, not a full match) with max_lines: the first matching entries
    even = await c.fetch_logs(status.job_id, regex="even$", max_lines=10)
    assert all(e.data.endswith("even") for e in even)
    assert keys(even) == keys(first_lines_of_matching(everything, lambda d: d.endswith("even"), 10))
    assert len(even) <= 10
    assert [e.data for e in even][:2] == ["row 0 even", "row 2 even"]
    # each row has its own millisecond (5 ms apart): the group rule does not apply
    rows = [e.timestamp_ms for e in everything if e.source == "stdout"]
    if len(set(rows)) == len(rows):
        assert [e.data for e in even] == [f"row {i} even" for i in range(0, 20, 2)]
    # the tail of the matching entries
    last_odd = await c.fetch_logs(status.job_id, regex="odd", start_line=-4)
    assert [e.data for e in last_odd] == ["row 57 odd", "row 59 odd"]
    # a bad regex is the caller's error, in one line
    with pytest.raises(RpcError) as e:
        await c.fetch_logs(status.job_id, regex="(unclosed")
    assert e.value.code == "invalid_argument"
    assert "regex" in e.value.message and "\n" not in e.value.message


@pytest_twisted.ensureDeferred
async def test_catastrophic_regex_on_long_lines_answers_quickly(harness: Harness, tmp_path: Path) -> None:
    status = await harness.run(job(make_bundle(tmp_path), long_lines, 6, 200_000))
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    everything = await harness.client.fetch_logs(status.job_id)
    # Docker cuts lines into 16 KiB pieces; each comes back as the one line it was
    assert of(everything, "stdout") == ["a" * 200_000 + "b"] * 6 + ["aaaa"]
    # A backtracking engine would never answer (2^200000 ways to split the a's);
    # RE2 takes milliseconds. The deadline only stops the test from hanging.
    search = Deferred.fromCoroutine(harness.client.fetch_logs(status.job_id, regex="(a+)+$"))
    matches = await search.addTimeout(120, reactor)  # type: ignore[arg-type]
    assert [e.data for e in matches] == ["aaaa"]


@pytest_twisted.ensureDeferred
async def test_a_last_line_without_newline_is_stored(harness: Harness, tmp_path: Path) -> None:
    status = await harness.run(job(make_bundle(tmp_path), no_final_newline))
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    entries = await harness.client.fetch_logs(status.job_id)
    assert of(entries, "stdout") == ["first line", "the last line has no newline"]


@pytest_twisted.ensureDeferred
async def test_logs_outlive_the_container_and_the_worker(tmp_path: Path, docker_client: Any) -> None:
    config = worker_config(tmp_path)
    h = await start_worker(config)
    try:
        status = await h.run(job(make_bundle(tmp_path), two_streams, 50, job_id="kept-logs"))
        assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
        labels = [f"fluster.worker_id={h.worker.worker_id}", "fluster.job_id=kept-logs"]
        assert docker_client.containers.list(all=True, filters={"label": labels}) == []  # gone
        before = await h.client.fetch_logs("kept-logs")
        assert of(before, "stdout") == [f"out {i}" for i in range(50)]
        assert of(before, "stderr") == [f"err {i}" for i in range(50)]
        tail_before = await h.client.fetch_logs("kept-logs", start_line=-3)
    finally:
        await h.worker.stopService()

    h2 = await start_worker(config)
    try:
        after = await h2.client.fetch_logs("kept-logs")
        assert keys(after) == keys(before)
        assert keys(await h2.client.fetch_logs("kept-logs", start_line=-3)) == keys(tail_before)
        since = before[len(before) // 2].timestamp_ms
        assert keys(await h2.client.fetch_logs("kept-logs", start_ms=since)) == keys(
            [e for e in before if e.timestamp_ms > since]
        )
    finally:
        await h2.worker.stopService()


@pytest_twisted.ensureDeferred
async def test_build_lines_come_first_under_their_source(harness: Harness, tmp_path: Path) -> None:
    status = await harness.run(job(make_bundle(tmp_path), two_streams, 3))
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    entries = await harness.client.fetch_logs(status.job_id)
    build = [i for i, e in enumerate(entries) if e.source == "build"]
    output = [i for i, e in enumerate(entries) if e.source in ("stdout", "stderr")]
    assert build and output and max(build) < min(output), keys(entries)
    assert any("bundle" in entries[i].data for i in build), keys(entries)  # e.g. "reading bundle ..."
    assert of(entries, "error") == []


@pytest_twisted.ensureDeferred
async def test_a_failed_job_says_why_in_an_error_entry(harness: Harness, tmp_path: Path) -> None:
    status = await harness.run(job(make_bundle(tmp_path), exit_with, 3))
    assert status.state == pb.JOB_STATE_FAILED
    entries = await harness.client.fetch_logs(status.job_id)
    assert of(entries, "error") == ["Exit code: 3"]
    assert entries[-1].source == "error"  # after the job's own output
    assert of(entries, "stdout") == ["exiting with 3"]


@pytest_twisted.ensureDeferred
async def test_a_missing_bundle_is_named_in_an_error_entry(harness: Harness, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-bundle.zip"
    status = await harness.run(job(missing, two_streams, 3), timeout=60)
    assert status.state == pb.JOB_STATE_FAILED
    assert "no-such-bundle.zip" in status.error
    entries = await harness.client.fetch_logs(status.job_id)
    errors = of(entries, "error")
    assert errors and any("no-such-bundle.zip" in e for e in errors), keys(entries)
    assert of(entries, "stdout") == []


@pytest_twisted.ensureDeferred
async def test_after_seq_pages_through_everything_exactly_once(harness: Harness, tmp_path: Path) -> None:
    # Our own cursor (FetchLogsFilter.after_seq, field 1000): exact even inside a
    # millisecond, so pages of 7 cut bursts anywhere and still lose nothing.
    status = await harness.run(job(make_bundle(tmp_path), bursts, 20, 50, 3, 0.0))
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    whole = await harness.client.fetch_logs(status.job_id)
    pages: list[pb.LogEntry] = []
    cursor: int | None = None
    for _ in range(len(whole)):  # a cursor that does not move fails here, not by hanging
        fields: dict[str, Any] = {"max_lines": 7}
        if cursor is not None:
            fields["after_seq"] = cursor
        page = await harness.client.fetch_logs(status.job_id, **fields)
        assert len(page) <= 7
        if not page:
            break
        pages.extend(page)
        cursor = page[-1].seq
    else:
        raise AssertionError("paging did not end")
    assert keys(pages) == keys(whole)
    assert len(of(pages, "stdout")) == 1000 and len(of(pages, "stderr")) == 60
