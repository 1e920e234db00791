"""Devices on the dashboard, in /api and in /metrics (fakes, no Docker)."""

from __future__ import annotations

from twisted.internet.defer import DeferredSemaphore

from fluster_worker.accelerators import Accelerators
from fluster_worker.jobs.admission import Admission
from fluster_worker.jobs.devices import JobDevices
from fluster_worker.jobs.model import DeviceRequest, JobSpec, JobState
from fluster_worker.testing.dashboard import FakeWorker, make_record
from tests.test_dashboard import Client
from tests.test_devices import GPU_WORKER, TPU_WORKER
from tests.test_metrics import Scraper, value


def device_worker() -> FakeWorker:
    """A fake worker with GPUs 0, 1, 3 and two TPU device nodes: a GPU job holds 0
    and 1, a TPU job holds the TPU, another GPU job waits for two GPUs."""
    worker = FakeWorker()
    devices = JobDevices(Accelerators(GPU_WORKER.gpus, TPU_WORKER.tpus))
    line = Admission(DeferredSemaphore(8), devices)
    worker.devices = devices  # type: ignore[attr-defined]

    def spec(kind: str, count: int = 0, variant: str = "") -> JobSpec:
        s = JobSpec()
        devices.check(DeviceRequest(kind, variant, count), s)
        return s

    gpu = make_record("gpu-job", JobState.RUNNING, spec=spec("gpu", 2, "A100"))
    gpu.devices = list(line.enter(gpu.spec).ids or ())
    tpu = make_record("tpu-job", JobState.RUNNING, spec=spec("tpu", 0, "v4-8"))
    tpu.devices = list(line.enter(tpu.spec).ids or ())
    waiting = make_record("waiting-job", JobState.PENDING, spec=spec("gpu", 2))
    assert not line.enter(waiting.spec).admitted
    waiting.status_message = devices.waiting_message(waiting.spec)
    for record in (gpu, tpu, waiting, make_record("cpu-job", JobState.SUCCEEDED)):
        worker.manager.add(record)
    return worker


def test_api_shows_each_jobs_devices() -> None:
    client = Client(device_worker())
    jobs = {j["job_id"]: j for j in client.get("/api/v1/jobs").json()["jobs"]}
    gpu = {"kind": "gpu", "ids": ["0", "1"], "count": 2, "variant": "A100", "topology": ""}
    assert jobs["gpu-job"]["devices"] == gpu
    assert jobs["tpu-job"]["devices"]["ids"] == ["/dev/accel0", "/dev/accel1"]
    assert jobs["waiting-job"]["devices"]["ids"] == [] and jobs["waiting-job"]["status_message"] == "waiting for 2 GPUs"
    assert jobs["cpu-job"]["devices"] is None
    assert client.get("/api/v1/jobs/gpu-job").json()["devices"]["ids"] == ["0", "1"]


def test_the_existing_workers_api_shapes_carry_devices_too() -> None:
    client = Client(device_worker())
    rows = {j["job_id"]: j for j in client.get("/api/jobs").json()}
    assert rows["gpu-job"]["devices"]["ids"] == ["0", "1"] and rows["cpu-job"]["devices"] is None
    assert client.get("/api/jobs/tpu-job").json()["devices"]["ids"] == ["/dev/accel0", "/dev/accel1"]


def test_api_stats_show_the_workers_devices() -> None:
    devices = Client(device_worker()).get("/api/v1/stats").json()["resources"]["devices"]
    assert devices["known"] is True
    assert devices["gpu"] == {
        "ids": ["0", "1", "3"], "in_use": ["0", "1"], "waiting": 1, "name": "NVIDIA A100-SXM4-80GB", "variant": "A100",
    }
    assert devices["tpu"]["in_use"] == ["/dev/accel0", "/dev/accel1"] and devices["tpu"]["accelerator_type"] == "v4-8"


def test_pages_show_devices() -> None:
    client = Client(device_worker())
    index = client.get("/").text
    assert "GPU 0, 1" in index and "TPU (2 device nodes)" in index and "2 wanted" in index
    assert "2 of 3 in use" in index and "1 waiting" in index
    detail = client.get("/job/tpu-job").text
    assert "/dev/accel0, /dev/accel1" in detail
    assert "2 GPUs · A100" in client.get("/job/gpu-job").text


def test_metrics_show_devices_in_use() -> None:
    _, samples = Scraper(device_worker()).scrape()
    assert value(samples, "fluster_worker_devices", kind="gpu") == 3
    assert value(samples, "fluster_worker_devices_in_use", kind="gpu") == 2
    assert value(samples, "fluster_worker_device_requests_waiting", kind="gpu") == 1
    assert value(samples, "fluster_worker_device_in_use", kind="gpu", device="1") == 1
    assert value(samples, "fluster_worker_device_in_use", kind="gpu", device="3") == 0
    assert ("fluster_worker_device_in_use", (("device", "3"), ("kind", "gpu"))) in samples
    assert value(samples, "fluster_worker_devices_in_use", kind="tpu") == 2


def test_a_worker_without_devices_shows_none() -> None:
    _, samples = Scraper(FakeWorker()).scrape()
    assert not any(name.startswith("fluster_worker_device") for name, _ in samples)
