"""GPUs and TPUs on the real engine. This machine has no GPU runtime: a GPU job's
container is created with its device request (inspected before start), then
start fails, and the job says so in one line. TPUs are device nodes made here
with mknod (the numbers of /dev/null) under a temporary directory."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import docker
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from fluster_worker.common.threads import BlockingPool
from fluster_worker.containers.runtime import ContainerError, ContainerRuntime, ContainerSpec, container_name
from fluster_worker.testing.client import RpcError
from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import Harness, entrypoint, make_bundle, start_worker, until, worker_config

pytestmark = pytest.mark.docker

TPU_ENV = {
    "TPU_NAME": "test-slice",
    "TPU_WORKER_ID": "0",
    "TPU_WORKER_HOSTNAMES": "host-a,host-b",
    "TPU_CHIPS_PER_HOST_BOUNDS": "2,2,1",
    "TPU_HOST_BOUNDS": "1,1,2",
    "TPU_ACCELERATOR_TYPE": "v4-16",
}
TPU_GROUP = 4242


# -- the jobs (pickled by value; they run inside the container) ---------------


def tpu_probe(paths: list[str]) -> dict[str, Any]:
    import os
    import stat

    seen = {}
    for path in paths:
        st = os.stat(path)
        with open(path, "w") as f:  # the /dev/null numbers: writes vanish
            written = f.write("hello, TPU\n")
        seen[path] = {"char": stat.S_ISCHR(st.st_mode), "rdev": st.st_rdev, "written": written}
    shm = os.statvfs("/dev/shm")
    return {
        "devices": seen,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("TPU_", "FLUSTER_TPU", "NVIDIA_"))},
        "groups": os.getgroups(),
        "shm_bytes": shm.f_blocks * shm.f_frsize,
    }


def wait_for_file(path: str) -> str:
    import os
    import time

    while not os.path.exists(path):
        time.sleep(0.05)
    return "done"


def nothing() -> str:
    return "ok"


# -- helpers --------------------------------------------------------------------


def char_device(path: Path, mode: int, gid: int = 0) -> None:
    """A character device with /dev/null's major and minor numbers."""
    os.mknod(path, stat.S_IFCHR | mode, os.stat("/dev/null").st_rdev)
    os.chmod(path, mode)  # mknod's mode is masked by the umask
    os.chown(path, 0, gid)


def containers_of(docker_client: Any, worker_id: str, job_id: str) -> list[Any]:
    return list(
        docker_client.containers.list(
            all=True, filters={"label": [f"fluster.worker_id={worker_id}", f"fluster.job_id={job_id}"]}
        )
    )


def job(bundle: Path, ep: bytes, device: pb.DeviceConfig | None = None, **fields: Any) -> pb.RunJobRequest:
    return pb.RunJobRequest(
        job_id=fields.pop("job_id", f"job-{uuid.uuid4().hex[:8]}"),
        serialized_entrypoint=ep,
        bundle_gcs_path=f"file://{bundle}",
        resources=pb.ResourceSpec(device=device) if device is not None else None,
        **fields,
    )


def gpus(count: int, variant: str = "") -> pb.DeviceConfig:
    return pb.DeviceConfig(gpu=pb.GpuDevice(variant=variant, count=count))


def tpu(variant: str = "", topology: str = "") -> pb.DeviceConfig:
    return pb.DeviceConfig(tpu=pb.TpuDevice(variant=variant, topology=topology))


async def metrics(harness: Harness) -> str:
    response = await treq.get(harness.url + "/metrics")
    return (await response.content()).decode()  # type: ignore[no-any-return]


def inspect_before_start(harness: Harness, pool: BlockingPool, client: Any) -> list[dict[str, Any]]:
    """Make the worker's runtime inspect each container between create and start."""
    runtime = harness.worker.runtime
    original: Callable[[str], Awaitable[None]] = runtime.start
    seen: list[dict[str, Any]] = []

    async def start(container_id: str) -> None:
        seen.append(await pool.run(client.api.inspect_container, container_id))
        await original(container_id)

    runtime.start = lambda cid: Deferred.fromCoroutine(start(cid))  # type: ignore[method-assign,assignment]
    return seen


# -- the runtime alone --------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def runtime(blocking_pool: BlockingPool, docker_client: Any) -> AsyncIterator[ContainerRuntime]:
    rt = ContainerRuntime(reactor, blocking_pool, docker.from_env, f"t{uuid.uuid4().hex[:8]}")  # type: ignore[arg-type]
    rt.startService()
    try:
        yield rt
    finally:
        await rt.remove_orphans()
        await rt.stopService()


def spec(runtime: ContainerRuntime, image: str, **fields: Any) -> ContainerSpec:
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    return ContainerSpec(
        name=container_name(runtime.worker_id, job_id, 0),
        image=image,
        command=["true"],
        labels={"fluster.job_id": job_id},
        **fields,
    )


@pytest_twisted.ensureDeferred
async def test_gpu_container_asks_the_engine_for_exactly_its_gpus(
    runtime: ContainerRuntime, base_image: str, blocking_pool: BlockingPool, docker_client: Any
) -> None:
    cid = await runtime.create(spec(runtime, base_image, gpu_ids=("1", "3")))
    info = await blocking_pool.run(docker_client.api.inspect_container, cid)
    requests = info["HostConfig"]["DeviceRequests"]
    assert len(requests) == 1
    assert requests[0]["Driver"] == "nvidia"
    assert requests[0]["DeviceIDs"] == ["1", "3"]
    assert requests[0]["Capabilities"] == [["gpu"]]
    assert not requests[0].get("Count")  # the ids, not "any n GPUs"
    # This engine has no GPU runtime: start fails, and says so in one line.
    with pytest.raises(ContainerError) as e:
        await runtime.start(cid)
    message = str(e.value)
    assert message.startswith("container start failed: the Docker engine has no GPU runtime"), message
    assert 'could not select device driver "nvidia"' in message and "\n" not in message
    await runtime.remove(cid)


@pytest_twisted.ensureDeferred
async def test_tpu_container_host_config(
    runtime: ContainerRuntime, base_image: str, blocking_pool: BlockingPool, docker_client: Any, tmp_path: Path
) -> None:
    char_device(tmp_path / "accel0", 0o660, TPU_GROUP)
    node = str(tmp_path / "accel0")
    fields = dict(devices=(node,), group_add=(TPU_GROUP,), shm_size_bytes=2**30, memlock_unlimited=True)
    cid = await runtime.create(spec(runtime, base_image, **fields))
    host = (await blocking_pool.run(docker_client.api.inspect_container, cid))["HostConfig"]
    assert host["Devices"] == [{"PathOnHost": node, "PathInContainer": node, "CgroupPermissions": "rwm"}]
    assert host["GroupAdd"] == [str(TPU_GROUP)]
    assert host["ShmSize"] == 2**30
    assert {"Name": "memlock", "Soft": -1, "Hard": -1} in host["Ulimits"]
    assert not host.get("DeviceRequests")
    await runtime.remove(cid)


# -- GPU jobs through the worker ------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def gpu_worker(tmp_path: Path) -> AsyncIterator[Harness]:
    # No nvidia-smi here: the ids are the operator's word (--gpus 0,1,3).
    h = await start_worker(worker_config(tmp_path, gpus="0,1,3"))
    yield h
    await h.worker.stopService()


@pytest_twisted.ensureDeferred
async def test_gpu_job_gets_its_ids_then_fails_in_one_line_leaving_no_container(
    gpu_worker: Harness, tmp_path: Path, blocking_pool: BlockingPool, docker_client: Any
) -> None:
    h = gpu_worker
    seen = inspect_before_start(h, blocking_pool, docker_client)
    bundle = make_bundle(tmp_path)
    status = await h.run(job(bundle, entrypoint(nothing), gpus(2, "auto")))

    assert status.state == pb.JOB_STATE_FAILED
    assert "the Docker engine has no GPU runtime" in status.error and "\n" not in status.error, status.error
    record = h.worker.manager.find(status.job_id)
    assert record is not None and record.devices == ["0", "1"]
    # Created with a device request for exactly the job's ids, and told which they are.
    assert len(seen) == 1
    (request,) = seen[0]["HostConfig"]["DeviceRequests"]
    assert (request["Driver"], request["DeviceIDs"], request["Capabilities"]) == ("nvidia", ["0", "1"], [["gpu"]])
    env = dict(item.split("=", 1) for item in seen[0]["Config"]["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "0,1" and env["FLUSTER_GPU_IDS"] == "0,1"
    # No container left; the GPUs are free again.
    assert containers_of(docker_client, h.worker.worker_id, status.job_id) == []
    assert h.worker.devices.gpus.held == frozenset()
    assert 'fluster_worker_devices{kind="gpu"} 3.0' in await metrics(h)
    assert 'fluster_worker_devices_in_use{kind="gpu"} 0.0' in await metrics(h)

    # The next one gets the free ids in order: all three.
    second = await h.run(job(bundle, entrypoint(nothing), gpus(3)))
    assert second.state == pb.JOB_STATE_FAILED and "no GPU runtime" in second.error
    assert seen[1]["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == ["0", "1", "3"]

    # More than the worker has: refused at submit, one line.
    with pytest.raises(RpcError) as e:
        await h.client.run_job(job(bundle, entrypoint(nothing), gpus(4)))
    assert e.value.code == "failed_precondition"
    assert e.value.message == "4 GPUs requested, this worker has 3"
    # A CPU job never sees a GPU, whatever it asks for in its variables.
    plain = await h.run(
        job(bundle, entrypoint(nothing), environment=pb.EnvironmentConfig(env_vars={"NVIDIA_VISIBLE_DEVICES": "all"}))
    )
    assert plain.state == pb.JOB_STATE_SUCCEEDED, plain.error
    env = dict(item.split("=", 1) for item in seen[2]["Config"]["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void" and not seen[2]["HostConfig"].get("DeviceRequests")


# -- TPU jobs through the worker ----------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def tpu_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    nodes = tmp_path / "dev"
    nodes.mkdir()
    char_device(nodes / "accel0", 0o660, TPU_GROUP)  # usable through its group only
    char_device(nodes / "accel1", 0o666)
    (nodes / "accel-readme").write_text("not a device")
    for name, value in TPU_ENV.items():
        monkeypatch.setenv(name, value)
    config = worker_config(
        tmp_path,
        tpu_devices=(str(nodes / "accel*"),),
        accelerator_shm_bytes=2**30,
        # This engine lacks CAP_SYS_RESOURCE: it may not raise RLIMIT_MEMLOCK.
        tpu_memlock_unlimited=False,
    )
    h = await start_worker(config)
    yield h
    await h.worker.stopService()


def tpu_nodes(tmp_path: Path) -> list[str]:
    return [str(tmp_path / "dev" / "accel0"), str(tmp_path / "dev" / "accel1")]


@pytest_twisted.ensureDeferred
async def test_tpu_job_sees_every_device_node_and_the_tpu_variables(tpu_worker: Harness, tmp_path: Path) -> None:
    import cloudpickle

    nodes = tpu_nodes(tmp_path)
    status = await tpu_worker.run(job(make_bundle(tmp_path), entrypoint(tpu_probe, nodes), tpu("v4-16")))
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    seen = cloudpickle.loads(status.serialized_result)
    null = os.stat("/dev/null").st_rdev
    assert seen["devices"] == {node: {"char": True, "rdev": null, "written": 11} for node in nodes}
    for name, value in TPU_ENV.items():
        assert seen["env"][name] == value
    assert seen["env"]["FLUSTER_TPU_DEVICES"] == ",".join(nodes)
    assert seen["env"]["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert TPU_GROUP in seen["groups"]  # accel0's group: usable by an unprivileged job user too
    assert seen["shm_bytes"] == 2**30
    record = tpu_worker.worker.manager.find(status.job_id)
    assert record is not None and record.devices == nodes

    # Another type of TPU: refused at submit.
    with pytest.raises(RpcError) as e:
        await tpu_worker.client.run_job(job(make_bundle(tmp_path), entrypoint(nothing), tpu("v5p-8")))
    assert (e.value.code, e.value.message) == ("failed_precondition", "this worker's TPU is v4-16, not v5p-8")


@pytest_twisted.ensureDeferred
async def test_tpu_jobs_run_one_at_a_time_in_arrival_order(
    tpu_worker: Harness, tmp_path: Path, docker_client: Any
) -> None:
    h = tpu_worker
    bundle = make_bundle(tmp_path)
    first = job(bundle, entrypoint(wait_for_file, "/workdir/go"), tpu())
    await h.client.run_job(first)
    await h.wait_state(first.job_id, {pb.JOB_STATE_RUNNING})
    assert 'fluster_worker_devices_in_use{kind="tpu"} 2.0' in await metrics(h)

    second, killed, third = (job(bundle, entrypoint(nothing), tpu()) for _ in range(3))
    cpu_job = job(bundle, entrypoint(nothing))
    for request in (second, killed, third, cpu_job):
        await h.client.run_job(request)

    # The CPU job needs no TPU: it does not wait behind them.
    done = await h.wait_state(cpu_job.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    for request in (second, killed, third):
        status = await h.wait_state(request.job_id, {pb.JOB_STATE_PENDING})
        assert status.status_message == "waiting for the TPU"
    assert 'fluster_worker_device_requests_waiting{kind="tpu"} 3.0' in await metrics(h)

    # Killed while waiting: KILLED, no container, out of the line.
    await h.client.kill(killed.job_id)
    assert (await h.client.status(killed.job_id)).state == pb.JOB_STATE_KILLED
    assert containers_of(docker_client, h.worker.worker_id, killed.job_id) == []

    # The first one ends (its /workdir is a directory of the worker's): the
    # others follow in arrival order, one at a time.
    (h.worker.store.workdir(first.job_id) / "go").write_text("")
    ended = [await h.wait_state(r.job_id) for r in (first, second, third)]
    assert [s.state for s in ended] == [pb.JOB_STATE_SUCCEEDED] * 3, [s.error for s in ended]
    assert ended[1].started_at_ms >= ended[0].finished_at_ms
    assert ended[2].started_at_ms >= ended[1].finished_at_ms
    assert h.worker.devices.tpus.held == frozenset()


@pytest_twisted.ensureDeferred
async def test_dashboard_shows_devices(tpu_worker: Harness, tmp_path: Path) -> None:
    h = tpu_worker
    request = job(make_bundle(tmp_path), entrypoint(wait_for_file, "/workdir/go"), tpu())
    await h.client.run_job(request)
    await h.wait_state(request.job_id, {pb.JOB_STATE_RUNNING})

    async def page(path: str) -> str:
        response = await treq.get(h.url + path)
        return (await response.content()).decode()  # type: ignore[no-any-return]

    index = await page("/")
    assert "TPU (2 device nodes)" in index and "v4-16" in index
    detail = await page(f"/job/{request.job_id}")
    assert str(tmp_path / "dev" / "accel0") in detail
    (h.worker.store.workdir(request.job_id) / "go").write_text("")
    status = await h.wait_state(request.job_id)
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error

    async def free() -> bool:
        return 'fluster_worker_devices_in_use{kind="tpu"} 0.0' in await metrics(h)

    await until(free, 30, "the TPU to be free")


def memlock_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]


@pytest_twisted.ensureDeferred
async def test_tpu_memlock_unlimited_or_a_one_line_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docker_client: Any
) -> None:
    # The default: unlimited locked memory. An engine with CAP_SYS_RESOURCE grants
    # it; this machine's engine does not, and the job must say so in one line.
    (tmp_path / "dev").mkdir()
    char_device(tmp_path / "dev" / "accel0", 0o666)
    h = await start_worker(worker_config(tmp_path, tpu_devices=(str(tmp_path / "dev" / "accel*"),)))
    try:
        status = await h.run(job(make_bundle(tmp_path), entrypoint(memlock_limit), tpu()))
        if status.state == pb.JOB_STATE_SUCCEEDED:
            import resource

            import cloudpickle

            assert cloudpickle.loads(status.serialized_result) == resource.RLIM_INFINITY
        else:
            assert status.state == pb.JOB_STATE_FAILED
            assert status.error.startswith(
                "container start failed: the Docker engine may not raise the locked-memory limit"
            ), status.error
            assert "\n" not in status.error
            assert containers_of(docker_client, h.worker.worker_id, status.job_id) == []
    finally:
        await h.worker.stopService()
