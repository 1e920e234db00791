"""Workers and a controller test double on the real reactor and engine: joining,
heartbeats, every state report delivered in order (through outages and a worker
restart), and a job that calls the controller from inside its container."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from fluster_worker.testing.controller import FakeController
from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import Harness, entrypoint, make_bundle, start_worker, until, worker_config

pytestmark = pytest.mark.docker


def call_controller_from_the_container() -> str:
    import urllib.request

    address = os.environ["FLUSTER_CONTROLLER_ADDRESS"]
    name = b"from-container"
    body = b"\x0a" + bytes([len(name)]) + name  # RegisterWorkerRequest{worker_id}
    request = urllib.request.Request(
        f"{address}/fluster.cluster.ControllerService/RegisterWorker",
        data=body,
        headers={"Content-Type": "application/proto", "Connect-Protocol-Version": "1"},
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        return f"{response.status} {address}"


def quick() -> int:
    return 1


@pytest_twisted.async_yield_fixture
async def controller() -> AsyncIterator[FakeController]:
    fake = FakeController(reactor)
    await fake.start(interface="0.0.0.0")
    yield fake
    await fake.stop()


def reports_of(fake: FakeController, job_id: str) -> list[tuple[int, int, str]]:
    return [(r.state, r.attempt_id, r.worker_id) for r in fake.reports if r.job_id == job_id]


async def registered(fake: FakeController, worker_id: str, count: int = 1) -> None:
    async def seen() -> bool:
        return sum(1 for c in fake.register_calls if c.request.worker_id == worker_id) >= count

    await until(seen, 60, f"{count} RegisterWorker calls from {worker_id}")


@pytest_twisted.ensureDeferred
async def test_registration_heartbeat_reports_and_a_container_calling_home(
    controller: FakeController, tmp_path: Path
) -> None:
    config = worker_config(tmp_path, controller=f"127.0.0.1:{controller.port}", heartbeat_seconds=0.3)
    h = await start_worker(config)
    try:
        await registered(controller, h.worker.worker_id, count=3)  # registration, then heartbeats
        first = next(c.request for c in controller.register_calls if c.request.worker_id == h.worker.worker_id)
        host, port = first.address.rsplit(":", 1)
        assert int(port) == h.worker.web.listening_port  # type: ignore[union-attr]
        assert host not in ("0.0.0.0", "") and int(port) != 0
        assert first.resources.cpu >= 1 and first.resources.memory.endswith("g")

        job_id = f"home-{uuid.uuid4().hex[:6]}"
        request = pb.RunJobRequest(
            job_id=job_id,
            serialized_entrypoint=entrypoint(call_controller_from_the_container),
            bundle_gcs_path=f"file://{make_bundle(tmp_path)}",
            attempt_id=4,
        )
        status = await h.run(request)
        stderr = [e.data for e in await h.client.fetch_logs(job_id) if e.source == "stderr"]
        assert status.state == pb.JOB_STATE_SUCCEEDED, (status.error, stderr[-3:])
        assert any(c.request.worker_id == "from-container" for c in controller.register_calls)

        async def reported() -> bool:
            return len(reports_of(controller, job_id)) >= 2

        await until(reported, 60, "RUNNING and SUCCEEDED reports")
        assert reports_of(controller, job_id) == [
            (pb.JOB_STATE_RUNNING, 4, h.worker.worker_id),
            (pb.JOB_STATE_SUCCEEDED, 4, h.worker.worker_id),
        ]
    finally:
        await h.worker.stopService()


@pytest_twisted.ensureDeferred
async def test_reports_survive_an_outage_and_a_worker_restart(controller: FakeController, tmp_path: Path) -> None:
    config = worker_config(tmp_path, controller=f"127.0.0.1:{controller.port}")
    h = await start_worker(config)
    await registered(controller, h.worker.worker_id)
    await controller.stop()  # the controller goes away before the jobs run
    job_ids = [f"out-{i}-{uuid.uuid4().hex[:4]}" for i in range(3)]
    bundle = make_bundle(tmp_path)
    try:
        for job_id in job_ids:
            status = await h.run(pb.RunJobRequest(job_id=job_id, serialized_entrypoint=entrypoint(quick),
                                                  bundle_gcs_path=str(bundle), attempt_id=1))
            assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    finally:
        await h.worker.stopService()  # restarted before any report got through

    await controller.start(interface="0.0.0.0")
    h2 = await start_worker(config)
    try:
        async def delivered() -> bool:
            return all(len(reports_of(controller, j)) >= 2 for j in job_ids)

        await until(delivered, 120, "every queued report")
        for job_id in job_ids:
            assert reports_of(controller, job_id) == [
                (pb.JOB_STATE_RUNNING, 1, h.worker.worker_id),
                (pb.JOB_STATE_SUCCEEDED, 1, h.worker.worker_id),
            ]
        # Jobs' reports arrive in the order the jobs ran.
        order = [r.job_id for r in controller.reports if r.state == pb.JOB_STATE_SUCCEEDED]
        assert order == job_ids
        assert h2.worker.worker_id == h.worker.worker_id  # the identity is kept
    finally:
        await h2.worker.stopService()


@pytest_twisted.ensureDeferred
async def test_three_workers_one_controller(controller: FakeController, tmp_path: Path) -> None:
    workers: list[Harness] = []
    try:
        for i in range(3):
            config = worker_config(tmp_path / f"w{i}", controller=f"http://127.0.0.1:{controller.port}", worker_id=None)
            workers.append(await start_worker(config))
        ids = {h.worker.worker_id for h in workers}
        assert len(ids) == 3
        for h in workers:
            await registered(controller, h.worker.worker_id)
        bundle = make_bundle(tmp_path)
        for i, h in enumerate(workers):
            status = await h.run(pb.RunJobRequest(job_id=f"tri-{i}", serialized_entrypoint=entrypoint(quick),
                                                  bundle_gcs_path=str(bundle)))
            assert status.state == pb.JOB_STATE_SUCCEEDED, status.error

        async def all_reported() -> bool:
            return all(len(reports_of(controller, f"tri-{i}")) >= 2 for i in range(3))

        await until(all_reported, 60, "reports from all three workers")
        for i, h in enumerate(workers):
            assert {w for _, _, w in reports_of(controller, f"tri-{i}")} == {h.worker.worker_id}
        addresses = {c.request.address for c in controller.register_calls}
        assert len(addresses) == 3
    finally:
        for h in workers:
            await h.worker.stopService()
