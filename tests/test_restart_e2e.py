"""Jobs outlive the worker, on the real engine with a real ``twistd`` process:
SIGKILL or SIGTERM it mid-job and start it again, and the job ends with its true
outcome and every line it printed, exactly once; kills, timeouts and waiting
jobs carry over; no ``docker logs`` child outlives a worker."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from fluster_worker.testing.client import WorkerClient
from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import TERMINAL, entrypoint, make_bundle
from tests.workerproc import WorkerProcess, processes_mentioning

pytestmark = [pytest.mark.docker, pytest.mark.slow]


# -- the jobs (pickled by value; they run inside the container) ---------------


def count_lines(n: int, delay: float) -> int:
    import time

    for i in range(n):
        print(i, flush=True)
        time.sleep(delay)
    return n


def sleep_for(seconds: float) -> str:
    import time

    print("sleeping", flush=True)
    time.sleep(seconds)
    return "slept"


# -- helpers --------------------------------------------------------------------


async def wait_state(client: WorkerClient, job_id: str, states: set[int], timeout: float = 180) -> pb.JobStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = await client.status(job_id, include_result=True)
        if status.state in states:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {pb.JobState.Name(status.state)}: {status}")
        await deferLater(reactor, 0.1, lambda: None)


async def stdout_lines(client: WorkerClient, job_id: str) -> list[str]:
    entries = await client.fetch_logs(job_id)
    return [e.data for e in entries if e.source == "stdout"]


async def until_lines(client: WorkerClient, job_id: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(await stdout_lines(client, job_id)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not print {count} lines")
        await deferLater(reactor, 0.1, lambda: None)


def request(bundle: Path, ep: bytes, **fields: Any) -> pb.RunJobRequest:
    return pb.RunJobRequest(
        job_id=fields.pop("job_id", f"job-{uuid.uuid4().hex[:8]}"),
        serialized_entrypoint=ep,
        bundle_gcs_path=f"file://{bundle}",
        **fields,
    )


def container_of(docker_client: Any, worker: WorkerProcess, job_id: str) -> Any:
    found = docker_client.containers.list(
        all=True, filters={"label": [f"fluster.worker_id={worker.worker_id}", f"fluster.job_id={job_id}"]}
    )
    assert len(found) == 1, found
    return found[0]


@pytest_twisted.async_yield_fixture
async def worker(tmp_path: Path, docker_client: Any) -> AsyncIterator[WorkerProcess]:
    proc = WorkerProcess(tmp_path)
    yield proc
    proc.close(docker_client)


# -- tests ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
@pytest_twisted.ensureDeferred
async def test_a_restart_mid_job_keeps_every_line_exactly_once(
    how: str, worker: WorkerProcess, tmp_path: Path, docker_client: Any
) -> None:
    client = await worker.start()
    job = request(make_bundle(tmp_path), entrypoint(count_lines, 150, 0.04), job_id="counted")
    await client.run_job(job)
    await wait_state(client, "counted", {pb.JOB_STATE_RUNNING})
    await until_lines(client, "counted", 20)
    container = container_of(docker_client, worker, "counted")
    if how == "SIGKILL":
        worker.kill()
    else:
        await worker.terminate()
    # The job runs on, and no `docker logs` of the old worker is left.
    container.reload()
    assert container.status == "running"
    assert processes_mentioning(["logs", container.id]) == []
    await deferLater(reactor, 1.0, lambda: None)  # it prints while no worker watches
    client = await worker.start()
    status = await wait_state(client, "counted", TERMINAL)
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    assert cloudpickle.loads(status.serialized_result) == 150
    assert await stdout_lines(client, "counted") == [str(i) for i in range(150)]
    assert "re-adopted job counted" in worker.log_text()


@pytest_twisted.ensureDeferred
async def test_a_job_that_exits_while_the_worker_is_down_gets_its_true_state(
    worker: WorkerProcess, tmp_path: Path, docker_client: Any
) -> None:
    client = await worker.start()
    bundle = make_bundle(tmp_path)
    await client.run_job(request(bundle, entrypoint(count_lines, 30, 0.1), job_id="finishes"))
    await client.run_job(request(bundle, entrypoint(__import__("sys").exit, 3), job_id="fails"))
    for job_id in ("finishes", "fails"):
        await wait_state(client, job_id, {pb.JOB_STATE_RUNNING, *TERMINAL})
    fails = await client.status("fails")
    worker.kill()
    container = container_of(docker_client, worker, "finishes")
    container.wait(timeout=120)
    client = await worker.start()
    status = await wait_state(client, "finishes", TERMINAL)
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    assert cloudpickle.loads(status.serialized_result) == 30
    assert await stdout_lines(client, "finishes") == [str(i) for i in range(30)]
    if fails.state == pb.JOB_STATE_RUNNING:  # it ended while the worker was down
        status = await wait_state(client, "fails", TERMINAL)
        assert (status.state, status.exit_code, status.error) == (pb.JOB_STATE_FAILED, 3, "Exit code: 3")
    # Nothing left behind once they are done.
    left = docker_client.containers.list(all=True, filters={"label": f"fluster.worker_id={worker.worker_id}"})
    assert left == []


@pytest_twisted.ensureDeferred
async def test_kill_and_timeout_work_on_re_adopted_jobs(
    worker: WorkerProcess, tmp_path: Path, docker_client: Any
) -> None:
    client = await worker.start()
    bundle = make_bundle(tmp_path)
    await client.run_job(request(bundle, entrypoint(sleep_for, 600), job_id="to-kill"))
    await client.run_job(request(bundle, entrypoint(sleep_for, 600), job_id="to-time-out", timeout_seconds=12))
    for job_id in ("to-kill", "to-time-out"):
        await wait_state(client, job_id, {pb.JOB_STATE_RUNNING})
    await worker.terminate()
    client = await worker.start()
    assert (await client.status("to-kill")).state == pb.JOB_STATE_RUNNING
    await client.kill("to-kill", term_timeout_ms=2000)
    killed = await wait_state(client, "to-kill", TERMINAL)
    assert (killed.state, killed.error) == (pb.JOB_STATE_KILLED, "Killed by request")
    timed = await wait_state(client, "to-time-out", TERMINAL, timeout=120)
    assert timed.state == pb.JOB_STATE_FAILED and timed.error.startswith("Timeout exceeded"), timed.error


@pytest_twisted.ensureDeferred
async def test_a_pending_job_survives_a_restart_and_runs(
    tmp_path: Path, docker_client: Any
) -> None:
    worker = WorkerProcess(tmp_path, "--max-concurrent-jobs", "1")
    try:
        client = await worker.start()
        bundle = make_bundle(tmp_path)
        await client.run_job(request(bundle, entrypoint(sleep_for, 600), job_id="first"))
        await wait_state(client, "first", {pb.JOB_STATE_RUNNING})
        await client.run_job(request(bundle, entrypoint(count_lines, 3, 0.0), job_id="waiting"))
        assert (await client.status("waiting")).state == pb.JOB_STATE_PENDING
        worker.kill()
        client = await worker.start()
        assert (await client.status("waiting")).state == pb.JOB_STATE_PENDING
        await client.kill("first", term_timeout_ms=1000)
        status = await wait_state(client, "waiting", TERMINAL)
        assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
        assert await stdout_lines(client, "waiting") == ["0", "1", "2"]
        left = docker_client.containers.list(all=True, filters={"label": "fluster.job_id=waiting"})
        assert left == []
    finally:
        worker.close(docker_client)
