"""Kill latency: KillJob of a job that ignores SIGTERM vs bare `docker stop`.

    .venv/bin/python bench/kill.py [--runs 10] [--grace-ms 1000]

Both sides run the same image (the job's, built once before timing) and the same
process: Python that ignores SIGTERM, says "ready" and sleeps. The worker side is
measured from the KillJob call (``term_timeout_ms`` = the grace) to its answer,
which comes once the job is KILLED: SIGTERM, the grace, SIGKILL, the exit seen,
the logs stored and closed, the container removed. The bare side is ``docker stop
-t <grace>`` then ``docker rm`` of a ``docker run -d --init`` container. Runs
alternate, so that load affects both alike. The tests only check that a kill
never comes before the grace; this is where "how soon after" is measured.
Goal: median worker time over the grace <= 1.5 x docker's.
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

from twisted.internet import defer, task  # noqa: E402

from fluster_worker.web.rpc import cluster_pb2 as pb  # noqa: E402
from tests.jobkit import entrypoint, make_bundle, start_worker, until, worker_config  # noqa: E402

DOCKER = shutil.which("docker") or "docker"
STUBBORN = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: None)\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


def stubborn() -> None:
    import signal
    import time

    signal.signal(signal.SIGTERM, lambda *_: None)
    print("ready", flush=True)
    time.sleep(600)


def docker_kill_once(image: str, grace_s: int) -> float:
    cid = subprocess.run(
        [DOCKER, "run", "-d", "--init", image, "python3", "-c", STUBBORN],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    try:
        deadline = time.monotonic() + 60
        while "ready" not in subprocess.run([DOCKER, "logs", cid], capture_output=True, text=True).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"container {cid[:12]} never got ready")
            time.sleep(0.05)
        started = time.monotonic()
        subprocess.run([DOCKER, "stop", "-t", str(grace_s), cid], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([DOCKER, "rm", cid], check=True, stdout=subprocess.DEVNULL)
        return time.monotonic() - started
    finally:
        subprocess.run([DOCKER, "rm", "-f", cid], capture_output=True)


async def worker_kill_once(h, bundle: Path, ep: bytes, grace_ms: int) -> float:  # type: ignore[no-untyped-def]
    job_id = f"bench-kill-{uuid.uuid4().hex[:8]}"
    await h.client.run_job(pb.RunJobRequest(job_id=job_id, serialized_entrypoint=ep, bundle_gcs_path=str(bundle)))

    async def ready() -> bool:
        return any(e.data == "ready" for e in await h.client.fetch_logs(job_id))

    await until(ready, 300, f"{job_id} to get ready")
    started = time.monotonic()
    await h.client.kill(job_id, term_timeout_ms=grace_ms)
    elapsed = time.monotonic() - started
    status = await h.client.status(job_id)
    if status.state != pb.JOB_STATE_KILLED or status.exit_code != 137:
        raise RuntimeError(f"{job_id}: {pb.JobState.Name(status.state)} exit {status.exit_code}")
    return elapsed


async def main(reactor, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    tmp = Path(tempfile.mkdtemp(prefix="fluster-bench-kill-"))
    h = await start_worker(worker_config(tmp, retention_count=10_000))
    grace_s = args.grace_ms / 1000
    try:
        bundle = make_bundle(tmp / "bundle")
        ep = entrypoint(stubborn)
        await worker_kill_once(h, bundle, ep, args.grace_ms)  # builds (or finds) the image
        image = (await h.client.list_jobs()).jobs[0].build_metrics.image_tag
        worker_times, docker_times = [], []
        for _ in range(args.runs):
            worker_times.append(await worker_kill_once(h, bundle, ep, args.grace_ms))
            docker_times.append(await _thread(docker_kill_once, image, round(grace_s)))
        w, d = statistics.median(worker_times), statistics.median(docker_times)
        print(f"kill with a {args.grace_ms} ms grace, median of {args.runs}: "
              f"worker {w * 1000:.0f} ms (max {max(worker_times) * 1000:.0f}), "
              f"docker stop + rm {d * 1000:.0f} ms (max {max(docker_times) * 1000:.0f})")
        over_w, over_d = w - grace_s, d - grace_s
        print(f"over the grace: worker {over_w * 1000:.0f} ms, docker {over_d * 1000:.0f} ms, "
              f"ratio {over_w / over_d:.2f} (goal <= 1.5)")
    finally:
        await h.worker.stopService()
        shutil.rmtree(tmp, ignore_errors=True)


async def _thread(f, *args):  # type: ignore[no-untyped-def]
    from twisted.internet.threads import deferToThread

    return await deferToThread(f, *args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--grace-ms", type=int, default=1000)
    parsed = parser.parse_args()
    if parsed.grace_ms % 1000:
        parser.error("--grace-ms must be whole seconds (docker stop -t takes seconds)")
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, parsed)))
