"""Drop-in for the existing peers, on the real engine with the FakeController and
the official Connect client (connect-python, what the Controller and clients use):

- a parent job, and its child ``<parent>/child`` submitted while the parent runs;
- GetJobStatus, FetchLogs and KillJob, the dashboard page and the ``/api`` routes
  of a hierarchical id;
- ``a/b`` and ``a__b`` side by side, sharing no file;
- a job raising ``ValueError("boom")`` ends FAILED with both "Exit code: 1" and
  "ValueError: boom" in its error, shown escaped on the dashboard.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import cloudpickle
import pytest
import pytest_twisted
import treq
from cluster_connect import WorkerServiceClientSync
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from fluster_worker.common.jobnames import job_key
from fluster_worker.testing.controller import FakeController
from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import Harness, entrypoint, make_bundle, start_worker, until, worker_config

pytestmark = pytest.mark.docker

T = TypeVar("T")


# -- the jobs (pickled by value; they run in the container) ------------------------


def wait_for_go(name: str) -> str:
    """Runs until the test drops /workdir/go, then says who it was."""
    import time

    print(f"{name} started", flush=True)
    deadline = time.monotonic() + 240
    while not os.path.exists("/workdir/go"):
        if time.monotonic() > deadline:
            raise TimeoutError("no go")
        time.sleep(0.05)
    return f"{name} done"


def leave_a_trace() -> dict[str, Any]:
    """Writes a file named after its job, then reports what it can see."""
    import time

    job_id = os.environ["FLUSTER_JOB_ID"]
    with open("/workdir/trace.txt", "w") as f:
        f.write(job_id)
    print(f"trace of {job_id}", flush=True)
    deadline = time.monotonic() + 240
    while not os.path.exists("/workdir/go"):
        if time.monotonic() > deadline:
            raise TimeoutError("no go")
        time.sleep(0.05)
    with open("/workdir/trace.txt") as f:
        trace = f.read()
    return {"job_id": job_id, "trace": trace, "workdir": sorted(os.listdir("/workdir"))}


def print_forever() -> None:
    import time

    i = 0
    while True:
        print(f"tick {i}", flush=True)
        i += 1
        time.sleep(0.1)


def raise_boom(message: str) -> None:
    raise ValueError(message)


# -- plumbing ------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def controller() -> AsyncIterator[FakeController]:
    fake = FakeController(reactor)
    await fake.start(interface="0.0.0.0")
    yield fake
    await fake.stop()


@pytest_twisted.async_yield_fixture
async def harness(controller: FakeController, tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_worker(worker_config(tmp_path, controller=f"127.0.0.1:{controller.port}"))
    yield h
    await h.worker.stopService()


async def official(harness: Harness, call: Callable[[WorkerServiceClientSync], T]) -> T:
    """One call of the official (blocking) client, off the reactor thread."""

    def run() -> T:
        with WorkerServiceClientSync(harness.url, timeout_ms=10_000) as client:
            return call(client)

    return await deferToThread(run)


def job_request(job_id: str, bundle: Path, payload: bytes) -> pb.RunJobRequest:
    # The fields the existing Controller sends (wire contract section 6).
    return pb.RunJobRequest(
        job_id=job_id,
        serialized_entrypoint=payload,
        environment=pb.EnvironmentConfig(workspace="/home/user/project"),
        bundle_gcs_path=f"file://{bundle}",
        resources=pb.ResourceSpec(cpu=1, memory="512m"),
        attempt_id=0,
    )


def go(harness: Harness, job_id: str) -> None:
    (harness.worker.store.workdir(job_id) / "go").write_text("go")


async def get_json(url: str) -> tuple[int, Any]:
    response = await treq.get(url)
    return response.code, json.loads(await response.text("utf-8"))


def reports_of(fake: FakeController, job_id: str) -> list[int]:
    return [r.state for r in fake.reports if r.job_id == job_id]


# -- the tests -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_parent_and_its_child_both_succeed(
    harness: Harness, controller: FakeController, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    parent = f"hier-{uuid.uuid4().hex[:6]}"
    child = f"{parent}/child"
    accepted = await official(
        harness, lambda c: c.run_job(job_request(parent, bundle, entrypoint(wait_for_go, "parent")))
    )
    assert accepted.job_id == parent and accepted.state == pb.JOB_STATE_PENDING
    await harness.wait_state(parent, {pb.JOB_STATE_RUNNING})

    # The child arrives while its parent runs, named as the existing clients name it.
    accepted = await official(
        harness, lambda c: c.run_job(job_request(child, bundle, entrypoint(wait_for_go, "child")))
    )
    assert accepted.job_id == child and accepted.state == pb.JOB_STATE_PENDING
    await harness.wait_state(child, {pb.JOB_STATE_RUNNING})
    assert (await harness.client.status(parent)).state == pb.JOB_STATE_RUNNING
    go(harness, child)
    status = await harness.wait_state(child)
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    assert cloudpickle.loads(status.serialized_result) == "child done"
    assert (await harness.client.status(parent)).state == pb.JOB_STATE_RUNNING
    go(harness, parent)
    status = await harness.wait_state(parent)
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    assert cloudpickle.loads(status.serialized_result) == "parent done"

    async def reported() -> bool:
        return len(reports_of(controller, child)) >= 2 and len(reports_of(controller, parent)) >= 2

    await until(reported, 60, "the reports of both jobs")
    for job_id in (parent, child):
        assert reports_of(controller, job_id) == [pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED]
    listed = await official(harness, lambda c: c.list_jobs(pb.ListJobsRequest()))
    assert {j.job_id for j in listed.jobs} == {parent, child}


@pytest_twisted.ensureDeferred
async def test_status_logs_kill_page_and_api_of_a_hierarchical_id(harness: Harness, tmp_path: Path) -> None:
    job_id = f"exp-{uuid.uuid4().hex[:6]}/worker-0"
    await official(harness, lambda c: c.run_job(job_request(job_id, make_bundle(tmp_path), entrypoint(print_forever))))
    await harness.wait_state(job_id, {pb.JOB_STATE_RUNNING})

    async def ticking() -> bool:
        entries = await official(
            harness,
            lambda c: c.fetch_logs(pb.FetchLogsRequest(job_id=job_id, filter=pb.FetchLogsFilter(start_line=-5))),
        )
        return sum(e.data.startswith("tick ") for e in entries.logs) >= 3

    await until(ticking, 60, "FetchLogs to show the job's lines")
    status = await official(harness, lambda c: c.get_job_status(pb.GetJobStatusRequest(job_id=job_id)))
    assert status.job_id == job_id and status.state == pb.JOB_STATE_RUNNING

    # The dashboard page and the /api routes, with "/" as typed and as %2F.
    page = await treq.get(f"{harness.url}/job/{job_id}")
    text = await page.text("utf-8")
    assert page.code == 200 and job_id in text and "tick " in text
    for path in (job_id, quote(job_id, safe="")):
        code, detail = await get_json(f"{harness.url}/api/jobs/{path}")
        assert code == 200 and detail["job_id"] == job_id and detail["status"] == "running"
        code, lines = await get_json(f"{harness.url}/api/jobs/{path}/logs?tail=3&source=stdout")
        assert code == 200 and isinstance(lines, list) and len(lines) == 3
        assert all(line["data"].startswith("tick ") for line in lines)
    code, jobs = await get_json(f"{harness.url}/api/jobs")
    assert [j["job_id"] for j in jobs] == [job_id]

    await official(harness, lambda c: c.kill_job(pb.KillJobRequest(job_id=job_id, term_timeout_ms=1000)))
    status = await harness.wait_state(job_id, timeout=60)
    assert status.state == pb.JOB_STATE_KILLED and status.error == "Killed by request"


@pytest_twisted.ensureDeferred
async def test_a_slash_b_and_a__b_run_side_by_side_sharing_nothing(harness: Harness, tmp_path: Path) -> None:
    prefix = f"side-{uuid.uuid4().hex[:6]}"
    ids = [f"{prefix}/a/b", f"{prefix}/a__b"]
    bundle = make_bundle(tmp_path)
    for job_id in ids:
        await official(harness, lambda c, j=job_id: c.run_job(job_request(j, bundle, entrypoint(leave_a_trace))))
    for job_id in ids:
        await harness.wait_state(job_id, {pb.JOB_STATE_RUNNING})
    running = {j.job_id for j in (await harness.client.list_jobs()).jobs if j.state == pb.JOB_STATE_RUNNING}
    assert running == set(ids)  # side by side
    for job_id in ids:
        go(harness, job_id)
    results = {}
    for job_id in ids:
        status = await harness.wait_state(job_id)
        assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
        results[job_id] = cloudpickle.loads(status.serialized_result)
    for job_id in ids:
        # Each saw its own id, its own file, and nothing of the other job.
        assert results[job_id] == {"job_id": job_id, "trace": job_id, "workdir": ["go", "trace.txt"]}
        logs = await harness.client.fetch_logs(job_id)
        assert [e.data for e in logs if e.source == "stdout"] == [f"trace of {job_id}"]
    store = harness.worker.store
    assert store.job_dir(ids[0]) != store.job_dir(ids[1])
    assert {p.name for p in store.root.iterdir()} >= {job_key(j) for j in ids}
    for job_id in ids:
        assert store.out_dir(job_id).is_dir()
        assert not store.workdir(job_id).exists()  # removed when the job ended (--keep-workdir keeps it)


@pytest_twisted.ensureDeferred
async def test_a_raising_job_says_why_it_failed(harness: Harness, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    job_id = f"boom-{uuid.uuid4().hex[:6]}/child"
    status = await harness.run(job_request(job_id, bundle, entrypoint(raise_boom, "boom")))
    assert status.state == pb.JOB_STATE_FAILED and status.exit_code == 1
    assert "Exit code: 1" in status.error and "ValueError: boom" in status.error
    assert status.error == "Exit code: 1: ValueError: boom"
    official_status = await official(harness, lambda c: c.get_job_status(pb.GetJobStatusRequest(job_id=job_id)))
    assert official_status.error == status.error
    code, detail = await get_json(f"{harness.url}/api/jobs/{quote(job_id, safe='')}")
    assert detail["error"] == status.error and detail["status"] == "failed"

    hostile = f"boom-{uuid.uuid4().hex[:6]}"
    status = await harness.run(job_request(hostile, bundle, entrypoint(raise_boom, "<script>alert(1)</script>")))
    assert status.error == "Exit code: 1: ValueError: <script>alert(1)</script>"
    page = await (await treq.get(f"{harness.url}/job/{hostile}")).text("utf-8")
    assert "ValueError: &lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
