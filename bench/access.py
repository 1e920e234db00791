"""The access gate's cost: HealthCheck through wrk against the same app without
and with the gate (``web/guard``), in-process on FakeWorker, interleaved rounds.

    .venv/bin/python bench/access.py [--rounds 6] [--seconds 4]

Prints requests/s per round and the ratio of the medians (gated / bare); the
goal is >= 0.95 (the gate costs at most 5% of the cheapest call).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.web.server import Site

from fluster_worker.testing.dashboard import FakeWorker
from fluster_worker.web.app import build_resource
from fluster_worker.web.guard.gate import AccessPolicy
from fluster_worker.web.guard.hosts import HostAllowlist

reactor: Any = _reactor
GOAL = 0.95


def serve(gated: bool) -> Any:
    worker = FakeWorker()
    access = (
        AccessPolicy(
            hosts=HostAllowlist([], dynamic=lambda: [worker.advertised_address()]),
            container_networks=lambda: ("172.17.0.0/16",),
        )
        if gated
        else None
    )
    return reactor.listenTCP(0, Site(build_resource(worker, access=access)), interface="127.0.0.1")


def on_reactor(f: Any) -> Any:
    done = threading.Event()
    box: list[Any] = []
    reactor.callFromThread(lambda: (box.append(f()), done.set()))
    done.wait()
    return box[0]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("bench/access.py needs wrk", file=sys.stderr)
        return 2
    script = Path(tempfile.mkdtemp()) / "health.lua"
    script.write_text('wrk.method = "POST"\nwrk.body = "{}"\nwrk.headers["Content-Type"] = "application/json"\n')
    results: dict[bool, list[float]] = {False: [], True: []}

    def run() -> None:
        try:
            for _ in range(args.rounds):
                for gated in (False, True):
                    port = on_reactor(lambda gated=gated: serve(gated))
                    url = f"http://127.0.0.1:{port.getHost().port}/fluster.cluster.WorkerService/HealthCheck"
                    out = subprocess.run(
                        ["wrk", "-t1", "-c8", f"-d{args.seconds}s", "-s", str(script), url],
                        capture_output=True, text=True, check=True,
                    ).stdout
                    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
                    assert match is not None, out
                    results[gated].append(float(match.group(1)))
                    on_reactor(port.stopListening)
        finally:
            reactor.callFromThread(reactor.stop)

    threading.Thread(target=run, daemon=True).start()
    reactor.run()
    bare, gated = statistics.median(results[False]), statistics.median(results[True])
    print("HealthCheck req/s, bare: ", [round(x) for x in results[False]])
    print("HealthCheck req/s, gated:", [round(x) for x in results[True]])
    ratio = gated / bare
    print(f"ratio gated/bare (medians): {ratio:.3f} (goal >= {GOAL})")
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
