"""Log throughput and FetchLogs latency on the real Docker engine.

    .venv/bin/python bench/logs.py [--lines 1000000] [--queries 50]

1. A container runs ``seq 1 N``; a LogFollower (``docker logs -f --timestamps``
   into a LogStore on a temporary directory) follows it from its start. Measured:
   container start -> all lines stored and synced (end to end), and container exit
   -> stored. Then, in the same run, ``docker logs <id> > /dev/null`` and
   ``docker logs --timestamps <id> > /dev/null`` of the same container, and, for
   reference, the docker CLI alone following a second such container from its
   start (``docker logs -f --timestamps > /dev/null``).
   Goal: end to end <= 1.5 x ``docker logs``.
2. FetchLogs ``start_line=-100`` (tail 100) at N lines: median and p95 over the
   queries, on the open job and on a fresh LogStore (a restarted worker).
   Goal: median <= 20 ms.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import docker  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

from fluster_worker.common.threads import BlockingPool  # noqa: E402
from fluster_worker.logs import LogFollower, LogQuery, LogStore  # noqa: E402

IMAGE = "fluster-base:bookworm"


def timed_docker_logs(docker_path: str, cid: str, *extra: str) -> float:
    started = time.perf_counter()
    subprocess.run([docker_path, "logs", *extra, cid], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


async def tail_latencies(store: LogStore, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        lines = await store.query("bench", LogQuery(start_line=-100))
        out.append((time.perf_counter() - started) * 1000)
        assert len(lines) == 100
    return out


def summary(ms: list[float]) -> str:
    ordered = sorted(ms)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"median {statistics.median(ms):.2f} ms, p95 {p95:.2f} ms, min {ordered[0]:.2f} ms (n={len(ms)})"


async def main(reactor: Any, n: int, queries: int) -> None:
    docker_path = shutil.which("docker")
    assert docker_path, "docker CLI not found"
    client = docker.from_env()
    pool = BlockingPool(reactor, "bench-files", max_threads=8)
    pool.startService()
    docker_pool = BlockingPool(reactor, "bench-docker", max_threads=4)
    docker_pool.startService()
    root = Path(tempfile.mkdtemp(prefix="fluster-logs-bench-"))
    container = client.containers.create(
        IMAGE, command=["seq", "1", str(n)], tty=False, labels={"fluster-bench": "logs"}
    )
    try:
        store = LogStore(root, pool, reactor)
        job_log = store.open("bench")

        def is_running() -> Deferred[bool]:
            return docker_pool.run(lambda: client.containers.get(container.id).status == "running")

        follower = LogFollower(reactor, reactor.spawnProcess, docker_path, job_log, container.id, is_running)
        exited: list[float] = []

        def wait_exit() -> None:
            container.wait()
            exited.append(time.perf_counter())

        await docker_pool.run(container.start)
        started = time.perf_counter()
        waiting = docker_pool.run(wait_exit)
        await follower.follow()
        stored = time.perf_counter()
        await waiting
        assert store.line_count("bench") == n, store.line_count("bench")
        end_to_end = stored - started
        after_exit = stored - exited[0]

        plain = min(timed_docker_logs(docker_path, container.id) for _ in range(2))
        stamped = min(timed_docker_logs(docker_path, container.id, "--timestamps") for _ in range(2))

        # Reference: the docker CLI alone following a second identical container
        # from its start (what the tail process itself costs, without us).
        other = await docker_pool.run(
            lambda: client.containers.create(
                IMAGE, command=["seq", "1", str(n)], tty=False, labels={"fluster-bench": "logs"}
            )
        )
        try:

            def follow_alone() -> float:
                other.start()
                t0 = time.perf_counter()
                subprocess.run(
                    [docker_path, "logs", "--follow", "--timestamps", other.id],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=True,
                )
                return time.perf_counter() - t0

            cli_alone = await docker_pool.run(follow_alone)
        finally:
            await docker_pool.run(lambda: other.remove(force=True))

        print(f"lines: {n}")
        print(f"store end to end (container start -> stored+synced): {end_to_end:.2f} s")
        print(f"store after container exit (exit -> stored+synced): {after_exit:.2f} s")
        print(f"docker logs > /dev/null: {plain:.2f} s; with --timestamps: {stamped:.2f} s")
        print(f"ratio end to end / docker logs: {end_to_end / plain:.2f} (goal <= 1.5)")
        print(f"ratio after exit / docker logs: {after_exit / plain:.2f}")
        print(f"reference: docker logs -f --timestamps > /dev/null from container start: {cli_alone:.2f} s")

        await tail_latencies(store, 3)  # warm up
        open_ms = await tail_latencies(store, queries)
        await job_log.close()
        fresh = LogStore(root, pool, reactor)
        fresh_ms = await tail_latencies(fresh, queries)
        print(f"FetchLogs tail 100, open job: {summary(open_ms)} (goal median <= 20 ms)")
        print(f"FetchLogs tail 100, reopened store: {summary(fresh_ms)}")
        size = sum(f.stat().st_size for f in (root / "bench").iterdir())
        print(f"on disk: {size / 2**20:.1f} MiB")
    finally:
        container.remove(force=True)
        shutil.rmtree(root, ignore_errors=True)
        await pool.stopService()
        await docker_pool.stopService()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, args.lines, args.queries)))
