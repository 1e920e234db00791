"""Dispatch overhead: RunJob -> SUCCEEDED through a real worker vs bare `docker run`.

    .venv/bin/python bench/dispatch.py [--runs 10] [--jobs 50] [--concurrency 10]

Both sides run the same image (the job's, built once before timing) and the same
in-container work (the runner unpickling and calling a trivial function). The
worker side is measured from the RunJob call to GetJobStatus answering SUCCEEDED
(polled every 5 ms, or every 20 ms per client in the concurrent batch, so
that ten pollers do not load the two cores themselves), so it includes the bundle cache, the job
directory, container create/start/wait, draining the logs and removing the container.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cloudpickle  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from fluster_worker.web.rpc import cluster_pb2 as pb  # noqa: E402
from tests.jobkit import Entrypoint, make_bundle, start_worker, worker_config  # noqa: E402

DOCKER = shutil.which("docker") or "docker"


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


async def run_one(h, bundle: Path, ep: bytes, poll: float = 0.005) -> float:  # type: ignore[no-untyped-def]
    job_id = f"bench-{uuid.uuid4().hex[:10]}"
    started = time.monotonic()
    await h.client.run_job(pb.RunJobRequest(job_id=job_id, serialized_entrypoint=ep, bundle_gcs_path=str(bundle)))
    while True:
        status = await h.client.status(job_id)
        if status.state == pb.JOB_STATE_SUCCEEDED:
            return time.monotonic() - started
        if status.state in (pb.JOB_STATE_FAILED, pb.JOB_STATE_KILLED):
            raise RuntimeError(f"{job_id}: {status.error}")
        await task.deferLater(__import__("twisted.internet.reactor").internet.reactor, poll, lambda: None)


async def main(reactor, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    tmp = Path(tempfile.mkdtemp(prefix="fluster-bench-"))
    h = await start_worker(worker_config(tmp, max_concurrent_jobs=args.concurrency, retention_count=10_000))
    try:
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ep = cloudpickle.dumps(Entrypoint(trivial, (), {}))
        bundle = make_bundle(tmp / "bundle")
        warm = await run_one(h, bundle, ep)  # builds (or finds) the image
        status = await h.client.list_jobs()
        image = status.jobs[0].build_metrics.image_tag
        io_dir = tmp / "io"
        (io_dir / "out").mkdir(parents=True)
        (io_dir / "entrypoint.pkl").write_bytes(ep)

        worker_times, docker_times = [], []
        for _ in range(args.runs):  # interleaved, so load affects both alike
            worker_times.append(await run_one(h, bundle, ep))
            started = time.monotonic()
            await defer.Deferred.fromCoroutine(_thread(docker_run, image, io_dir))
            docker_times.append(time.monotonic() - started)
        w, d = statistics.median(worker_times), statistics.median(docker_times)

        started = time.monotonic()
        await defer.DeferredList(
            [defer.Deferred.fromCoroutine(_batch(h, bundle, ep, args.jobs // args.concurrency))
             for _ in range(args.concurrency)]
        )
        worker_batch = time.monotonic() - started
        docker_batch = await defer.Deferred.fromCoroutine(
            _thread(docker_run_parallel, image, io_dir, args.jobs, args.concurrency)
        )
        print(f"first job (image {'built' if warm > 5 else 'cached'}): {warm:.2f} s")
        print(f"single job, median of {args.runs}: worker {w * 1000:.0f} ms, docker run --rm {d * 1000:.0f} ms, "
              f"ratio {w / d:.2f} (goal <= 1.3)")
        ratio = worker_batch / docker_batch
        print(f"{args.jobs} jobs at concurrency {args.concurrency}: worker {worker_batch:.2f} s, "
              f"xargs -P{args.concurrency} docker run --rm {docker_batch:.2f} s, ratio {ratio:.2f} (goal <= 1.3)")
    finally:
        await h.worker.stopService()
        shutil.rmtree(tmp, ignore_errors=True)


async def _batch(h, bundle: Path, ep: bytes, count: int) -> None:  # type: ignore[no-untyped-def]
    for _ in range(count):
        # 20 ms: ten clients polling every 5 ms would load the 2 cores themselves.
        await run_one(h, bundle, ep, poll=0.02)


async def _thread(f, *args):  # type: ignore[no-untyped-def]
    from twisted.internet.threads import deferToThread

    return await deferToThread(f, *args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=10)
    parsed = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, parsed)))
