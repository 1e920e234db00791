"""Local machine facts and the advertised address."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from fluster_worker.controller.advert import resource_spec, worker_metadata
from fluster_worker.host import (
    GIB,
    MIB,
    GpuInfo,
    MachineFacts,
    advertise_address,
    advertise_host,
    cpu_cores,
    detect_gpu,
    format_memory,
    local_ip_toward,
    memory_total_bytes,
    probe_machine,
)

FACTS = MachineFacts(hostname="box", ip_address="10.1.2.3", cpu_count=8, memory_bytes=23 * GIB + 900 * MIB)


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("10.0.0.7", 8080, "10.0.0.7:8080"),
        ("box.example.com", 1, "box.example.com:1"),
        ("fd00::7", 8080, "[fd00::7]:8080"),
        ("[fd00::7]", 8080, "[fd00::7]:8080"),
        ("127.0.0.1", 65535, "127.0.0.1:65535"),
    ],
)
def test_advertise_address(host: str, port: int, expected: str) -> None:
    assert advertise_address(host, port) == expected


@pytest.mark.parametrize(
    ("host", "port"),
    [("0.0.0.0", 8080), ("::", 8080), ("[::]", 8080), ("", 8080), ("10.0.0.7", 0), ("10.0.0.7", 70000)],
)
def test_advertise_address_refuses_unreachable(host: str, port: int) -> None:
    with pytest.raises(ValueError):
        advertise_address(host, port)


def test_advertise_host_configured_wins() -> None:
    def probe(host: str, port: int) -> str:
        raise AssertionError("must not probe")

    assert advertise_host("worker.example.com", "10.0.0.1", 80, probe=probe) == "worker.example.com"
    assert advertise_host("[fd00::1]", None, probe=probe) == "fd00::1"
    with pytest.raises(ValueError, match="not reachable"):
        advertise_host("0.0.0.0", "10.0.0.1", probe=probe)


def test_advertise_host_for_a_loopback_controller_is_loopback() -> None:
    def probe(host: str, port: int) -> str:
        raise AssertionError("must not probe")

    assert advertise_host(None, "localhost", probe=probe) == "127.0.0.1"
    assert advertise_host(None, "127.0.0.1", probe=probe) == "127.0.0.1"


def test_advertise_host_probes_the_route_to_the_controller() -> None:
    asked: list[tuple[str, int]] = []

    def probe(host: str, port: int) -> str:
        asked.append((host, port))
        if host == "controller.example.com":
            raise OSError("no route")
        return "10.9.8.7"

    assert advertise_host(None, "controller.example.com", 10000, probe=probe) == "10.9.8.7"
    assert asked[0] == ("controller.example.com", 10000)
    assert len(asked) == 2  # then the default route


def test_advertise_host_on_this_machine_is_never_unspecified() -> None:
    for controller in (None, "127.0.0.1", "192.0.2.10"):
        host = advertise_host(None, controller, 8080)
        assert host not in ("0.0.0.0", "::", "")
        advertise_address(host, 8080)  # does not raise


def test_local_ip_toward_loopback() -> None:
    assert local_ip_toward("127.0.0.1", 9) == "127.0.0.1"


def test_memory_total_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24381440 kB\nMemFree:         1000 kB\n")
    assert memory_total_bytes(meminfo) == 24381440 * 1024
    assert memory_total_bytes(tmp_path / "missing") > 0  # falls back to sysconf


def test_this_machine() -> None:
    assert cpu_cores() >= 1
    assert memory_total_bytes() > 0


@pytest.mark.parametrize(
    ("total", "text"),
    [(24381440 * 1024, "23g"), (GIB, "1g"), (GIB - 1, "1023m"), (512 * MIB, "512m"), (0, "0m")],
)
def test_format_memory_floors(total: int, text: str) -> None:
    assert format_memory(total) == text


def test_no_gpu_means_no_device(tmp_path: Path) -> None:
    assert detect_gpu(which=lambda name: None, dev_dir=tmp_path) is None
    spec = resource_spec(FACTS)
    assert spec.cpu == 8
    assert spec.memory == "23g"
    assert not spec.HasField("device")


def test_gpu_from_nvidia_smi(tmp_path: Path) -> None:
    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert argv[0] == "/usr/bin/nvidia-smi"
        assert argv[1] == "--query-gpu=index,name,memory.total"
        out = "0, NVIDIA A100-SXM4-80GB, 81920\n2, NVIDIA A100-SXM4-80GB, 81920\n"
        return subprocess.CompletedProcess(argv, 0, out, "")

    gpu = detect_gpu(which=lambda name: "/usr/bin/nvidia-smi", run=run, dev_dir=tmp_path)
    assert gpu == GpuInfo(count=2, name="NVIDIA A100-SXM4-80GB", memory_mb=81920, ids=("0", "2"))
    assert gpu.variant == "A100"
    assert gpu.device_ids == ("0", "2")
    facts = MachineFacts("box", "10.1.2.3", 8, 64 * GIB, gpu)
    spec = resource_spec(facts)
    assert spec.device.WhichOneof("device") == "gpu"
    assert (spec.device.gpu.variant, spec.device.gpu.count) == ("A100", 2)
    meta = worker_metadata(facts)
    assert (meta.gpu_count, meta.gpu_name, meta.gpu_memory_mb) == (2, "NVIDIA A100-SXM4-80GB", 81920)


def test_gpu_from_device_nodes_when_nvidia_smi_fails(tmp_path: Path) -> None:
    (tmp_path / "nvidia0").touch()
    (tmp_path / "nvidiactl").touch()

    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 9, "", "NVIDIA-SMI has failed")

    gpu = detect_gpu(which=lambda name: "/usr/bin/nvidia-smi", run=run, dev_dir=tmp_path)
    assert gpu == GpuInfo(count=1, name="", memory_mb=0)
    assert gpu.variant == "auto"
    assert gpu.device_ids == ("0",)


def test_gpu_variant_names() -> None:
    assert GpuInfo(1, "NVIDIA H100 80GB HBM3", 0).variant == "H100"
    assert GpuInfo(1, "Tesla T4", 0).variant == "T4"
    assert GpuInfo(1, "NVIDIA L40S", 0).variant == "L40S"
    assert GpuInfo(1, "NVIDIA GeForce RTX 4090", 0).variant == "auto"


def test_resource_overrides() -> None:
    spec = resource_spec(FACTS, cpu=2, memory="4Gi")
    assert (spec.cpu, spec.memory) == (2, "4Gi")
    for bad in ("lots", "-1g", "0g", "1.5.5g"):
        with pytest.raises(ValueError, match="memory"):
            resource_spec(FACTS, memory=bad)
    with pytest.raises(ValueError, match="cpu"):
        resource_spec(FACTS, cpu=0)


def test_metadata_is_local_facts() -> None:
    meta = worker_metadata(FACTS)
    assert (meta.hostname, meta.ip_address, meta.cpu_count, meta.memory_bytes) == (
        "box",
        "10.1.2.3",
        8,
        FACTS.memory_bytes,
    )
    assert meta.gpu_count == 0 and not meta.gce_zone and not meta.gce_instance_name


def test_probe_machine_for_a_loopback_controller() -> None:
    facts = probe_machine("127.0.0.1", 8080, None)
    assert facts.ip_address == "127.0.0.1"
    assert facts.cpu_count >= 1 and facts.memory_bytes > 0 and facts.hostname


def test_probe_machine_keeps_the_configured_host_apart() -> None:
    facts = probe_machine("127.0.0.1", 8080, "worker.example.com")
    assert facts.ip_address == "127.0.0.1"  # metadata: the detected address
    assert facts.address_host == "worker.example.com"  # what is advertised
    assert probe_machine("127.0.0.1", 8080, "  ").address_host == "127.0.0.1"
    with pytest.raises(ValueError):
        probe_machine("127.0.0.1", 8080, "0.0.0.0")
