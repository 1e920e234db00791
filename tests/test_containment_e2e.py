"""A job cannot reach past its container (issue 12), on the real engine: the
worker reads nothing the job could have pointed elsewhere."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.logger import globalLogPublisher, textFileLogObserver

from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import Harness, entrypoint, make_bundle, start_worker, worker_config

pytestmark = pytest.mark.docker

RESULT = "/fluster/out/result.pkl"


# -- the jobs (pickled by value; they run inside the container) ---------------

def leave_symlink(target: str) -> None:
    os.symlink(target, RESULT)


def leave_fifo() -> None:
    os.mkfifo(RESULT)  # opening it on the host would block a worker thread forever


def leave_directory() -> None:
    os.mkdir(RESULT)


# -- fixtures -----------------------------------------------------------------

@pytest.fixture
def worker_log(tmp_path: Path) -> Iterator[Path]:
    """The worker's own log file, as ``twistd --logfile`` writes it."""
    path = tmp_path / "worker.log"
    with path.open("a", buffering=1) as f:
        observer = textFileLogObserver(f)
        globalLogPublisher.addObserver(observer)
        try:
            yield path
        finally:
            globalLogPublisher.removeObserver(observer)


@pytest_twisted.async_yield_fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_worker(worker_config(tmp_path))
    yield h
    await h.worker.stopService()


def job(bundle: Path, ep: bytes, **fields: Any) -> pb.RunJobRequest:
    return pb.RunJobRequest(
        job_id=fields.pop("job_id", f"job-{uuid.uuid4().hex[:8]}"),
        serialized_entrypoint=ep,
        bundle_gcs_path=f"file://{bundle}",
        **fields,
    )


# -- tests --------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_result_symlink_gets_no_host_bytes(worker_log: Path, harness: Harness, tmp_path: Path) -> None:
    made = tmp_path / "made-by-the-test"
    made.write_bytes(b"test-secret-" + uuid.uuid4().hex.encode())
    # The worker's own log holds a line by now (the worker started).
    assert worker_log.stat().st_size > 0
    targets = {
        "/etc/shadow": Path("/etc/shadow").read_bytes(),
        str(made): made.read_bytes(),
        str(worker_log): worker_log.read_bytes()[:200],
    }
    bundle = make_bundle(tmp_path / "b")
    for target, host_bytes in targets.items():
        status = await harness.run(job(bundle, entrypoint(leave_symlink, target)))
        assert status.state == pb.JOB_STATE_FAILED, (target, status)
        assert status.error == f"result refused: {RESULT} is a symbolic link, not a regular file"
        assert status.serialized_result == b""
        assert host_bytes not in status.SerializeToString()
        # The JSON APIs and the logs carry none of it either.
        for path in (f"/api/jobs/{status.job_id}", f"/api/jobs/{status.job_id}/logs?tail=100"):
            response = await treq.get(harness.url + path)
            body = await response.content()
            assert response.code == 200 and host_bytes not in body, path
        json_status = await treq.post(
            harness.url + "/fluster.cluster.WorkerService/GetJobStatus",
            json.dumps({"jobId": status.job_id, "includeResult": True}).encode(),
            headers={"Content-Type": ["application/json"]},
        )
        assert host_bytes not in await json_status.content()
        errors = [e.data for e in await harness.client.fetch_logs(status.job_id) if e.source == "error"]
        assert errors == [status.error]


@pytest.mark.parametrize("leave, what", [(leave_fifo, "a FIFO"), (leave_directory, "a directory")])
@pytest_twisted.ensureDeferred
async def test_result_that_is_not_a_regular_file(harness: Harness, tmp_path: Path, leave: Any, what: str) -> None:
    status = await harness.run(job(make_bundle(tmp_path / "b"), entrypoint(leave)))
    assert status.state == pb.JOB_STATE_FAILED, status
    assert status.error == f"result refused: {RESULT} is {what}, not a regular file"
    assert status.serialized_result == b""
