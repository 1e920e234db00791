"""RPC speed: the worker against a minimal Klein route and the existing worker's
stack, GetJobStatus under a log flood, ListJobs and /api with 1,000 jobs, RSS.

    .venv/bin/python bench/rpc.py [--rounds 3] [--seconds 5] [--flood-jobs 10]
                                  [--flood-seconds 20] [--finished 1000]
                                  [--only health,flood,list]

Needs the Docker engine, the ``fluster-base:bookworm`` image, ``wrk`` (Debian's;
``scripts/ensure-wrk.sh``) and the ``bench`` extra (uvicorn and Starlette). The
load comes from ``wrk`` (keep-alive connections, one thread); every server is a
process of its own, started by the bench (``rpc_servers.py``, ``twistd
fluster-worker`` through tests/workerproc.py).

1. HealthCheck at 32 connections, ``--rounds`` rounds of ``--seconds`` each,
   interleaved (so that the machine's load falls on all alike): the worker; a
   minimal Klein POST route answering the same message (the ceiling of the
   worker's own stack); uvicorn + Starlette + connect-python's WSGI application
   (the existing worker's stack); the same with connect-python's ASGI
   application (for reference). Goals: worker >= 0.9 x Klein and >= 3 x the
   existing stack.
2. GetJobStatus of a running job at 8 connections: idle, then while
   ``--flood-jobs`` jobs print numbered lines as fast as they can (at most
   ``--flood-seconds`` each; each returns how many it printed). Goal: p99 <= 50
   ms. Then every job's stored stdout is read back (FetchLogs, paged by
   ``after_seq``) and compared with what it printed: goal 0 lost, 0 duplicated.
3. With ``--finished`` finished jobs in the state dir: ListJobs in proto and in
   JSON, ``/api/jobs`` and ``/api/v1/jobs``, one connection, p50/p99; the first
   (cold) ListJobs of each codec; HealthCheck p99 at 8 connections while 2
   connections fetch ListJobs in JSON. Goal: JSON <= 2 x proto. Then the
   worker's RSS (goal <= 120 MB).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cloudpickle  # noqa: E402
import docker  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402

from fluster_worker.jobs.model import JobRecord, JobSpec, JobState  # noqa: E402
from fluster_worker.testing.client import WorkerClient  # noqa: E402
from fluster_worker.web.rpc import cluster_pb2 as pb  # noqa: E402
from tests.jobkit import entrypoint, make_bundle  # noqa: E402
from tests.workerproc import WorkerProcess  # noqa: E402

SERVICE = "/fluster.cluster.WorkerService/"
WRK = shutil.which("wrk") or "wrk"


# -- the load generator ---------------------------------------------------------------


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int

    def __str__(self) -> str:
        errors = f", {self.errors} errors" if self.errors else ""
        return f"{self.rps:,.0f} req/s, p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms{errors}"


def _lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b}" for b in data) + '"'


def wrk(url: str, connections: int, seconds: float, body: bytes | None = None,
        content_type: str = "application/proto", tmp: Path | None = None) -> Load:
    """``wrk`` on ``url`` (POST ``body`` when given, else GET)."""
    args = [WRK, "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--latency", "--timeout", "10s"]
    if body is not None:
        script = (tmp or Path(tempfile.gettempdir())) / f"wrk-{uuid.uuid4().hex[:8]}.lua"
        script.write_text(
            f'wrk.method = "POST"\nwrk.body = {_lua_string(body)}\n'
            f'wrk.headers["Content-Type"] = "{content_type}"\n'
        )
        args += ["-s", str(script)]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    percentiles = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)\s*$", out, re.M))
    errors = 0
    for match in re.finditer(r"Non-2xx or 3xx responses:\s+(\d+)|Socket errors:.*?(\d+)", out):
        errors += int(match.group(1) or 0)
    return Load(rps, _ms(percentiles["50"]), _ms(percentiles["99"]), errors)


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f}, min {min(values):.2f}, max {max(values):.2f}"


# -- servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Reference:
    """A reference server of rpc_servers.py, as a process."""

    def __init__(self, kind: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "rpc_servers.py"), kind, str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{kind} did not listen")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def pause(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def job(bundle: Path, ep: bytes, job_id: str) -> pb.RunJobRequest:
    return pb.RunJobRequest(job_id=job_id, serialized_entrypoint=ep, bundle_gcs_path=f"file://{bundle}")


async def wait_state(client: WorkerClient, job_id: str, states: set[int], timeout: float = 600) -> pb.JobStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = await client.status(job_id, include_result=True)
        if status.state in states:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"{job_id} still {pb.JobState.Name(status.state)}")
        await pause(0.1)


TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_KILLED, pb.JOB_STATE_WORKER_FAILED}


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024  # type: ignore[union-attr]


# -- the jobs -------------------------------------------------------------------------------


def flood(limit: int, seconds: float) -> int:
    """Print 0, 1, 2... one per line, as fast as possible, until ``limit`` lines or
    ``seconds`` have passed; return how many."""
    import sys
    import time

    end = time.monotonic() + seconds
    write = sys.stdout.write
    i = 0
    while i < limit and time.monotonic() < end:
        n = min(2000, limit - i)
        write("".join([f"{j}\n" for j in range(i, i + n)]))
        i += n
    sys.stdout.flush()
    return i


def sleeper(seconds: float) -> int:
    import time

    time.sleep(seconds)
    return 0


# -- 1. HealthCheck ------------------------------------------------------------------------


async def health(tmp: Path, rounds: int, seconds: float) -> None:
    worker = WorkerProcess(tmp / "health")
    references = {"klein": Reference("klein"), "wsgi": Reference("wsgi"), "asgi": Reference("asgi")}
    try:
        await worker.start()
        urls = {"worker": worker.url, **{k: r.url for k, r in references.items()}}
        for url in urls.values():  # warm up
            wrk(url + SERVICE + "HealthCheck", 32, 1, b"", tmp=tmp)
        rows: dict[str, list[Load]] = {k: [] for k in urls}
        for r in range(rounds):
            for name, url in urls.items():
                rows[name].append(wrk(url + SERVICE + "HealthCheck", 32, seconds, b"", tmp=tmp))
            w, k, e, a = (rows[n][-1].rps for n in ("worker", "klein", "wsgi", "asgi"))
            print(f"1. round {r + 1}: HealthCheck, 32 connections: worker {rows['worker'][-1]}; "
                  f"Klein {rows['klein'][-1]}; existing (uvicorn+Starlette+connect WSGI) {rows['wsgi'][-1]}; "
                  f"uvicorn+Starlette+connect ASGI {rows['asgi'][-1]}; worker/Klein {w / k:.2f} (goal >= 0.9), "
                  f"worker/existing {w / e:.2f} (goal >= 3), worker/ASGI {w / a:.2f}", flush=True)

        def ratios(other: str) -> list[float]:
            return [w.rps / o.rps for w, o in zip(rows["worker"], rows[other], strict=True)]

        print(f"1. HealthCheck req/s over {rounds} rounds: " + "; ".join(
            f"{name} {summary([x.rps for x in loads])}" for name, loads in rows.items()), flush=True)
        print(f"1. ratios over {rounds} rounds: worker/Klein {summary(ratios('klein'))}; worker/existing (WSGI) "
              f"{summary(ratios('wsgi'))}; worker/ASGI {summary(ratios('asgi'))}", flush=True)
    finally:
        for reference in references.values():
            reference.close()
        worker.close(docker.from_env())


# -- 2. GetJobStatus under a log flood ---------------------------------------------------


async def all_stdout(client: WorkerClient, job_id: str) -> list[str]:
    out: list[str] = []
    after = -1
    while True:
        entries = await client.fetch_logs(job_id, after_seq=after, max_lines=50_000)
        if not entries:
            return out
        out.extend(e.data for e in entries if e.source == "stdout")
        after = entries[-1].seq


async def flood_section(tmp: Path, bundle: Path, jobs: int, flood_seconds: float, seconds: float) -> None:
    worker = WorkerProcess(tmp / "flood", "--max-concurrent-jobs", str(jobs + 1))
    try:
        client = await worker.start()
        await client.run_job(job(bundle, entrypoint(sleeper, 3600.0), "watched"))
        await wait_state(client, "watched", {pb.JOB_STATE_RUNNING})
        ask = pb.GetJobStatusRequest(job_id="watched").SerializeToString()
        target = worker.url + SERVICE + "GetJobStatus"
        wrk(target, 8, 1, ask, tmp=tmp)
        idle = wrk(target, 8, seconds, ask, tmp=tmp)
        print(f"2. GetJobStatus, 8 connections, idle: {idle}", flush=True)
        ids = [f"flood-{i}" for i in range(jobs)]
        for job_id in ids:
            await client.run_job(job(bundle, entrypoint(flood, 2_000_000, flood_seconds), job_id))
        for job_id in ids:
            await wait_state(client, job_id, {pb.JOB_STATE_RUNNING} | TERMINAL)
        await pause(1.0)
        flooded = wrk(target, 8, seconds, ask, tmp=tmp)
        still = [(await client.status(j)).state for j in ids].count(pb.JOB_STATE_RUNNING)
        print(f"2. GetJobStatus, 8 connections, while {jobs} jobs print as fast as they can: {flooded} "
              f"(goal p99 <= 50 ms; {still} of {jobs} still printing at the end)", flush=True)
        printed = stored = lost = duplicated = 0
        for job_id in ids:
            status = await wait_state(client, job_id, TERMINAL)
            count = cloudpickle.loads(status.serialized_result) if status.serialized_result else 0
            lines = await all_stdout(client, job_id)
            printed += count
            stored += len(lines)
            seen = [int(x) for x in lines if x.isdigit()]
            lost += len(set(range(count)) - set(seen))
            duplicated += len(seen) - len(set(seen))
        print(f"2. lines printed {printed:,}, stored {stored:,}: {lost} lost, {duplicated} stored twice "
              f"(goal 0 and 0)", flush=True)
        watched = await client.status("watched")
        if watched.state != pb.JOB_STATE_RUNNING:
            print(f"2. the watched job ended {pb.JobState.Name(watched.state)}: {watched.error}", flush=True)
        else:
            await client.kill("watched", term_timeout_ms=100)
    finally:
        worker.close(docker.from_env())


# -- 3. ListJobs and /api with many jobs ------------------------------------------------------


def finished_record(worker_id: str, i: int, now_ms: int) -> dict[str, Any]:
    record = JobRecord(
        job_id=f"done-{i:04d}", attempt_id=0, worker_id=worker_id, spec=JobSpec(), submitted_at_ms=now_ms - 60_000,
        phases=[("pending", now_ms - 60_000)], arrival=i + 100, ports={"http": 30000 + i % 100},
    )
    record.move(JobState.BUILDING, now_ms - 59_000)
    record.move(JobState.RUNNING, now_ms - 58_000)
    if i % 5 == 4:
        record.exit_code = 1
        record.error = f"Exit code: 1: ValueError: job {i} failed on purpose"
        record.move(JobState.FAILED, now_ms - 1_000)
    else:
        record.move(JobState.SUCCEEDED, now_ms - 1_000)
    return record.to_json()


def timed_post(url: str, body: bytes, content_type: str) -> tuple[float, int]:
    started = time.perf_counter()
    out = subprocess.run(["curl", "-s", "-o", "-", "-H", f"Content-Type: {content_type}", "--data-binary", "@-", url],
                         input=body, capture_output=True, check=True).stdout
    return (time.perf_counter() - started) * 1000, len(out)


async def listing(tmp: Path, finished: int, seconds: float) -> None:
    worker = WorkerProcess(tmp / "list", "--retention-count", str(finished + 100))
    try:
        await worker.start()
        await worker.terminate()
        jobs_dir = worker.root / "state" / "jobs"
        now_ms = int(time.time() * 1000)
        for i in range(finished):
            directory = jobs_dir / f"done-{i:04d}"
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "record.json").write_text(json.dumps(finished_record(worker.worker_id, i, now_ms)))
        client = await worker.start()
        assert worker.proc is not None
        while len((await client.list_jobs()).jobs) < finished:  # loaded (this first call warms proto)
            await pause(0.05)
        base = worker.url
        cold_ms, json_size = timed_post(base + SERVICE + "ListJobs", b"{}", "application/json")
        print(f"3. first ListJobs in JSON after the start ({finished} statuses to encode): {cold_ms:.0f} ms "
              f"(curl process included)", flush=True)
        proto_size = len((await client.list_jobs()).SerializeToString())
        loads = {
            "ListJobs proto": wrk(base + SERVICE + "ListJobs", 1, seconds, b"", tmp=tmp),
            "ListJobs JSON": wrk(base + SERVICE + "ListJobs", 1, seconds, b"{}", "application/json", tmp=tmp),
            "/api/jobs": wrk(base + "/api/jobs", 1, seconds, tmp=tmp),
            "/api/v1/jobs": wrk(base + "/api/v1/jobs", 1, seconds, tmp=tmp),
        }
        for name, load in loads.items():
            print(f"3. {name}, {finished} jobs, one connection: {load}", flush=True)
        p = loads["ListJobs proto"].p50_ms
        print(f"3. sizes: proto {proto_size / 1000:.0f} KB, JSON {json_size / 1000:.0f} KB; p50 ratios to ListJobs "
              f"proto: ListJobs JSON {loads['ListJobs JSON'].p50_ms / p:.2f}, /api/jobs "
              f"{loads['/api/jobs'].p50_ms / p:.2f}, /api/v1/jobs {loads['/api/v1/jobs'].p50_ms / p:.2f} "
              f"(goal <= 2)", flush=True)
        background = subprocess.Popen(
            [WRK, "-t1", "-c2", f"-d{round(seconds) + 2}s", "-s", str(_script(tmp, b"{}", "application/json")),
             base + SERVICE + "ListJobs"], stdout=subprocess.DEVNULL,
        )
        time.sleep(1)
        during = wrk(base + SERVICE + "HealthCheck", 8, seconds, b"", tmp=tmp)
        background.wait()
        print(f"3. HealthCheck, 8 connections, while 2 connections fetch ListJobs JSON: {during}", flush=True)
        print(f"3. RSS with {finished} finished jobs kept, after these calls: {rss_mb(worker.proc.pid):.0f} MB "
              f"(goal <= 120 MB)", flush=True)
    finally:
        worker.close(docker.from_env())


def _script(tmp: Path, body: bytes, content_type: str) -> Path:
    script = tmp / f"wrk-{uuid.uuid4().hex[:8]}.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {_lua_string(body)}\n'
                      f'wrk.headers["Content-Type"] = "{content_type}"\n')
    return script


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fluster-bench-rpc-"))
    only = set(args.only.split(",")) if args.only else {"health", "flood", "list"}
    try:
        if "health" in only:
            await health(tmp, args.rounds, args.seconds)
        if "flood" in only:
            bundle = make_bundle(tmp / "bundle")
            await flood_section(tmp, bundle, args.flood_jobs, args.flood_seconds, args.seconds)
        if "list" in only:
            await listing(tmp, args.finished, args.seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--flood-jobs", type=int, default=10)
    parser.add_argument("--flood-seconds", type=float, default=20.0)
    parser.add_argument("--finished", type=int, default=1000)
    parser.add_argument("--only", default="")
    parsed = parser.parse_args()
    task.react(lambda _reactor: defer.Deferred.fromCoroutine(main(parsed)))
