"""Jobs end to end on the real engine, sent as the existing clients send them:
a cloudpickled Entrypoint and a zip bundle with a pyproject.toml."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cloudpickle
import docker.errors
import pytest
import pytest_twisted
import treq

from fluster_worker.testing.client import RpcError
from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import Harness, entrypoint, make_bundle, start_worker, until, worker_config

pytestmark = pytest.mark.docker


# -- the jobs (pickled by value; they run inside the container) ---------------

def add_and_read(a: int, b: int) -> dict[str, Any]:
    with open("data.txt") as f:
        data = f.read()
    return {"sum": a + b, "data": data, "cwd": os.getcwd()}


def raise_error() -> None:
    raise ValueError("the job failed on purpose")


def exit_with(code: int) -> None:
    import sys

    sys.exit(code)


def sleep_for(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def trap_sigterm_and_sleep() -> None:
    signal.signal(signal.SIGTERM, lambda *_: None)
    print("ready", flush=True)
    time.sleep(600)


def eat_memory() -> None:
    chunks = []
    while True:
        chunks.append(bytearray(16 * 2**20))


def fluster_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("FLUSTER_", "USER_"))}


def serve_once() -> str:
    import http.server

    port = int(os.environ["FLUSTER_PORT_ACTOR"])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello from the actor"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with http.server.HTTPServer(("0.0.0.0", port), Handler) as server:
        server.handle_request()
    return "served"


def six_version() -> str:
    import six

    return str(six.__version__)


# -- fixtures -----------------------------------------------------------------

@pytest_twisted.async_yield_fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_worker(worker_config(tmp_path))
    yield h
    await h.worker.stopService()


def job(bundle: Path | None, ep: bytes, **fields: Any) -> pb.RunJobRequest:
    request = pb.RunJobRequest(
        job_id=fields.pop("job_id", f"job-{uuid.uuid4().hex[:8]}"),
        serialized_entrypoint=ep,
        bundle_gcs_path=f"file://{bundle}" if bundle else "",
        attempt_id=fields.pop("attempt_id", 0),
        **fields,
    )
    return request


def result_of(status: pb.JobStatus) -> Any:
    assert status.serialized_result, status
    return cloudpickle.loads(status.serialized_result)


def containers_of(docker_client: Any, worker_id: str, job_id: str) -> list[Any]:
    return list(
        docker_client.containers.list(
            all=True, filters={"label": [f"fluster.worker_id={worker_id}", f"fluster.job_id={job_id}"]}
        )
    )


# -- tests --------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_success_returns_value_and_shares_the_image(harness: Harness, tmp_path: Path, docker_client: Any) -> None:
    bundle = make_bundle(tmp_path / "b1")
    first = await harness.run(job(bundle, entrypoint(add_and_read, 2, 3)))
    assert first.state == pb.JOB_STATE_SUCCEEDED, first.error
    assert result_of(first) == {"sum": 5, "data": "hello from the bundle\n", "cwd": "/app"}
    assert first.exit_code == 0
    assert first.started_at_ms > 0 and first.finished_at_ms >= first.started_at_ms
    assert first.build_metrics.image_tag

    # Another bundle, same dependency files: same image, from the cache.
    other = make_bundle(tmp_path / "b2", files={"extra.py": "X = 1\n"})
    second = await harness.run(job(other, entrypoint(add_and_read, 1, 1)))
    assert second.state == pb.JOB_STATE_SUCCEEDED, second.error
    assert second.build_metrics.image_tag == first.build_metrics.image_tag
    assert second.build_metrics.from_cache
    # Without include_result, no result bytes.
    assert not (await harness.client.status(second.job_id)).serialized_result
    # The container is gone once the job is finished.
    assert containers_of(docker_client, harness.worker.worker_id, second.job_id) == []


@pytest_twisted.ensureDeferred
async def test_an_image_removed_behind_the_workers_back_is_built_again(
    harness: Harness, tmp_path: Path, docker_client: Any
) -> None:
    """The builder remembers the images it found (no engine call per job); one
    removed by hand between two jobs is built again, not a failed job."""
    bundle = make_bundle(tmp_path / "b", nonce=uuid.uuid4().hex)  # an image of this test's own
    first = await harness.run(job(bundle, entrypoint(add_and_read, 1, 2)))
    assert first.state == pb.JOB_STATE_SUCCEEDED, first.error
    tag = first.build_metrics.image_tag
    docker_client.images.remove(tag, force=True)
    try:
        second = await harness.run(job(bundle, entrypoint(add_and_read, 2, 2)))
        assert second.state == pb.JOB_STATE_SUCCEEDED, second.error
        assert second.build_metrics.image_tag == tag
        assert result_of(await harness.client.status(second.job_id, include_result=True))["sum"] == 4
        logs = await harness.client.fetch_logs(second.job_id, regex="building image")
        assert any(e.source == "build" for e in logs), logs
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(tag, force=True)


@pytest_twisted.ensureDeferred
async def test_raising_job_fails_with_exit_code_and_traceback(harness: Harness, tmp_path: Path) -> None:
    status = await harness.run(job(make_bundle(tmp_path), entrypoint(raise_error)))
    assert status.state == pb.JOB_STATE_FAILED
    assert status.error == "Exit code: 1: ValueError: the job failed on purpose"
    assert status.exit_code == 1
    stderr = await harness.client.fetch_logs(status.job_id, regex="ValueError")
    assert any("the job failed on purpose" in e.data and e.source == "stderr" for e in stderr), stderr


@pytest_twisted.ensureDeferred
async def test_exit_code_n(harness: Harness, tmp_path: Path) -> None:
    status = await harness.run(job(make_bundle(tmp_path), entrypoint(exit_with, 7)))
    assert status.state == pb.JOB_STATE_FAILED
    assert status.error == "Exit code: 7"
    assert status.exit_code == 7


@pytest_twisted.ensureDeferred
async def test_timeout(harness: Harness, tmp_path: Path) -> None:
    status = await harness.run(job(make_bundle(tmp_path), entrypoint(sleep_for, 600), timeout_seconds=2))
    assert status.state == pb.JOB_STATE_FAILED
    assert status.error == "Timeout exceeded"


@pytest_twisted.ensureDeferred
async def test_oom_kill_says_so(harness: Harness, tmp_path: Path) -> None:
    request = job(make_bundle(tmp_path), entrypoint(eat_memory), resources=pb.ResourceSpec(memory="64m"))
    status = await harness.run(request)
    assert status.state == pb.JOB_STATE_FAILED
    assert "OOM" in status.error and "64m" in status.error, status.error
    assert status.exit_code == 137


@pytest_twisted.ensureDeferred
async def test_kill_of_a_job_that_traps_sigterm(harness: Harness, tmp_path: Path, docker_client: Any) -> None:
    request = job(make_bundle(tmp_path), entrypoint(trap_sigterm_and_sleep))
    await harness.client.run_job(request)
    await harness.wait_state(request.job_id, {pb.JOB_STATE_RUNNING})

    async def ready() -> bool:
        return any(e.data == "ready" for e in await harness.client.fetch_logs(request.job_id))

    await until(ready, 60, "the job to install its SIGTERM handler")
    started = time.monotonic()
    await harness.client.kill(request.job_id, term_timeout_ms=1000)
    elapsed = time.monotonic() - started
    status = await harness.client.status(request.job_id)
    assert status.state == pb.JOB_STATE_KILLED
    assert status.exit_code == 137  # SIGKILL: the job outlived SIGTERM
    # KillJob answers once the job is dead, which is not before the grace; how
    # soon after it is a speed goal (bench/kill.py).
    assert elapsed >= 1.0, elapsed
    assert containers_of(docker_client, harness.worker.worker_id, request.job_id) == []
    with pytest.raises(RpcError) as e:
        await harness.client.kill(request.job_id)
    assert e.value.code == "failed_precondition"


@pytest_twisted.ensureDeferred
async def test_kill_during_build_starts_no_container(harness: Harness, tmp_path: Path, docker_client: Any) -> None:
    # A unique dependency set forces a fresh, slow image build.
    bundle = make_bundle(tmp_path, dependencies=("six",), nonce=uuid.uuid4().hex)
    request = job(bundle, entrypoint(six_version), environment=pb.EnvironmentConfig(pip_packages=["numpy"]))
    await harness.client.run_job(request)

    async def building() -> bool:
        status = await harness.client.status(request.job_id)
        assert status.state in (pb.JOB_STATE_PENDING, pb.JOB_STATE_BUILDING), status
        return status.status_message == "building image"

    await until(building, 120, "the image build to start")
    await harness.client.kill(request.job_id)
    status = await harness.client.status(request.job_id)
    assert status.state == pb.JOB_STATE_KILLED
    assert containers_of(docker_client, harness.worker.worker_id, request.job_id) == []
    # Still none after another job has gone all the way through.
    after = await harness.run(job(make_bundle(tmp_path / "next"), entrypoint(add_and_read, 1, 2)))
    assert after.state == pb.JOB_STATE_SUCCEEDED, after.error
    assert containers_of(docker_client, harness.worker.worker_id, request.job_id) == []


@pytest_twisted.ensureDeferred
async def test_actor_port_reached_from_the_host(harness: Harness, tmp_path: Path) -> None:
    request = job(make_bundle(tmp_path), entrypoint(serve_once), ports=["actor"])
    await harness.client.run_job(request)
    status = await harness.wait_state(request.job_id, {pb.JOB_STATE_RUNNING, *[pb.JOB_STATE_FAILED]})
    port = status.ports["actor"]
    assert 30000 <= port <= 39999
    body: list[bytes] = []

    async def fetched() -> bool:
        try:
            response = await treq.get(f"http://127.0.0.1:{port}/", timeout=2)
            body.append(await response.content())
            return True
        except Exception:
            return False

    await until(fetched, 60, "the actor to answer")
    assert body[-1] == b"hello from the actor"
    final = await harness.wait_state(request.job_id)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert result_of(final) == "served"


@pytest_twisted.ensureDeferred
async def test_fluster_variables(harness: Harness, tmp_path: Path) -> None:
    request = job(
        make_bundle(tmp_path),
        entrypoint(fluster_env),
        job_id="env-job",
        attempt_id=3,
        ports=["actor", "metrics"],
        environment=pb.EnvironmentConfig(env_vars={"USER_VAR": "x", "FLUSTER_JOB_ID": "spoofed"}),
    )
    status = await harness.run(request)
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    env = result_of(status)
    assert env["FLUSTER_JOB_ID"] == "env-job"
    assert env["FLUSTER_ATTEMPT_ID"] == "3"
    assert env["FLUSTER_WORKER_ID"] == harness.worker.worker_id
    assert env["FLUSTER_BIND_HOST"] == "0.0.0.0"
    assert env["FLUSTER_BUNDLE_GCS_PATH"] == request.bundle_gcs_path
    assert env["FLUSTER_PORT_ACTOR"] == str(status.ports["actor"])
    assert env["FLUSTER_PORT_METRICS"] == str(status.ports["metrics"])
    assert env["USER_VAR"] == "x"


@pytest_twisted.ensureDeferred
async def test_real_dependency_from_pypi_through_the_ca_option(harness: Harness, tmp_path: Path) -> None:
    # A nonce: the dependency layer is new, so six really comes from PyPI (not
    # from a Docker layer another run built), through the CA bundle.
    bundle = make_bundle(tmp_path, dependencies=("six==1.16.0",), nonce=uuid.uuid4().hex)
    status = await harness.run(job(bundle, entrypoint(six_version)))
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    assert result_of(status) == "1.16.0"
    build = [e.data for e in await harness.client.fetch_logs(status.job_id) if e.source == "build"]
    assert not status.build_metrics.from_cache
    assert any("six" in line for line in build), build


@pytest_twisted.ensureDeferred
async def test_bad_input_is_answered_with_its_error(harness: Harness, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    ep = entrypoint(add_and_read, 1, 2)
    c = harness.client

    async def code_of(request: pb.RunJobRequest) -> str:
        with pytest.raises(RpcError) as e:
            await c.run_job(request)
        assert "\n" not in e.value.message
        return e.value.code

    assert await code_of(job(bundle, ep, resources=pb.ResourceSpec(memory="lots"))) == "invalid_argument"
    assert await code_of(job(bundle, ep, job_id="../etc/passwd")) == "invalid_argument"
    assert await code_of(job(bundle, b"")) == "invalid_argument"
    assert await code_of(job(bundle, ep, ports=["no spaces"])) == "invalid_argument"
    assert await code_of(job(bundle, ep, timeout_seconds=-1)) == "invalid_argument"
    assert await code_of(pb.RunJobRequest(job_id="x1", serialized_entrypoint=ep, bundle_gcs_path="ftp://h/b.zip")) == (
        "invalid_argument"
    )
    gpu = pb.ResourceSpec(device=pb.DeviceConfig(gpu=pb.GpuDevice(variant="H100", count=1)))
    assert await code_of(job(bundle, ep, resources=gpu)) == "failed_precondition"

    for method in ("status", "kill"):
        with pytest.raises(RpcError) as e:
            await getattr(c, method)("no-such-job")
        assert e.value.code == "not_found"
    assert await c.fetch_logs("no-such-job") == []

    # A missing bundle: FAILED, and the error names it.
    missing = await harness.run(job(tmp_path / "nope.zip", ep))
    assert missing.state == pb.JOB_STATE_FAILED
    assert "nope.zip" in missing.error and "\n" not in missing.error
    # Bytes that do not unpickle: FAILED in the container, never unpickled here.
    garbage = await harness.run(job(bundle, b"\x80\x05not a pickle"))
    assert garbage.state == pb.JOB_STATE_FAILED
    assert garbage.error.startswith("Exit code: 1: could not load the entrypoint: _pickle.UnpicklingError: ")


@pytest_twisted.ensureDeferred
async def test_same_attempt_is_idempotent_and_a_clash_is_already_exists(harness: Harness, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    request = job(bundle, entrypoint(sleep_for, 600), job_id="dup", attempt_id=1)
    first = await harness.client.run_job(request)
    again = await harness.client.run_job(request)
    assert again.job_id == first.job_id == "dup"
    clash = job(bundle, entrypoint(sleep_for, 600), job_id="dup", attempt_id=2)
    with pytest.raises(RpcError) as e:
        await harness.client.run_job(clash)
    assert e.value.code == "already_exists"
    await harness.client.kill("dup", term_timeout_ms=500)
    # A newer attempt of a finished job replaces it.
    replaced = await harness.run(job(bundle, entrypoint(add_and_read, 0, 0), job_id="dup", attempt_id=2))
    assert replaced.state == pb.JOB_STATE_SUCCEEDED
    assert replaced.current_attempt_id == 2


@pytest_twisted.ensureDeferred
async def test_concurrency_limit_keeps_jobs_pending_in_order(tmp_path: Path) -> None:
    h = await start_worker(worker_config(tmp_path, max_concurrent_jobs=1))
    try:
        bundle = make_bundle(tmp_path)
        ids = [f"q{i}" for i in range(3)]
        for job_id in ids:
            await h.client.run_job(job(bundle, entrypoint(sleep_for, 600), job_id=job_id))
        await h.wait_state("q0", {pb.JOB_STATE_RUNNING})
        assert (await h.client.status("q1")).state == pb.JOB_STATE_PENDING
        assert (await h.client.status("q2")).state == pb.JOB_STATE_PENDING
        # Waiting jobs are on disk already: a worker that dies now still knows them.
        for waiting in ("q1", "q2"):
            saved = json.loads((tmp_path / "state" / "jobs" / waiting / "record.json").read_text())
            assert saved["state"] == "PENDING"
        await h.client.kill("q0", term_timeout_ms=100)
        await h.wait_state("q1", {pb.JOB_STATE_RUNNING})
        assert (await h.client.status("q2")).state == pb.JOB_STATE_PENDING
        # A kill while PENDING never starts anything.
        await h.client.kill("q2")
        assert (await h.client.status("q2")).state == pb.JOB_STATE_KILLED
        await h.client.kill("q1", term_timeout_ms=100)
    finally:
        await h.worker.stopService()


@pytest_twisted.ensureDeferred
async def test_finished_jobs_survive_a_restart(tmp_path: Path) -> None:
    config = worker_config(tmp_path)
    h = await start_worker(config)
    status = await h.run(job(make_bundle(tmp_path), entrypoint(add_and_read, 20, 22), job_id="keep"))
    assert status.state == pb.JOB_STATE_SUCCEEDED
    await h.worker.stopService()

    h2 = await start_worker(config)
    try:
        again = await h2.client.status("keep", include_result=True)
        assert again.state == pb.JOB_STATE_SUCCEEDED
        assert result_of(again)["sum"] == 42
        assert [j.job_id for j in (await h2.client.list_jobs()).jobs] == ["keep"]
    finally:
        await h2.worker.stopService()
