"""On the real engine: a job cannot drive its own worker (issue 12). The worker
listens on 0.0.0.0 and lets anyone control it, with any Host; a job that calls
it through ``host.docker.internal`` may read, but its RunJob and KillJob are
refused with permission_denied."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import pytest_twisted

from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import Harness, entrypoint, make_bundle, start_worker, worker_config

pytestmark = pytest.mark.docker


def call_own_worker(port: int) -> dict[str, Any]:
    import json
    import urllib.error
    import urllib.request

    seen: dict[str, Any] = {}
    for method, body in (
        ("ListJobs", {}),
        ("RunJob", {"jobId": "from-inside", "bundleGcsPath": "file:///etc/passwd"}),
        ("KillJob", {"jobId": "from-inside"}),
    ):
        request = urllib.request.Request(
            f"http://host.docker.internal:{port}/fluster.cluster.WorkerService/{method}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                seen[method] = (response.status, json.loads(response.read()))
        except urllib.error.HTTPError as e:
            seen[method] = (e.code, json.loads(e.read()))
    return seen


@pytest_twisted.async_yield_fixture
async def open_worker(tmp_path: Path) -> AsyncIterator[Harness]:
    config = worker_config(
        tmp_path, listen="tcp:0:interface=0.0.0.0", allowed_hosts=("*",), allow_control_from="*"
    )
    h = await start_worker(config)
    yield h
    await h.worker.stopService()


@pytest_twisted.ensureDeferred
async def test_a_job_calling_its_worker_changes_nothing(open_worker: Harness, tmp_path: Path) -> None:
    assert open_worker.worker.web is not None
    port = open_worker.worker.web.listening_port
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    status = await open_worker.run(
        pb.RunJobRequest(
            job_id=job_id,
            serialized_entrypoint=entrypoint(call_own_worker, port),
            bundle_gcs_path=f"file://{make_bundle(tmp_path / 'b')}",
        ),
        timeout=240,
    )
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    seen = cloudpickle.loads(status.serialized_result)
    # The path is open (a read gets through), so the refusals below are the rule's.
    assert seen["ListJobs"][0] == 200
    assert job_id in {job["jobId"] for job in seen["ListJobs"][1]["jobs"]}
    networks = open_worker.worker.engine_networks
    assert networks.known
    for method in ("RunJob", "KillJob"):
        code, body = seen[method]
        assert code == 403 and body["code"] == "permission_denied", seen
        assert body["message"].startswith("calls from container network "), body
        assert body["message"].endswith(" may not change state")
        assert body["message"].split()[4] in networks.cidrs
    assert open_worker.worker.manager.find("from-inside") is None
