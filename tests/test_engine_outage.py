"""The Docker engine stops and starts under a running worker, and a worker starts
while the engine is down: the worker stays up, says plainly that it is unhealthy
and why, refuses new work, and recovers by itself. These tests stop the
machine's dockerd: they run last, with the engine to themselves
(``engine_exclusive``), and always start it again."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from fluster_worker.testing.client import RpcError, WorkerClient
from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.enginectl import engine_down, start_engine
from tests.jobkit import TERMINAL, entrypoint, make_bundle, start_worker, worker_config
from tests.workerproc import WorkerProcess

pytestmark = [pytest.mark.docker, pytest.mark.engine_outage, pytest.mark.slow]


def print_and_sleep(seconds: float) -> None:
    import time

    for i in range(int(seconds * 10)):
        print(f"tick {i}", flush=True)
        time.sleep(0.1)


def quick() -> str:
    return "done"


async def until(predicate: Callable[[], Coroutine[Any, Any, bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.2, lambda: None)


async def healthy(client: WorkerClient) -> bool:
    return bool((await client.health()).healthy)


def job(bundle: Path, ep: bytes, job_id: str) -> pb.RunJobRequest:
    return pb.RunJobRequest(job_id=job_id, serialized_entrypoint=ep, bundle_gcs_path=f"file://{bundle}")


async def api_stats(url: str) -> dict[str, Any]:
    response = await treq.get(f"{url}/api/v1/stats")
    return await response.json()  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_engine_stop_and_start_during_a_running_job(
    tmp_path: Path, engine_exclusive: None, docker_client: Any
) -> None:
    h = await start_worker(worker_config(tmp_path))
    try:
        bundle = make_bundle(tmp_path)
        await h.run(job(bundle, entrypoint(quick), "warm-up"))  # the image exists before the outage
        await h.client.run_job(job(bundle, entrypoint(print_and_sleep, 600), "victim"))
        await h.wait_state("victim", {pb.JOB_STATE_RUNNING})
        assert await healthy(h.client)
        with engine_down():
            await until(lambda: _not(healthy(h.client)), 60, "the worker to say it is unhealthy")
            with pytest.raises(RpcError) as refused:
                await h.client.run_job(job(bundle, entrypoint(quick), "during"))
            assert refused.value.code == "unavailable"
            assert "Docker engine unreachable" in str(refused.value)
            stats = await api_stats(h.url)
            assert stats["healthy"] is False
            assert any(c["name"] == "engine" and "unreachable" in c["reason"] for c in stats["conditions"])
            metrics = (await (await treq.get(f"{h.url}/metrics")).text())
            assert "fluster_worker_healthy 0.0" in metrics
            assert (await h.client.status("victim")).state == pb.JOB_STATE_RUNNING  # unknown yet: not a failure
        await until(lambda: healthy(h.client), 120, "the worker to be healthy again")
        victim = await h.wait_state("victim", TERMINAL, timeout=120)
        assert victim.state == pb.JOB_STATE_WORKER_FAILED, victim
        assert "Docker engine" in victim.error and "exit status" in victim.error
        after = await h.run(job(bundle, entrypoint(quick), "after"), timeout=180)
        assert after.state == pb.JOB_STATE_SUCCEEDED, after.error
        left = docker_client.containers.list(
            all=True, filters={"label": [f"fluster.worker_id={h.worker.worker_id}", "fluster.job_id=victim"]}
        )
        assert left == []
    finally:
        start_engine()
        await h.worker.stopService()


@pytest_twisted.ensureDeferred
async def test_a_worker_started_with_the_engine_down_listens_and_recovers(
    tmp_path: Path, engine_exclusive: None, docker_client: Any
) -> None:
    worker = WorkerProcess(tmp_path, worker_id=f"t{uuid.uuid4().hex[:8]}")
    try:
        with engine_down():
            client = await worker.start()  # it listens
            await until(lambda: _not(healthy(client)), 60, "the worker to say it is unhealthy")
            stats = await api_stats(worker.url)
            assert any(c["name"] == "engine" for c in stats["conditions"])
        await until(lambda: healthy(client), 120, "the worker to be healthy once the engine is back")
        await client.run_job(job(make_bundle(tmp_path), entrypoint(quick), "after"))
        deadline = time.monotonic() + 180
        while (status := await client.status("after")).state not in TERMINAL:
            assert time.monotonic() < deadline, status
            await deferLater(reactor, 0.2, lambda: None)
        assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    finally:
        start_engine()
        worker.close(docker_client)


async def _not(d: Coroutine[Any, Any, bool]) -> bool:
    try:
        return not await d
    except Exception:
        return False
