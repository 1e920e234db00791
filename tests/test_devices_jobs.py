"""GPU and TPU jobs through the real JobManager and JobExecution on fakes (JobRig):
they wait PENDING in arrival order without a slot, get exactly their devices,
hold them until the container is gone, and leave the line when killed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred

from fluster_worker.accelerators import Accelerators
from fluster_worker.jobs.devices import JobDevices
from fluster_worker.jobs.model import DeviceRequest, JobState, PreconditionFailed
from fluster_worker.testing.jobs import JobRig, result
from tests.test_devices import GPU_WORKER, TPU_WORKER


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[JobRig]:
    rig = JobRig(tmp_path, slots=3, devices=JobDevices(Accelerators(GPU_WORKER.gpus, TPU_WORKER.tpus)))
    rig.start()
    yield rig
    result(rig, rig.stop())


def gpu(count: int, variant: str = "") -> DeviceRequest:
    return DeviceRequest("gpu", variant, count)


def state(rig: JobRig, job_id: str) -> tuple[str, str]:
    record = rig.record(job_id)
    return record.state.name, record.status_message


def test_gpu_jobs_wait_pending_in_arrival_order_and_get_exactly_their_gpus(rig: JobRig) -> None:
    rig.submit("g1", device=gpu(2))
    rig.submit("g2", device=gpu(3))
    rig.submit("g3", device=gpu(1))  # GPU 3 is free, but g2 came first
    rig.submit("cpu")  # needs no GPU: not stuck behind them

    assert state(rig, "g1")[0] == "RUNNING"
    assert rig.container("g1").spec.gpu_ids == ("0", "1")
    assert rig.container("g1").spec.env["NVIDIA_VISIBLE_DEVICES"] == "0,1"
    assert rig.container("g1").spec.env["FLUSTER_GPU_IDS"] == "0,1"
    assert state(rig, "g2") == ("PENDING", "waiting for 3 GPUs")
    assert state(rig, "g3") == ("PENDING", "waiting for 1 GPU")
    assert state(rig, "cpu")[0] == "RUNNING"
    assert rig.container("cpu").spec.gpu_ids == () and rig.container("cpu").spec.env["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert rig.slots.tokens == 1  # the waiting jobs hold no slot
    # The ids are in the record on disk from the start of the build: a worker
    # restarted meanwhile can hold them again.
    saved = json.loads((rig.store.job_dir("g1") / "record.json").read_text())
    assert saved["devices"] == ["0", "1"]

    rig.container("g1").exit(0)
    rig.settle()
    assert state(rig, "g1")[0] == "SUCCEEDED"
    assert rig.container("g2").spec.gpu_ids == ("0", "1", "3")
    assert state(rig, "g3")[0] == "PENDING"
    rig.container("g2").exit(0)
    rig.settle()
    assert rig.container("g3").spec.gpu_ids == ("0",)
    assert rig.record("g3").devices == ["0"]


def test_a_kill_while_waiting_leaves_the_line_and_starts_no_container(rig: JobRig) -> None:
    rig.submit("g1", device=gpu(3))
    rig.submit("g2", device=gpu(3))
    rig.submit("g3", device=gpu(1))
    result(rig, Deferred.fromCoroutine(rig.manager.kill("g2", 1000)))
    assert state(rig, "g2")[0] == "KILLED"
    assert not [c for c in rig.runtime.containers.values() if c.spec.labels.get("fluster.job_id") == "g2"]
    assert rig.record("g2").devices == []
    rig.container("g1").exit(0)
    rig.settle()
    assert rig.container("g3").spec.gpu_ids == ("0",)


def test_devices_are_held_until_the_container_is_gone(rig: JobRig) -> None:
    rig.submit("g1", device=gpu(3))
    rig.submit("g2", device=gpu(1))
    hold = rig.runtime.hold("remove")
    rig.container("g1").exit(1)
    rig.settle()
    assert state(rig, "g2")[0] == "PENDING"  # g1's container is not removed yet
    assert rig.manager.find("g1") is not None and not rig.record("g1").state.terminal
    hold.release()
    rig.settle()
    assert rig.record("g1").state is JobState.FAILED
    assert rig.container("g2").spec.gpu_ids == ("0",)


def test_tpu_jobs_one_at_a_time(rig: JobRig) -> None:
    rig.submit("t1", device=DeviceRequest("tpu", "v4-8"))
    rig.submit("t2", device=DeviceRequest("tpu"))
    spec = rig.container("t1").spec
    assert spec.devices == ("/dev/accel0", "/dev/accel1") and spec.group_add == (4242,)
    assert spec.env["TPU_ACCELERATOR_TYPE"] == "v4-8" and spec.env["FLUSTER_TPU_DEVICES"] == "/dev/accel0,/dev/accel1"
    assert spec.memlock_unlimited and spec.shm_size_bytes == 16 * 2**30
    assert state(rig, "t2") == ("PENDING", "waiting for the TPU")
    rig.container("t1").exit(0)
    rig.settle()
    assert state(rig, "t2")[0] == "RUNNING"


def test_shutdown_with_jobs_in_line(rig: JobRig) -> None:
    rig.submit("g1", device=gpu(3))
    rig.submit("g2", device=gpu(3))
    result(rig, rig.manager.stopService())
    # The jobs are left as they are for the next worker process (it re-adopts g1
    # with its GPUs and puts g2 back in line); this one holds nothing any more.
    assert (state(rig, "g1")[0], state(rig, "g2")[0]) == ("RUNNING", "PENDING")
    assert rig.kit.devices.gpus.held == frozenset()
    assert rig.kit.admission is not None and rig.kit.admission.waiting == 0


def test_impossible_requests_are_refused_at_submit(rig: JobRig) -> None:
    for device, message in (
        (gpu(4), "4 GPUs requested, this worker has 3"),
        (gpu(1, "H100"), "this worker's GPUs are A100, not H100"),
        (DeviceRequest("tpu", "v5p-8"), "this worker's TPU is v4-8, not v5p-8"),
    ):
        with pytest.raises(PreconditionFailed) as e:
            rig.submit("nope", device=device)
        assert e.value.message == message
    assert rig.manager.find("nope") is None
