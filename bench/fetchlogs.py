"""HealthCheck while big FetchLogs pages are served (issue 13), on a real twistd
worker holding a finished job with a multi-million-line log (written straight in
the LogStore's format, see tests/bigworker.py).

Reference: HealthCheck answered by the same idle worker, probed at the same pace.
Under load: each round runs five FetchLogs at once (a proto page with max_lines 0,
a proto page with max_lines 2^31-1 from line 1,000,000, a JSON page with max_lines
-5, a JSON page of regex \\C, a proto regex that matches nothing and scans the
whole log) while HealthCheck is probed every 5 ms until they are all answered.

Goal: HealthCheck p90 under load <= 100 ms (the issue's figure).

    .venv/bin/python bench/fetchlogs.py [--lines 2000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fluster_worker.web.rpc import cluster_pb2 as pb  # noqa: E402
from tests.bigworker import Answer, Caller, rss_bytes, write_big_log  # noqa: E402

TWISTD = str(Path(sys.executable).parent / "twistd")
PACE_S = 0.005


def start(root: Path, worker_id: str) -> tuple[subprocess.Popen[bytes], str]:
    log = root / "twistd.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUSTER_WORKER_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [
            TWISTD, "-n", "--pidfile=", f"--logfile={log}", "fluster-worker",
            "--listen", "tcp:0:interface=127.0.0.1", "--state-dir", str(root / "state"),
            "--cache-dir", str(root / "cache"), "--worker-id", worker_id, "--ca-bundle", "",
        ],
        cwd=root,
        env=env,
    )
    deadline = time.monotonic() + 60
    while True:
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text() if log.exists() else "")
        if match:
            return proc, f"http://127.0.0.1:{match.group(1)}"
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not start:\n{log.read_text() if log.exists() else ''}")
        time.sleep(0.05)


def proto(**fields: object) -> Callable[[Caller], Answer]:
    body = pb.FetchLogsRequest(job_id="big", filter=pb.FetchLogsFilter(**fields)).SerializeToString()  # type: ignore[arg-type]
    return lambda caller: caller.rpc("FetchLogs", body, "application/proto")


def as_json(**fields: object) -> Callable[[Caller], Answer]:
    body = json.dumps({"jobId": "big", "filter": fields}).encode()
    return lambda caller: caller.rpc("FetchLogs", body)


CALLS = {
    "proto, max_lines 0": proto(max_lines=0),
    "proto, max_lines 2^31-1": proto(max_lines=2**31 - 1, start_line=1_000_000),
    "json, max_lines -5": as_json(maxLines=-5),
    "json, regex \\C": as_json(regex="\\C"),
    "proto, regex matching nothing": proto(regex="\\Cxyzzy"),
}


def probe(url: str, until: Callable[[], bool]) -> list[float]:
    caller = Caller(url)
    seen = []
    try:
        while not until():
            answer = caller.rpc("HealthCheck", b"{}")
            assert answer.status == 200, answer
            seen.append(answer.seconds)
            time.sleep(PACE_S)
    finally:
        caller.close()
    return seen


def fetch(url: str, name: str, pages: dict[str, list[float]]) -> None:
    caller = Caller(url)
    try:
        answer = CALLS[name](caller)
        assert answer.status in (200, 504), (name, answer.status, answer.body[:200])
        pages[name].append(answer.seconds)
    finally:
        caller.close()


def all_done(threads: list[threading.Thread]) -> Callable[[], bool]:
    return lambda: not any(t.is_alive() for t in threads)


def summary(seconds: list[float]) -> tuple[float, float, float]:
    ordered = sorted(seconds)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.9)], ordered[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-fetchlogs-"))
    proc = None
    try:
        started = time.monotonic()
        write_big_log(root / "state", "big", "bench-fetchlogs", args.lines)
        print(f"{args.lines:,} log lines written in {time.monotonic() - started:.1f} s")
        proc, url = start(root, "bench-fetchlogs")
        idle_until = time.monotonic() + 2.0
        idle = probe(url, lambda: time.monotonic() > idle_until)
        loaded: list[float] = []
        pages: dict[str, list[float]] = {name: [] for name in CALLS}
        for _ in range(args.rounds):
            threads = [threading.Thread(target=fetch, args=(url, name, pages)) for name in CALLS]
            for thread in threads:
                thread.start()
            loaded += probe(url, all_done(threads))
            for thread in threads:
                thread.join()
        _, peak = rss_bytes(proc.pid)
        i50, i90, imax = summary(idle)
        l50, l90, lmax = summary(loaded)
        print(f"HealthCheck idle x{len(idle)}: p50 {i50 * 1e3:.1f} ms, p90 {i90 * 1e3:.1f} ms, max {imax * 1e3:.1f} ms")
        print(f"HealthCheck under load x{len(loaded)}: p50 {l50 * 1e3:.1f} ms, p90 {l90 * 1e3:.1f} ms, "
              f"max {lmax * 1e3:.1f} ms (p90 ratio {l90 / i90:.1f})")
        for name, seconds in pages.items():
            print(f"  {name}: {statistics.median(seconds):.2f} s median over {len(seconds)}")
        print(f"peak RSS {peak >> 20} MiB")
        print(f"goal: p90 under load <= 100 ms: {'met' if l90 <= 0.1 else 'NOT met'}")
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
