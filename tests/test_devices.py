"""GPUs and TPUs without Docker: the DeviceAllocator and the line jobs wait in for
a slot and their devices (no sharing, arrival order, re-hold after a restart,
impossible requests), what the worker has (--gpus, --tpu-devices, the TPU
variables), what a request must match, and what a job's container gets."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.python.failure import Failure

from fluster_worker.accelerators import (
    DEFAULT_TPU_DEVICE_GLOBS,
    Accelerators,
    GpuInventory,
    GpuSelection,
    TpuDevice,
    TpuInventory,
    discover,
    find_tpu_devices,
    parse_gpus,
    parse_tpu_devices,
    resolve_gpus,
    tpu_environment,
)
from fluster_worker.containers.devices import DeviceAllocator, DevicesUnavailable
from fluster_worker.containers.spec import ContainerSpec
from fluster_worker.controller.advert import resource_spec, worker_metadata
from fluster_worker.host import GIB, GpuInfo, MachineFacts, detect_gpu
from fluster_worker.jobs import validation
from fluster_worker.jobs.admission import Admission, Ticket
from fluster_worker.jobs.devices import DEFAULT_SHM_BYTES, JobDevices
from fluster_worker.jobs.model import (
    DeviceRequest,
    InvalidJobRequest,
    JobRecord,
    JobRequest,
    JobSpec,
    PreconditionFailed,
    WorkerUnavailable,
)


def result(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (failing the test if it has not)."""
    out: list[Any] = []

    def grab(value: Any) -> Any:
        out.append(value)
        return None if isinstance(value, Failure) else value

    d.addBoth(grab)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def fired(d: Deferred[Any]) -> bool:
    return bool(d.called)


# -- the allocator -----------------------------------------------------------------------


def test_hands_out_free_ids_in_inventory_order_and_never_shares() -> None:
    gpus = DeviceAllocator("GPU", ["0", "1", "3"])
    first = gpus.take(2)
    assert first == ("0", "1")
    assert gpus.take(2) is None  # only "3" is free: nothing taken
    assert gpus.held == {"0", "1"}
    gpus.release(["1"])
    second = gpus.take(2)
    assert second == ("1", "3") and "0" not in second  # "0" is still the first job's
    assert gpus.held == {"0", "1", "3"} and gpus.free == ()


def test_impossible_requests_fail_at_once_holding_nothing() -> None:
    gpus = DeviceAllocator("GPU", ["0", "1"])
    with pytest.raises(DevicesUnavailable, match="3 GPU devices requested, this worker has 2"):
        gpus.take(3)
    with pytest.raises(DevicesUnavailable):
        gpus.take(-1)
    assert gpus.take(0) == ()
    assert gpus.held == frozenset()
    with pytest.raises(ValueError, match="repeat"):
        DeviceAllocator("GPU", ["0", "0"])


def test_re_hold_after_restart() -> None:
    # A new worker process: the re-adopted job's container still has GPU 1.
    gpus = DeviceAllocator("GPU", ["0", "1", "2"])
    gpus.hold(["1"])
    assert gpus.take(2) == ("0", "2")
    assert gpus.take(1) is None
    gpus.release(["1"])  # the re-adopted job ends
    assert gpus.take(1) == ("1",)


def test_hold_before_the_inventory_is_known() -> None:
    # Re-adoption may run before discovery: the held id stays held.
    gpus = DeviceAllocator("GPU")
    gpus.hold(["1"])
    gpus.set_ids(["0", "1"])
    assert gpus.free == ("0",)


# -- the line: a slot and devices, in arrival order ------------------------------------------


class Line:
    """An Admission over ``slots`` slots and the GPU_WORKER's / TPU_WORKER's devices."""

    def __init__(self, slots: int, accelerators: Accelerators | None = None) -> None:
        self.devices = JobDevices(accelerators or Accelerators(GPU_WORKER.gpus, TPU_WORKER.tpus))
        self.slots = DeferredSemaphore(slots)
        self.admission = Admission(self.slots, self.devices)
        self.started: list[str] = []
        self.tickets: dict[str, Ticket] = {}

    def enter(self, name: str, kind: str = "", count: int = 0) -> Ticket:
        spec = JobSpec()
        if kind:
            self.devices.check(DeviceRequest(kind, "", count), spec)
        ticket = self.admission.enter(spec)
        ticket.wait().addCallback(lambda ids: self.started.append(name) or ids)
        self.tickets[name] = ticket
        return ticket


def test_gpu_jobs_start_strictly_in_arrival_order() -> None:
    line = Line(slots=8)
    running = line.enter("running", "gpu", 2)
    big = line.enter("big", "gpu", 3)  # needs all three: waits
    small = line.enter("small", "gpu", 1)  # would fit now, but waits behind the big one
    assert line.started == ["running"] and running.ids == ("0", "1")
    assert not big.admitted and not small.admitted
    assert line.devices.usage()["gpu"]["waiting"] == 2
    running.leave()
    assert line.started == ["running", "big"] and big.ids == ("0", "1", "3")
    big.leave()
    assert small.ids == ("0",)
    assert line.slots.tokens == 7


def test_a_job_waiting_for_gpus_holds_no_slot_and_lets_cpu_jobs_pass() -> None:
    line = Line(slots=2)
    line.enter("g1", "gpu", 3)
    line.enter("g2", "gpu", 1)  # no GPU free: waits without a slot
    line.enter("cpu1")
    line.enter("cpu2")  # no slot free
    assert line.started == ["g1", "cpu1"]
    line.tickets["cpu1"].leave()
    assert line.started == ["g1", "cpu1", "cpu2"]


def test_a_freed_slot_goes_to_the_earliest_job_that_can_run() -> None:
    line = Line(slots=2)
    line.enter("g1", "gpu", 3)
    line.enter("cpu1")
    line.enter("g2", "gpu", 2)  # waits for GPUs, then for a slot
    line.enter("cpu2")  # waits for a slot
    assert line.started == ["g1", "cpu1"]
    line.tickets["g1"].leave()  # GPUs and a slot free: g2 arrived before cpu2
    assert line.started == ["g1", "cpu1", "g2"]
    assert not line.tickets["cpu2"].admitted
    line.tickets["cpu1"].leave()
    assert line.started[-1] == "cpu2"


def test_gpu_and_tpu_lines_are_independent_and_tpu_jobs_run_one_at_a_time() -> None:
    line = Line(slots=8)
    line.enter("t1", "tpu")
    line.enter("g1", "gpu", 3)
    line.enter("t2", "tpu")
    line.enter("g2", "gpu", 1)
    assert line.started == ["t1", "g1"]
    assert line.tickets["t1"].ids == ("/dev/accel0", "/dev/accel1")  # every node
    line.tickets["t1"].leave()
    assert line.started == ["t1", "g1", "t2"]
    line.tickets["g1"].leave()
    assert line.started[-1] == "g2"


def test_leaving_the_line_unblocks_those_behind() -> None:
    line = Line(slots=8)
    line.enter("g1", "gpu", 1)
    big = line.enter("big", "gpu", 3)
    line.enter("small", "gpu", 1)
    assert line.started == ["g1"]
    big.wait().cancel()  # killed while waiting: the execution cancels its wait...
    big.leave()  # ...then leaves
    assert big.wait().called and not big.admitted
    assert line.started == ["g1", "small"]
    assert line.admission.waiting == 0


def test_a_job_that_ends_at_once_serves_the_next() -> None:
    line = Line(slots=1)
    first = line.enter("first", "gpu", 3)
    second = line.enter("second", "gpu", 3)
    second.wait().addCallback(lambda ids: second.leave())  # done as soon as it starts
    third = line.enter("third", "gpu", 3)
    first.leave()
    assert line.started == ["first", "second", "third"]
    assert third.ids == ("0", "1", "3") and line.slots.tokens == 0


def test_a_re_adopted_job_holds_its_slot_and_devices_at_once() -> None:
    line = Line(slots=1)
    spec = JobSpec(device_kind="gpu", device_count=2)
    adopted = line.admission.adopt(spec, ["1", "3"])
    assert adopted.admitted and adopted.ids == ("1", "3") and line.slots.tokens == 0
    waiting = line.enter("new", "gpu", 1)
    assert not waiting.admitted
    over = line.admission.adopt(JobSpec(), [])  # more adopted jobs than slots: runs anyway
    assert over.admitted and not over.has_slot
    over.leave()
    assert line.slots.tokens == 0 and not waiting.admitted
    adopted.leave()
    assert waiting.ids == ("0",)
    assert line.devices.gpus.held == {"0"}


def test_slots_taken_and_given_back_outside_the_line_count() -> None:
    line = Line(slots=1)
    taken = result(line.slots.acquire())  # e.g. a job re-adopted without a ticket
    waiting = line.enter("cpu")
    assert not waiting.admitted and line.slots.tokens == 0
    taken.release()  # given back directly: the line hears of it
    assert waiting.admitted and line.slots.tokens == 0
    waiting.leave()
    assert line.slots.tokens == 1 and not line.slots.waiting


def test_a_slot_nobody_in_line_can_use_goes_back() -> None:
    line = Line(slots=1)
    taken = result(line.slots.acquire())
    gpu = line.enter("g", "gpu", 3)
    line.devices.gpus.hold(["0"])  # its GPUs are busy too
    taken.release()
    assert not gpu.admitted and line.slots.tokens == 1  # not kept by the line
    gpu.leave()
    assert line.slots.tokens == 1 and not line.slots.waiting and line.admission.waiting == 0


def test_re_adopted_jobs_hold_their_devices_again() -> None:
    line = Line(slots=8)
    adopted = JobRecord("old", 0, "w1", JobSpec(device_kind="gpu", device_count=1), 0, devices=["1"])
    line.devices.hold(adopted)
    assert line.enter("new", "gpu", 2).ids == ("0", "3")
    waiting = line.enter("next", "gpu", 1)
    assert not waiting.admitted
    line.devices.release(adopted)  # the re-adopted job ends
    assert waiting.ids == ("1",)


# -- what the worker has ------------------------------------------------------------------


def test_gpus_option() -> None:
    assert parse_gpus(None) == GpuSelection("all")
    assert parse_gpus(" ALL ") == GpuSelection("all")
    assert parse_gpus("none") == GpuSelection("none")
    assert parse_gpus("0,1, 3") == GpuSelection("ids", ("0", "1", "3"))
    assert parse_gpus("GPU-8a2c1e5f-0000-1111-2222-333344445555").ids == ("GPU-8a2c1e5f-0000-1111-2222-333344445555",)
    for bad in ("0,0", "x", "0;rm", "1,,2", "-1", "0:1"):
        with pytest.raises(ValueError) as e:
            parse_gpus(bad)
        assert "\n" not in str(e.value)


def test_tpu_devices_option() -> None:
    assert parse_tpu_devices(None) == DEFAULT_TPU_DEVICE_GLOBS == ("/dev/accel*", "/dev/vfio/*")
    assert parse_tpu_devices("/dev/accel*, /tmp/x/*") == ("/dev/accel*", "/tmp/x/*")
    for bad in ("accel*", "/dev/a:b", ",".join(["/dev/x"] * 17)):
        with pytest.raises(ValueError):
            parse_tpu_devices(bad)


A100 = GpuInfo(count=4, name="NVIDIA A100-SXM4-80GB", memory_mb=81920, ids=("0", "1", "2", "3"))


def test_gpus_resolved_against_detection() -> None:
    assert resolve_gpus(GpuSelection("all"), A100) == GpuInventory(("0", "1", "2", "3"), A100.name, "A100", 81920)
    assert resolve_gpus(GpuSelection("none"), A100) == GpuInventory()
    assert resolve_gpus(GpuSelection("ids", ("0", "3")), A100).ids == ("0", "3")
    assert resolve_gpus(GpuSelection("all"), None) == GpuInventory()
    # Explicit ids without nvidia-smi: taken as given, model unknown.
    assert resolve_gpus(GpuSelection("ids", ("1",)), None) == GpuInventory(("1",))


def test_discover_runs_nvidia_smi_only_when_gpus_may_be_handed_out(tmp_path: Path) -> None:
    calls: list[int] = []

    def detect() -> GpuInfo:
        calls.append(1)
        return A100

    found = discover("none", (str(tmp_path / "*"),), detect=detect, environ={})
    assert found == Accelerators(tpus=TpuInventory((), {}, (str(tmp_path / "*"),)))
    assert calls == []
    assert discover("0,2", (), detect=detect, environ={}).gpus.ids == ("0", "2")
    assert calls == [1]


def test_detect_gpu_reads_indexes(tmp_path: Path) -> None:
    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        out = "0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 81559\n"
        return subprocess.CompletedProcess(argv, 0, out, "")

    gpu = detect_gpu(which=lambda name: "/usr/bin/nvidia-smi", run=run, dev_dir=tmp_path)
    assert gpu is not None and gpu.device_ids == ("0", "1") and gpu.variant == "H100"


def _char_device(path: Path, mode: int = 0o666, gid: int = 0) -> None:
    null = os.stat("/dev/null")
    try:
        os.mknod(path, stat.S_IFCHR | mode, null.st_rdev)
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    os.chown(path, 0, gid)


def test_tpu_device_nodes_are_the_character_devices_matched(tmp_path: Path) -> None:
    _char_device(tmp_path / "accel1")
    _char_device(tmp_path / "accel0", 0o660, gid=4242)
    (tmp_path / "accel-not-a-device").write_text("x")
    (tmp_path / "vfio").mkdir()
    _char_device(tmp_path / "vfio" / "0")
    os.symlink(tmp_path / "accel1", tmp_path / "accel9")
    found = find_tpu_devices((str(tmp_path / "accel*"), str(tmp_path / "vfio" / "*"), str(tmp_path / "accel0")))
    assert found == (
        TpuDevice(str(tmp_path / "accel0"), 4242),
        TpuDevice(str(tmp_path / "accel1"), 0),
        TpuDevice(str(tmp_path / "accel9"), 0),
        TpuDevice(str(tmp_path / "vfio" / "0"), 0),
    )
    assert find_tpu_devices((str(tmp_path / "nothing*"),)) == ()


def test_tpu_variables_taken_from_the_environment() -> None:
    environ = {
        "TPU_NAME": "my-tpu",
        "TPU_WORKER_ID": "1",
        "TPU_WORKER_HOSTNAMES": "h0,h1",
        "TPU_ACCELERATOR_TYPE": "v5litepod-16",
        "TPU_BAD": "x",
        "HOME": "/root",
        "TPU_HOST_BOUNDS": "y" * 5000,
    }
    assert tpu_environment(environ) == {
        "TPU_NAME": "my-tpu",
        "TPU_WORKER_ID": "1",
        "TPU_WORKER_HOSTNAMES": "h0,h1",
        "TPU_ACCELERATOR_TYPE": "v5litepod-16",
    }


# -- what a request must match ---------------------------------------------------------


def test_gpu_variant_matching() -> None:
    a100 = resolve_gpus(GpuSelection("all"), A100)
    for wanted in ("", "auto", "AUTO", "A100", "a100", "A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB"):
        assert a100.mismatch(wanted) is None, wanted
    assert a100.mismatch("H100") == "this worker's GPUs are A100, not H100"
    assert a100.mismatch("A10") is not None and a100.mismatch("100") is not None
    assert a100.mismatch("A100 80GB") is not None  # not words next to each other in the name
    rtx = GpuInventory(("0",), "NVIDIA GeForce RTX 4090", "auto")
    assert rtx.mismatch("RTX 4090") is None and rtx.mismatch("4090") is None
    assert rtx.mismatch("A100") == "this worker's GPUs are NVIDIA GeForce RTX 4090, not A100"
    # The model is unknown (explicit ids, no nvidia-smi): nothing to refuse on.
    assert GpuInventory(("0",)).mismatch("H100") is None


def test_tpu_type_and_topology_matching() -> None:
    tpu = TpuInventory((TpuDevice("/dev/accel0", 0),), {"TPU_ACCELERATOR_TYPE": "v5litepod-8", "TPU_TOPOLOGY": "2x4"})
    assert tpu.mismatch("", "") is None and tpu.mismatch("auto", "2x4") is None
    assert tpu.mismatch("V5LITEPOD-8", "") is None
    assert tpu.mismatch("v4-8", "") == "this worker's TPU is v5litepod-8, not v4-8"
    assert tpu.mismatch("", "4x4") == "this worker's TPU topology is 2x4, not 4x4"
    assert TpuInventory((TpuDevice("/dev/accel0", 0),)).mismatch("v4-8", "2x2x1") is None


GPU_WORKER = Accelerators(gpus=GpuInventory(("0", "1", "3"), "NVIDIA A100-SXM4-80GB", "A100", 81920))
TPU_WORKER = Accelerators(
    tpus=TpuInventory(
        (TpuDevice("/dev/accel0", 0), TpuDevice("/dev/accel1", 4242)),
        {"TPU_ACCELERATOR_TYPE": "v4-8", "TPU_WORKER_ID": "0", "TPU_NAME": "t1"},
    )
)


def checked(devices: JobDevices, request: DeviceRequest) -> JobSpec:
    spec = JobSpec()
    devices.check(request, spec)
    return spec


def refusal(devices: JobDevices | None, device: DeviceRequest) -> str:
    request = JobRequest(entrypoint=b"x", device=device)
    with pytest.raises(PreconditionFailed) as e:
        validation.job_spec(request, 8, devices)
    assert "\n" not in e.value.message
    return e.value.message


def test_impossible_requests_are_refused_at_submit_with_one_line() -> None:
    gpus, tpus = JobDevices(GPU_WORKER), JobDevices(TPU_WORKER)
    assert refusal(None, DeviceRequest("gpu", "H100", 1)) == "this worker has no GPU to hand out"
    assert refusal(tpus, DeviceRequest("gpu", "", 1)) == "this worker has no GPU to hand out"
    assert refusal(gpus, DeviceRequest("gpu", "auto", 4)) == "4 GPUs requested, this worker has 3"
    assert refusal(gpus, DeviceRequest("gpu", "H100", 1)) == "this worker's GPUs are A100, not H100"
    assert refusal(gpus, DeviceRequest("tpu", "v4-8")).startswith("this worker has no TPU (no device node matches")
    assert refusal(tpus, DeviceRequest("tpu", "v5p-8")) == "this worker's TPU is v4-8, not v5p-8"
    with pytest.raises(InvalidJobRequest):
        validation.job_spec(JobRequest(entrypoint=b"x", device=DeviceRequest("gpu", "", -1)), 8, gpus)
    with pytest.raises(InvalidJobRequest):
        validation.job_spec(JobRequest(entrypoint=b"x", device=DeviceRequest("gpu", "A\n100", 1)), 8, gpus)
    with pytest.raises(InvalidJobRequest):
        validation.job_spec(JobRequest(entrypoint=b"x", device=DeviceRequest("fpga")), 8, gpus)


def test_possible_requests_fill_the_spec() -> None:
    gpus, tpus = JobDevices(GPU_WORKER), JobDevices(TPU_WORKER)
    spec = validation.job_spec(JobRequest(entrypoint=b"x", device=DeviceRequest("gpu", "a100", 2)), 8, gpus)
    assert (spec.device_kind, spec.device_count, spec.device_variant) == ("gpu", 2, "a100")
    assert checked(gpus, DeviceRequest("gpu", "")).device_count == 1  # no count: one GPU
    assert checked(gpus, DeviceRequest("cpu", "x86")).device_kind == ""
    tpu = checked(tpus, DeviceRequest("tpu", "v4-8", 0, "2x2x1"))
    assert (tpu.device_kind, tpu.device_count, tpu.device_topology) == ("tpu", 2, "2x2x1")


def test_requests_wait_for_discovery() -> None:
    devices = JobDevices(None)
    ready = devices.ready()
    assert not fired(ready)
    with pytest.raises(WorkerUnavailable):
        checked(devices, DeviceRequest("gpu", "", 1))
    assert checked(devices, DeviceRequest()).device_kind == ""  # CPU jobs never wait for it
    devices.configure(GPU_WORKER)
    assert fired(ready)
    assert checked(devices, DeviceRequest("gpu", "", 1)).device_count == 1


# -- a job's claim and its container ------------------------------------------------------


def record(spec: JobSpec, job_id: str = "j1", devices: list[str] | None = None) -> JobRecord:
    return JobRecord(job_id, 0, "w1", spec, 0, devices=list(devices or []))


def test_waiting_messages() -> None:
    devices = JobDevices(GPU_WORKER)
    assert devices.waiting_message(checked(devices, DeviceRequest("gpu", "", 2))) == "waiting for 2 GPUs"
    assert devices.waiting_message(checked(devices, DeviceRequest("gpu", "", 1))) == "waiting for 1 GPU"
    assert devices.waiting_message(JobSpec(device_kind="tpu")) == "waiting for the TPU"


def test_gpu_job_container_gets_exactly_its_gpus() -> None:
    devices = JobDevices(GPU_WORKER)
    rec = record(checked(devices, DeviceRequest("gpu", "", 2)), devices=["1", "3"])
    env = devices.environment(rec, {"NVIDIA_VISIBLE_DEVICES": "all", "FLUSTER_JOB_ID": "j1"})
    assert env["NVIDIA_VISIBLE_DEVICES"] == "1,3" and env["FLUSTER_GPU_IDS"] == "1,3"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility" and env["FLUSTER_JOB_ID"] == "j1"
    options = devices.container_options(rec)
    assert options == {"gpu_ids": ("1", "3"), "shm_size_bytes": DEFAULT_SHM_BYTES}
    ContainerSpec(name="ab", image="i", command=[], env=env, **options)  # valid


def test_other_jobs_never_see_a_gpu() -> None:
    devices = JobDevices(GPU_WORKER)
    env = devices.environment(record(JobSpec()), {"NVIDIA_VISIBLE_DEVICES": "all", "FLUSTER_GPU_IDS": "0"})
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void" and "FLUSTER_GPU_IDS" not in env
    assert devices.container_options(record(JobSpec())) == {}


def test_tpu_job_container_gets_every_node_the_variables_and_groups() -> None:
    devices = JobDevices(TPU_WORKER, shm_size_bytes=GIB)
    rec = record(checked(devices, DeviceRequest("tpu")), devices=["/dev/accel0", "/dev/accel1"])
    env = devices.environment(rec, {"TPU_WORKER_ID": "mine"})
    assert env["TPU_WORKER_ID"] == "mine"  # the job's own env_vars win
    assert env["TPU_ACCELERATOR_TYPE"] == "v4-8" and env["TPU_NAME"] == "t1"
    assert env["FLUSTER_TPU_DEVICES"] == "/dev/accel0,/dev/accel1"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert devices.container_options(rec) == {
        "devices": ("/dev/accel0", "/dev/accel1"),
        "group_add": (4242,),
        "shm_size_bytes": GIB,
        "memlock_unlimited": True,
    }
    assert JobDevices(TPU_WORKER, tpu_memlock_unlimited=False).container_options(rec)["memlock_unlimited"] is False


def test_container_spec_refuses_bad_device_fields() -> None:
    for bad in ({"devices": ("dev/accel0",)}, {"devices": ("/dev/a:/etc",)}, {"gpu_ids": ("0,1",)},
                {"gpu_ids": ("",)}, {"group_add": (-1,)}, {"shm_size_bytes": 0}):
        with pytest.raises(ValueError):
            ContainerSpec(name="ab", image="i", command=[], **bad)  # type: ignore[arg-type]


def test_usage_for_pages_and_metrics() -> None:
    line = Line(slots=4, accelerators=GPU_WORKER)
    line.enter("a", "gpu", 2)
    line.enter("b", "gpu", 2)
    assert line.devices.usage() == {
        "gpu": {"ids": ["0", "1", "3"], "in_use": ["0", "1"], "waiting": 1},
        "tpu": {"ids": [], "in_use": [], "waiting": 0},
    }


# -- what the controller is told ---------------------------------------------------------


FACTS = MachineFacts("box", "10.1.2.3", 8, 64 * GIB, A100)


def test_advertised_device_is_what_can_be_handed_out() -> None:
    spec = resource_spec(FACTS, accelerators=GPU_WORKER)
    assert (spec.device.gpu.variant, spec.device.gpu.count) == ("A100", 3)  # not the 4 detected
    meta = worker_metadata(FACTS, GPU_WORKER)
    assert (meta.gpu_count, meta.gpu_name, meta.gpu_memory_mb) == (3, "NVIDIA A100-SXM4-80GB", 81920)
    none = resource_spec(FACTS, accelerators=Accelerators())  # --gpus none
    assert not none.HasField("device")
    assert worker_metadata(FACTS, Accelerators()).gpu_count == 0
    tpu = resource_spec(FACTS, accelerators=TPU_WORKER)
    assert tpu.device.WhichOneof("device") == "tpu" and tpu.device.tpu.variant == "v4-8"
    meta = worker_metadata(FACTS, TPU_WORKER)
    assert (meta.tpu_name, meta.tpu_worker_id) == ("t1", "0")


# -- the options ---------------------------------------------------------------------------


def test_device_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.python import usage

    from fluster_worker.main import Options

    for key in list(os.environ):
        if key.startswith("FLUSTER_WORKER_"):
            monkeypatch.delenv(key)

    def parse(*argv: str) -> Any:
        options = Options()
        options.parseOptions(list(argv))
        return options.config

    defaults = parse()
    assert defaults.gpus == "all" and defaults.tpu_devices == ("/dev/accel*", "/dev/vfio/*")
    assert defaults.accelerator_shm_bytes == 16 * GIB and defaults.tpu_memlock_unlimited
    monkeypatch.setenv("FLUSTER_WORKER_GPUS", "none")
    config = parse("--tpu-devices", "/tmp/t/accel*", "--accelerator-shm-size", "2g", "--tpu-memlock", "engine")
    assert config.gpus == "none" and config.tpu_devices == ("/tmp/t/accel*",)
    assert config.accelerator_shm_bytes == 2 * GIB and not config.tpu_memlock_unlimited
    assert parse("--gpus", "0,1,3").gpus == "0,1,3"
    for argv in (("--gpus", "0,x"), ("--tpu-devices", "dev/accel*"), ("--accelerator-shm-size", "lots"),
                 ("--tpu-memlock", "maybe")):
        with pytest.raises(usage.UsageError) as e:
            parse(*argv)
        assert argv[0] in str(e.value) and "\n" not in str(e.value)
