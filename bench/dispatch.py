"""Dispatch overhead: RunJob -> SUCCEEDED through a real worker vs bare `docker run`.

    .venv/bin/python bench/dispatch.py [--runs 10] [--jobs 50] [--concurrency 10] [--rounds 3] [--seen report]

Both sides run the same image (the job's, built once before timing) and the same
in-container work (the runner unpickling and calling a trivial function). The
worker side is measured from the RunJob call until SUCCEEDED is seen, so it
includes the bundle cache, the job directory, container create/start/wait,
draining the logs and removing the container.

How SUCCEEDED is seen (``--seen``):

- ``report`` (default): as the controller sees it. The worker is attached to a
  fake controller in the same process and the time is taken when its
  ReportJobState(SUCCEEDED) arrives. The worker does all of its controller
  work meanwhile (RegisterWorker, durable reports of RUNNING and SUCCEEDED).
- ``poll``: GetJobStatus polled every 5 ms (P1), or every 20 ms by each of the
  ten clients (P2). On two cores the pollers themselves (client and server in
  this process, about 500 calls a second in P2) cost about as much CPU as the
  worker's own work for the jobs, so this mode measures the RPC as much as the
  dispatch.

P1: ``--runs`` times, interleaved so that load affects both alike, one trivial job
through the worker, then one bare `docker run --rm --init` of the same image
running the same runner on the same pickle. P2: ``--rounds`` times, ``--jobs``
jobs at concurrency ``--concurrency`` (each client submits its next job once the
previous one is seen SUCCEEDED) against `xargs -P<concurrency> docker run --rm`
of as many containers, one after the other.

Prints each measure, the ratio worker / reference (P1: of the medians, and the
min / median / max of the run-by-run ratios; P2: per round, then min / median)
and the goal: P1 <= 1.15 and P2 <= 1.15 (issue 14). For each P2 round it also
prints the CPU milliseconds per job on each side (``CpuMeter``): this process
(worker and client), its reaped children (`docker logs` processes, or the
docker CLIs of the reference), dockerd and containerd.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cloudpickle  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from fluster_worker.testing.controller import FakeController  # noqa: E402
from fluster_worker.web.rpc import cluster_pb2 as pb  # noqa: E402
from tests.jobkit import Entrypoint, make_bundle, start_worker, worker_config  # noqa: E402

DOCKER = shutil.which("docker") or "docker"
GOAL = 1.15


def trivial() -> int:
    return 1


def docker_run(image: str, io_dir: Path) -> None:
    subprocess.run(
        [DOCKER, "run", "--rm", "--init", "-v", f"{io_dir}/entrypoint.pkl:/fluster/entrypoint.pkl:ro",
         "-v", f"{io_dir}/out:/fluster/out", "-w", "/fluster", image],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def docker_run_parallel(image: str, io_dir: Path, jobs: int, concurrency: int) -> float:
    args = "\n".join(str(i) for i in range(jobs))
    for i in range(jobs):  # one result directory per container, as the worker gives each job its own
        (io_dir / f"out{i}").mkdir(exist_ok=True)
    command = (
        f"xargs -P{concurrency} -I{{}} {DOCKER} run --rm --init -v {io_dir}/entrypoint.pkl:/fluster/entrypoint.pkl:ro "
        f"-v {io_dir}/out{{}}:/fluster/out -w /fluster {image} > /dev/null 2>&1"
    )
    started = time.monotonic()
    subprocess.run(["sh", "-c", command], input=args.encode(), check=True)
    return time.monotonic() - started


class _Reports(list):  # type: ignore[type-arg]
    """The fake controller's call list, which also fires a Deferred per job when
    its ReportJobState(SUCCEEDED or another terminal state) arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: dict[str, defer.Deferred[int]] = {}

    def append(self, call: Any) -> None:
        super().append(call)
        if call.method != "ReportJobState":
            return
        state = call.request.state
        if state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_KILLED, pb.JOB_STATE_WORKER_FAILED):
            d = self.waiting.pop(call.request.job_id, None)
            if d is not None:
                d.callback(state)


class Bench:
    def __init__(self, h: Any, bundle: Path, ep: bytes, seen: str, reports: _Reports | None) -> None:
        self.h, self.bundle, self.ep, self.seen, self.reports = h, bundle, ep, seen, reports

    async def run_one(self, poll: float = 0.005) -> float:
        from twisted.internet import reactor

        job_id = f"bench-{uuid.uuid4().hex[:10]}"
        ended: defer.Deferred[int] | None = None
        if self.reports is not None:
            ended = self.reports.waiting[job_id] = defer.Deferred()
        started = time.monotonic()
        await self.h.client.run_job(
            pb.RunJobRequest(job_id=job_id, serialized_entrypoint=self.ep, bundle_gcs_path=str(self.bundle))
        )
        if ended is not None:
            state = await ended
            if state != pb.JOB_STATE_SUCCEEDED:
                status = await self.h.client.status(job_id)
                raise RuntimeError(f"{job_id}: {pb.JobState.Name(state)}: {status.error}")
            return time.monotonic() - started
        while True:
            status = await self.h.client.status(job_id)
            if status.state == pb.JOB_STATE_SUCCEEDED:
                return time.monotonic() - started
            if status.state in (pb.JOB_STATE_FAILED, pb.JOB_STATE_KILLED, pb.JOB_STATE_WORKER_FAILED):
                raise RuntimeError(f"{job_id}: {status.error}")
            await task.deferLater(reactor, poll, lambda: None)

    async def batch(self, count: int) -> None:
        for _ in range(count):
            # Polling: 20 ms, ten clients polling every 5 ms would load the 2 cores themselves.
            await self.run_one(poll=0.02)


class CpuMeter:
    """CPU seconds (user + system) from /proc: this process (the worker and the
    bench's client), its reaped children (the worker's `docker logs`, or the
    reference's docker CLIs), dockerd and containerd. On two cores a batch is
    CPU-bound, so these are what its time is made of, and they move much less
    with the load of other work than wall times do."""

    def __init__(self) -> None:
        self._hz = os.sysconf("SC_CLK_TCK")
        self._engine = {name: _pid_of(name) for name in ("dockerd", "containerd")}

    def _times(self, pid: int | str) -> tuple[float, float]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0, 0.0
        own = (int(fields[11]) + int(fields[12])) / self._hz
        children = (int(fields[13]) + int(fields[14])) / self._hz
        return own, children

    def read(self) -> dict[str, float]:
        own, children = self._times("self")
        values = {"worker": own, "children": children}
        for name, pid in self._engine.items():
            values[name] = self._times(pid)[0] if pid else 0.0
        return values

    @staticmethod
    def per_job(before: dict[str, float], after: dict[str, float], jobs: int) -> str:
        return ", ".join(f"{k} {(after[k] - before[k]) / jobs * 1000:.0f}" for k in before)


def _pid_of(name: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    return int(entry.name)
            except OSError:
                continue
    return None


def _verdict(ratio: float) -> str:
    return "met" if ratio <= GOAL else "NOT met"


async def main(reactor: Any, args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fluster-bench-"))
    controller: FakeController | None = None
    reports: _Reports | None = None
    overrides: dict[str, Any] = {}
    if args.seen == "report":
        controller = FakeController(reactor)
        reports = _Reports()
        controller.calls = reports
        await controller.start()
        overrides["controller"] = f"127.0.0.1:{controller.port}"
    h = await start_worker(
        worker_config(tmp, max_concurrent_jobs=args.concurrency, retention_count=10_000, **overrides)
    )
    try:
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ep = cloudpickle.dumps(Entrypoint(trivial, (), {}))
        bench = Bench(h, make_bundle(tmp / "bundle"), ep, args.seen, reports)
        warm = await bench.run_one()  # builds (or finds) the image
        await bench.run_one()
        status = await h.client.list_jobs()
        image = status.jobs[0].build_metrics.image_tag
        io_dir = tmp / "io"
        (io_dir / "out").mkdir(parents=True)
        (io_dir / "entrypoint.pkl").write_bytes(ep)
        load_before = os.getloadavg()[0]
        print(f"first job (image {'built' if warm > 5 else 'cached'}): {warm:.2f} s; SUCCEEDED seen by {args.seen}")

        worker_times: list[float] = []
        docker_times: list[float] = []
        for _ in range(args.runs):  # interleaved, so load affects both alike
            worker_times.append(await bench.run_one())
            started = time.monotonic()
            await defer.Deferred.fromCoroutine(_thread(docker_run, image, io_dir))
            docker_times.append(time.monotonic() - started)
        w, d = statistics.median(worker_times), statistics.median(docker_times)
        pairs = sorted(a / b for a, b in zip(worker_times, docker_times, strict=True))
        p1 = w / d
        print(
            f"P1 one job, median of {args.runs}: worker {w * 1000:.0f} ms (min {min(worker_times) * 1000:.0f}), "
            f"docker run --rm {d * 1000:.0f} ms (min {min(docker_times) * 1000:.0f})"
        )
        print(
            f"P1 ratio of the medians {p1:.2f}; run by run: min {pairs[0]:.2f}, median {statistics.median(pairs):.2f}, "
            f"max {pairs[-1]:.2f}  (goal <= {GOAL}: {_verdict(p1)})"
        )

        ratios: list[float] = []
        meter = CpuMeter()
        for round_ in range(args.rounds):
            cpu_before = meter.read()
            started = time.monotonic()
            per_client = args.jobs // args.concurrency
            await defer.DeferredList(
                [defer.Deferred.fromCoroutine(bench.batch(per_client)) for _ in range(args.concurrency)]
            )
            worker_batch = time.monotonic() - started
            cpu_worker = meter.read()
            docker_batch = await defer.Deferred.fromCoroutine(
                _thread(docker_run_parallel, image, io_dir, args.jobs, args.concurrency)
            )
            cpu_docker = meter.read()
            ratios.append(worker_batch / docker_batch)
            print(
                f"P2 round {round_ + 1}, {args.jobs} jobs at concurrency {args.concurrency}: "
                f"worker {worker_batch:.2f} s, xargs -P{args.concurrency} docker run --rm {docker_batch:.2f} s, "
                f"ratio {ratios[-1]:.2f}"
            )
            print(f"   CPU ms per job, worker side: {CpuMeter.per_job(cpu_before, cpu_worker, args.jobs)}")
            print(f"   CPU ms per job, docker side: {CpuMeter.per_job(cpu_worker, cpu_docker, args.jobs)}")
        p2 = statistics.median(ratios)
        print(f"P2 ratio: min {min(ratios):.2f}, median {p2:.2f}  (goal <= {GOAL}: {_verdict(p2)})")
        print(f"load average (1 min) before/after the timed part: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    finally:
        await h.worker.stopService()
        if controller is not None:
            await controller.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def _thread(f, *args):  # type: ignore[no-untyped-def]
    from twisted.internet.threads import deferToThread

    return await deferToThread(f, *args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seen", choices=("report", "poll"), default="report")
    parsed = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, parsed)))
