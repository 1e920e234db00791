"""A job cannot reach past its container (issue 12), on the real engine: the
worker reads nothing the job could have pointed elsewhere."""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import docker
import docker.errors
import pytest
import pytest_twisted
import requests
import treq
from twisted.internet import reactor
from twisted.logger import globalLogPublisher, textFileLogObserver

from fluster_worker.testing.client import RpcError
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.worker import assemble
from tests.jobkit import Harness, entrypoint, make_bundle, start_worker, until, worker_config

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


# -- the job's user, its files and their modes ------------------------------------

def whoami() -> dict[str, Any]:
    import tempfile

    seen: dict[str, Any] = {
        "ids": (os.getuid(), os.getgid(), os.geteuid(), os.getegid(), os.getgroups()),
        "home": os.environ.get("HOME"),
        "cwd": os.getcwd(),
        "bundle": open("/app/data.txt").read(),
    }
    for d in ("/workdir", "/tmp", "/var/tmp", os.path.expanduser("~")):
        with open(os.path.join(d, "probe"), "w") as f:
            f.write("x")
    seen["tempdir"] = os.path.dirname(tempfile.mkdtemp())
    refused = {}
    for path in ("/app/new.txt", "/app/data.txt", "/new.txt", "/run/lock/x", "/opt/venv/x", "/etc/passwd"):
        try:
            open(path, "a").close()
            refused[path] = "written"
        except OSError as e:
            refused[path] = e.strerror
    seen["refused"] = refused
    return seen


def plant_setuid_and_wait() -> None:
    import shutil
    import time

    for d in ("/workdir", "/tmp", "/fluster/out"):
        path = os.path.join(d, "suid_py")
        shutil.copy("/usr/bin/python3", path)
        os.chmod(path, 0o6755)
        try:
            os.chown(path, 0, 0)  # what would make it setuid-root
        except PermissionError:
            pass
    print("planted", flush=True)
    time.sleep(600)


async def wait_for_line(harness: Harness, job_id: str, text: str) -> None:
    async def seen() -> bool:
        entries = await harness.client.fetch_logs(job_id, regex=text)
        if entries:
            return True
        status = await harness.client.status(job_id)
        assert status.state in (pb.JOB_STATE_PENDING, pb.JOB_STATE_BUILDING, pb.JOB_STATE_RUNNING), status
        return False

    await until(seen, 300, f"{text!r} in the logs of {job_id}")


@pytest_twisted.ensureDeferred
async def test_job_runs_unprivileged_with_only_its_directories_writable(harness: Harness, tmp_path: Path) -> None:
    status = await harness.run(job(make_bundle(tmp_path / "b"), entrypoint(whoami)))
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    seen = cloudpickle.loads(status.serialized_result)
    assert seen["ids"] == (10001, 10001, 10001, 10001, [10001])
    assert seen["home"] == "/workdir" and seen["cwd"] == "/app" and seen["tempdir"] == "/tmp"
    assert seen["bundle"] == "hello from the bundle\n"
    assert seen["refused"] == {
        "/app/new.txt": "Read-only file system",  # the cached bundle itself, mounted read-only
        "/app/data.txt": "Permission denied",  # (not its file, and read-only as well)
        "/new.txt": "Read-only file system",
        "/run/lock/x": "Read-only file system",  # world-writable in the image
        "/opt/venv/x": "Read-only file system",
        "/etc/passwd": "Permission denied",
    }
    # No copy of the bundle per job.
    assert list(harness.worker.store.app_dir(status.job_id).iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_no_setuid_root_file_and_private_modes(harness: Harness, tmp_path: Path) -> None:
    config = harness.worker.config
    request = job(make_bundle(tmp_path / "b"), entrypoint(plant_setuid_and_wait), environment=pb.EnvironmentConfig(
        env_vars={"API_TOKEN": "s3cret"}))
    await harness.client.run_job(request)
    await wait_for_line(harness, request.job_id, "planted")
    store = harness.worker.store
    job_dir = store.job_dir(request.job_id)
    planted = []
    for path in [job_dir, *job_dir.rglob("*")]:
        st = path.lstat()
        assert not (st.st_mode & stat.S_ISUID and st.st_uid == 0), path
        assert not (st.st_mode & stat.S_ISGID and st.st_gid == 0), path
        if path.name == "suid_py":
            planted.append((path.parent.name, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)))
    # The job did make setuid files, but only of its own unprivileged user.
    assert sorted(planted) == [("out", 10001, 10001, 0o6755), ("tmp", 10001, 10001, 0o6755),
                               ("workdir", 10001, 10001, 0o6755)]

    def mode(path: Path) -> tuple[int, int, int]:
        st = path.lstat()
        return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid

    assert mode(config.state_dir) == (0o700, 0, 0)
    assert mode(config.cache_dir) == (0o700, 0, 0)
    assert mode(store.root) == (0o700, 0, 0)
    assert mode(job_dir) == (0o700, 0, 0)
    assert mode(job_dir / "record.json") == (0o600, 0, 0)  # holds API_TOKEN
    assert "s3cret" in (job_dir / "record.json").read_text()
    assert mode(store.entrypoint_path(request.job_id)) == (0o600, 10001, 10001)
    for d in (store.out_dir(request.job_id), store.workdir(request.job_id), store.tmp_dir(request.job_id)):
        assert mode(d) == (0o700, 10001, 10001), d
    await harness.client.kill(request.job_id, term_timeout_ms=100)
    status = await harness.wait_state(request.job_id)
    assert status.state == pb.JOB_STATE_KILLED
    assert not store.workdir(request.job_id).exists() and not store.tmp_dir(request.job_id).exists()


# -- bounds ------------------------------------------------------------------------

def containers_of(docker_client: Any, worker_id: str, job_id: str) -> list[Any]:
    return list(docker_client.containers.list(
        all=True, filters={"label": [f"fluster.worker_id={worker_id}", f"fluster.job_id={job_id}"]}))


@pytest_twisted.ensureDeferred
async def test_environment_bounds_refuse_at_once(harness: Harness, tmp_path: Path, docker_client: Any) -> None:
    bundle = make_bundle(tmp_path / "b")
    ep = entrypoint(whoami)
    too_many = job(bundle, ep, environment=pb.EnvironmentConfig(
        env_vars={f"V{i}": "x" for i in range(1_000_001)}))
    too_big = job(bundle, ep, environment=pb.EnvironmentConfig(env_vars={"BIG": "x" * (128 * 1024)}))
    for request, message in (
        (too_many, "too many environment variables: 1000001, over the limit of 1000 (--max-env-vars)"),
        (too_big, "environment variables take more than 131072 bytes (--max-env-bytes)"),
    ):
        with pytest.raises(RpcError) as info:
            await harness.client.run_job(request)
        assert (info.value.code, info.value.message) == ("invalid_argument", message)
        with pytest.raises(RpcError) as unknown:
            await harness.client.status(request.job_id)
        assert unknown.value.code == "not_found"
        assert containers_of(docker_client, harness.worker.worker_id, request.job_id) == []
    # At the bounds, a job runs.
    at_bounds = {f"V{i}": "x" for i in range(999)}
    at_bounds["LAST"] = "y" * 1000
    status = await harness.run(job(bundle, entrypoint(counted_env), environment=pb.EnvironmentConfig(
        env_vars=at_bounds)))
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    assert cloudpickle.loads(status.serialized_result) == (999, "y" * 1000)


def counted_env() -> tuple[int, str]:
    return sum(1 for k in os.environ if k.startswith("V") and k[1:].isdigit()), os.environ["LAST"]


def fill_disk(mib: int) -> None:
    import time

    with open("/workdir/big", "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(2**20))
    print("written", flush=True)
    time.sleep(600)


def write_and_finish() -> str:
    for d in ("/workdir", "/tmp"):
        with open(os.path.join(d, "data"), "wb") as f:
            f.write(b"x" * 100_000)
    print("done writing", flush=True)
    return "finished"


@pytest_twisted.async_yield_fixture
async def small_disk(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_worker(worker_config(tmp_path, max_job_disk_bytes=32 * 2**20))
    yield h
    await h.worker.stopService()


@pytest_twisted.ensureDeferred
async def test_writing_past_the_disk_limit_fails_the_job(small_disk: Harness, tmp_path: Path) -> None:
    harness = small_disk
    bundle = make_bundle(tmp_path / "b")
    by_worker = job(bundle, entrypoint(fill_disk, 48))
    by_request = job(bundle, entrypoint(fill_disk, 24), resources=pb.ResourceSpec(disk="16m"))
    for request in (by_worker, by_request):
        await harness.client.run_job(request)
    first = await harness.wait_state(by_worker.job_id, timeout=300)
    second = await harness.wait_state(by_request.job_id, timeout=300)
    space = "Disk limit exceeded: the job's writable space (/workdir, /tmp, /fluster/out) holds"
    assert first.state == pb.JOB_STATE_FAILED, first
    assert first.error.startswith(space) and first.error.endswith(
        "over its limit of 32.0 MiB (--max-job-disk)"), first.error
    assert second.state == pb.JOB_STATE_FAILED, second
    assert second.error.startswith(space) and second.error.endswith(
        "over its limit of 16.0 MiB (resources.disk 16m)"), second.error
    store = harness.worker.store
    for status in (first, second):
        assert not store.workdir(status.job_id).exists()
        assert store.out_dir(status.job_id).is_dir()  # the result dir stays until retention
    # Asking for more than the worker allows is refused up front.
    with pytest.raises(RpcError) as info:
        await harness.client.run_job(job(bundle, entrypoint(fill_disk, 1), resources=pb.ResourceSpec(disk="1g")))
    assert info.value.code == "invalid_argument"
    assert info.value.message == "resources.disk 1g exceeds this worker's --max-job-disk of 32 MiB"


@pytest.mark.parametrize("keep", [False, True])
@pytest_twisted.ensureDeferred
async def test_workdir_goes_when_the_job_ends_unless_kept(tmp_path: Path, keep: bool) -> None:
    harness = await start_worker(worker_config(tmp_path, keep_workdir=keep))
    try:
        status = await harness.run(job(make_bundle(tmp_path / "b"), entrypoint(write_and_finish)))
        assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
        store = harness.worker.store
        assert (store.workdir(status.job_id) / "data").exists() is keep
        assert (store.tmp_dir(status.job_id) / "data").exists() is keep
        # Logs and result stay.
        assert cloudpickle.loads((await harness.client.status(status.job_id, True)).serialized_result) == "finished"
        assert [e.data for e in await harness.client.fetch_logs(status.job_id, regex="done")] == ["done writing"]
    finally:
        await harness.worker.stopService()


# -- the engine's own copy of the logs ----------------------------------------------

def flood_and_wait(mib: int) -> None:
    import sys
    import time

    line = "x" * 1023 + "\n"
    print("first line", flush=True)
    while not os.path.exists("/workdir/go"):  # the test has seen the first line
        time.sleep(0.05)
    for _ in range(mib * 1024):
        sys.stdout.write(line)
    sys.stdout.flush()
    print("flooded", flush=True)
    time.sleep(600)


@pytest_twisted.ensureDeferred
async def test_engine_log_is_capped_like_the_worker_log(tmp_path: Path, docker_client: Any) -> None:
    cap = 256 * 1024
    harness = await start_worker(worker_config(tmp_path, log_max_stream_bytes=cap))
    try:
        request = job(make_bundle(tmp_path / "b"), entrypoint(flood_and_wait, 16))
        await harness.client.run_job(request)
        await wait_for_line(harness, request.job_id, "first line")
        (harness.worker.store.workdir(request.job_id) / "go").touch()
        await wait_for_line(harness, request.job_id, "flooded")
        (container,) = containers_of(docker_client, harness.worker.worker_id, request.job_id)
        config = container.attrs["HostConfig"]["LogConfig"]
        assert config == {"Type": "json-file", "Config": {"max-file": "2", "max-size": str(cap)}}
        log_path = Path(container.attrs["LogPath"])
        files = list(log_path.parent.glob(log_path.name + "*"))
        engine_bytes = sum(f.stat().st_size for f in files)
        # 16 MiB went through; the engine holds at most two files of the cap (and a line).
        assert engine_bytes <= 2 * cap + 4096, (engine_bytes, files)
        # The worker kept its head and its tail.
        kept = await harness.client.fetch_logs(request.job_id, regex="first line|flooded")
        assert [e.data for e in kept] == ["first line", "flooded"]
        await harness.client.kill(request.job_id, term_timeout_ms=100)
        assert (await harness.wait_state(request.job_id)).state == pb.JOB_STATE_KILLED
    finally:
        await harness.worker.stopService()


# -- a create or a start that fails or times out leaves no container ------------------

class FailingApi:
    """The real docker API, but create or start does its work and then times out
    (what a client sees when the engine is slow), or fails outright."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.fail: str = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def create_container(self, *args: Any, **kwargs: Any) -> Any:
        result = self._real.create_container(*args, **kwargs)
        if self.fail == "create":
            raise requests.exceptions.ReadTimeout("read timed out (test)")
        return result

    def start(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail == "start":
            raise requests.exceptions.ReadTimeout("read timed out (test)")
        if self.fail == "start-error":
            raise docker.errors.APIError("start failed (test)")
        return self._real.start(*args, **kwargs)


class FailingClient:
    def __init__(self) -> None:
        self.real = docker.from_env()
        self.api = FailingApi(self.real.api)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest_twisted.ensureDeferred
async def test_failed_or_timed_out_create_and_start_leave_no_container(tmp_path: Path, docker_client: Any) -> None:
    client = FailingClient()
    worker = assemble(worker_config(tmp_path), reactor, docker_client=lambda: client)
    worker.startService()
    assert worker.web is not None
    harness = Harness(worker, f"http://127.0.0.1:{await worker.web.when_listening()}")
    try:
        bundle = make_bundle(tmp_path / "b")
        for mode in ("create", "start", "start-error"):
            client.api.fail = mode
            status = await harness.run(job(bundle, entrypoint(whoami)))
            assert status.state == pb.JOB_STATE_FAILED, status
            assert status.error.startswith(f"container {mode.split('-')[0]} failed: "), status.error
            assert containers_of(docker_client, worker.worker_id, status.job_id) == []
    finally:
        await worker.stopService()
        client.real.close()
