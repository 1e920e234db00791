"""The worker over a real socket, called by the official Python Connect client
(connect-python, what the existing Controller uses): binary and JSON, gzip and
plain, successes and errors, and a job run as the Controller sends it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import pytest_twisted
from cluster_connect import WorkerServiceClientSync
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from twisted.internet.threads import deferToThread

from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import Harness, entrypoint, make_bundle, start_worker, worker_config

pytestmark = pytest.mark.docker

CODECS = [
    pytest.param(False, "gzip", id="proto-gzip"),
    pytest.param(False, None, id="proto-plain"),
    pytest.param(True, "gzip", id="json-gzip"),
    pytest.param(True, None, id="json-plain"),
]


def triple(x: int) -> int:
    return 3 * x


@pytest_twisted.async_yield_fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_worker(worker_config(tmp_path))
    yield h
    await h.worker.stopService()


def client(url: str, proto_json: bool, compression: str | None) -> WorkerServiceClientSync:
    kwargs: dict[str, Any] = {"proto_json": proto_json, "timeout_ms": 10_000}
    if compression is None:
        kwargs["send_compression"] = None
    return WorkerServiceClientSync(url, **kwargs)


@pytest.mark.parametrize(("proto_json", "compression"), CODECS)
@pytest_twisted.ensureDeferred
async def test_success_and_error(harness: Harness, proto_json: bool, compression: str | None) -> None:
    def calls() -> tuple[pb.HealthResponse, ConnectError, pb.ListJobsResponse]:
        with client(harness.url, proto_json, compression) as c:
            health = c.health_check(pb.Empty())
            try:
                c.get_job_status(pb.GetJobStatusRequest(job_id="unknown-job"))
            except ConnectError as e:
                error = e
            else:
                raise AssertionError("GetJobStatus of an unknown job succeeded")
            return health, error, c.list_jobs(pb.ListJobsRequest(namespace="ignored"))

    health, error, jobs = await deferToThread(calls)
    assert health.healthy
    assert error.code == Code.NOT_FOUND
    assert "unknown-job" in error.message
    assert list(jobs.jobs) == []


@pytest.mark.parametrize(("proto_json", "compression"), [CODECS[0], CODECS[2]])
@pytest_twisted.ensureDeferred
async def test_a_job_as_the_controller_sends_it(
    harness: Harness, tmp_path: Path, proto_json: bool, compression: str | None
) -> None:
    bundle = make_bundle(tmp_path)
    job_id = f"wire-{uuid.uuid4().hex[:8]}"
    # Exactly the fields the existing Controller sends (contract section 6).
    request = pb.RunJobRequest(
        job_id=job_id,
        serialized_entrypoint=entrypoint(triple, 14),
        environment=pb.EnvironmentConfig(workspace="/home/user/project", env_vars={"A": "1"}),
        bundle_gcs_path=f"file://{bundle}",
        resources=pb.ResourceSpec(cpu=1, memory="512m"),
        ports=["actor"],
        attempt_id=0,
    )

    def submit() -> pb.RunJobResponse:
        with client(harness.url, proto_json, compression) as c:
            return c.run_job(request)

    accepted = await deferToThread(submit)
    assert accepted.job_id == job_id
    assert accepted.state == pb.JOB_STATE_PENDING
    await harness.wait_state(job_id)

    def result() -> pb.JobStatus:
        with client(harness.url, proto_json, compression) as c:
            return c.get_job_status(pb.GetJobStatusRequest(job_id=job_id, include_result=True))

    status = await deferToThread(result)
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    assert cloudpickle.loads(status.serialized_result) == 42
    assert status.worker_address.endswith(harness.url.rsplit(":", 1)[1])
