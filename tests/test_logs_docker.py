"""LogFollower and LogStore on the real Docker engine (json-file log driver)."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from fluster_worker.logs import JobLog, LogFollower, LogQuery, LogStore, Page

pytestmark = pytest.mark.docker
reactor: Any = _reactor
LABEL = {"fluster-test": "logs"}


class Containers:
    """Creates containers from the base image, removes them afterwards."""

    def __init__(self, client: Any, image: str, pool: Any) -> None:
        self.client = client
        self.image = image
        self.pool = pool
        self.ids: list[str] = []

    async def run(self, command: list[str]) -> str:
        def create() -> str:
            c = self.client.containers.create(self.image, command=command, tty=False, labels=LABEL)
            self.ids.append(c.id)
            c.start()
            return str(c.id)

        return await self.pool.run(create)

    def is_running(self, cid: str) -> Callable[[], Deferred[bool]]:
        def check() -> bool:
            try:
                return bool(self.client.containers.get(cid).status == "running")
            except Exception:
                return False

        return lambda: self.pool.run(check)

    async def wait(self, cid: str) -> None:
        await self.pool.run(lambda: self.client.containers.get(cid).wait())

    async def remove(self, cid: str) -> None:
        await self.pool.run(lambda: self.client.containers.get(cid).remove(force=True))

    def cleanup(self) -> None:
        for cid in self.ids:
            try:
                self.client.containers.get(cid).remove(force=True)
            except Exception:
                pass


@pytest.fixture
def containers(docker_client: Any, base_image: str, blocking_pool: Any) -> Any:
    made = Containers(docker_client, base_image, blocking_pool)
    yield made
    made.cleanup()


@pytest.fixture
def docker_path() -> str:
    path = shutil.which("docker")
    assert path, "the docker CLI is needed"
    return path


def follower(job_log: JobLog, cid: str, containers: Containers, docker_path: str, **kw: Any) -> LogFollower:
    return LogFollower(reactor, reactor.spawnProcess, docker_path, job_log, cid, containers.is_running(cid), **kw)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


async def all_lines(store: LogStore, job_id: str, source: str) -> list[str]:
    lines = await store.query(job_id, LogQuery(sources=frozenset({source})))
    return [x.data for x in lines]


@pytest_twisted.ensureDeferred
async def test_stdout_and_stderr_separated_in_order(
    tmp_path: Path, blocking_pool: Any, containers: Containers, docker_path: str
) -> None:
    store = LogStore(tmp_path, blocking_pool, reactor)
    job_log = store.open("job")
    script = (
        "import sys\n"
        "for i in range(300):\n"
        " print('out', i, flush=True)\n"
        " print('err', i, file=sys.stderr, flush=True)\n"
    )
    cid = await containers.run(["python3", "-c", script])
    await follower(job_log, cid, containers, docker_path).follow()
    assert await all_lines(store, "job", "stdout") == [f"out {i}" for i in range(300)]
    assert await all_lines(store, "job", "stderr") == [f"err {i}" for i in range(300)]
    everything = await store.query("job", LogQuery())
    assert len(everything) == 600
    assert [x.timestamp_ms for x in everything] == sorted(x.timestamp_ms for x in everything)
    # the log outlives the container, and the worker
    await containers.remove(cid)
    await job_log.close()
    again = LogStore(tmp_path, blocking_pool, reactor)
    assert await all_lines(again, "job", "stderr") == [f"err {i}" for i in range(300)]
    # (lines of one millisecond are in arrival order, which the two pipes may mix)
    assert await again.query("job", LogQuery(start_line=-2)) == everything[-2:]


@pytest_twisted.ensureDeferred
async def test_partial_last_line_and_long_lines(
    tmp_path: Path, blocking_pool: Any, containers: Containers, docker_path: str
) -> None:
    store = LogStore(tmp_path, blocking_pool, reactor)
    job_log = store.open("job")
    script = (
        "import sys\n"
        "sys.stdout.write('é' * 30000 + '\\n')\n"  # 60000 bytes: Docker's 16 KiB pieces
        "sys.stdout.write('x' * 150000 + '\\n')\n"  # over max_line_bytes
        "sys.stdout.write('no newline')\n"
    )
    cid = await containers.run(["python3", "-c", script])
    await follower(job_log, cid, containers, docker_path, max_line_bytes=100_000).follow()
    assert await all_lines(store, "job", "stdout") == [
        "é" * 30000,
        "x" * 100_000 + " [fluster: line truncated, 50000 bytes dropped]",
        "no newline",
    ]


@pytest_twisted.ensureDeferred
async def test_printf_without_newline(
    tmp_path: Path, blocking_pool: Any, containers: Containers, docker_path: str
) -> None:
    store = LogStore(tmp_path, blocking_pool, reactor)
    job_log = store.open("job")
    cid = await containers.run(["sh", "-c", "printf 'no newline'"])
    await follower(job_log, cid, containers, docker_path).follow()
    assert await all_lines(store, "job", "stdout") == ["no newline"]


@pytest_twisted.ensureDeferred
async def test_killed_tail_loses_and_repeats_nothing(
    tmp_path: Path, blocking_pool: Any, containers: Containers, docker_path: str
) -> None:
    store = LogStore(tmp_path, blocking_pool, reactor)
    job_log = store.open("job")
    n = 60_000
    script = (
        "import sys, time\n"
        f"for i in range({n}):\n"
        "    print(i)\n"
        "    if i % 500 == 0:\n"
        "        print('e', i, file=sys.stderr, flush=True)\n"
        "        sys.stdout.flush()\n"
        "        time.sleep(0.03)\n"
    )
    cid = await containers.run(["python3", "-c", script])
    tail = follower(job_log, cid, containers, docker_path)
    done = tail.follow()
    pids = []
    for fraction in (0.25, 0.5, 0.75):
        await until(
            lambda f=fraction: done.called or (job_log.line_count > f * n and tail.pid is not None),  # type: ignore[misc]
            60,
            f"{fraction:.0%} of the lines",
        )
        if done.called:
            break
        pid = tail.pid
        assert pid is not None
        pids.append(pid)
        os.kill(pid, signal.SIGKILL)
        # a new tail, or (the container done) the restarted tail already finished
        await until(lambda p=pid: tail.pid not in (None, p) or done.called, 30, "the restarted tail")  # type: ignore[misc]
    await done
    assert len(pids) >= 2, "the tail was never killed mid-job"
    assert tail.attempts >= len(pids) + 1
    assert len(set(pids)) == len(pids)
    assert await all_lines(store, "job", "stdout") == [str(i) for i in range(n)]
    assert await all_lines(store, "job", "stderr") == [f"e {i}" for i in range(0, n, 500)]


@pytest_twisted.ensureDeferred
async def test_a_million_lines(tmp_path: Path, blocking_pool: Any, containers: Containers, docker_path: str) -> None:
    # One answer past the default page (100,000 entries) holds them all.
    store = LogStore(tmp_path, blocking_pool, reactor, page=Page(lines=2_000_000, bytes=2**30))
    job_log = store.open("job")
    cid = await containers.run(["seq", "1", "1000000"])
    await follower(job_log, cid, containers, docker_path).follow()
    await containers.remove(cid)
    lines = await store.query("job", LogQuery())
    assert len(lines) == 1_000_000
    assert [x.data for x in lines] == [str(i) for i in range(1, 1_000_001)]
    assert [x.seq for x in lines] == list(range(1_000_000))
    tail = await store.query("job", LogQuery(start_line=-3))
    assert [x.data for x in tail] == ["999998", "999999", "1000000"]
    await job_log.close()
    assert [x.data for x in await LogStore(tmp_path, blocking_pool, reactor).query("job", LogQuery(start_line=-1))] == [
        "1000000"
    ]
