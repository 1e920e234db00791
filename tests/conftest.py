"""Shared fixtures. Docker-backed fixtures fail loudly when the engine or the
base image is missing: `make test` provides both (scripts/ensure-*.sh)."""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "stubs"))

BASE_IMAGE = os.environ.get("FLUSTER_WORKER_BASE_IMAGE", "fluster-base:bookworm")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Several test sessions may share one engine (developers' checkouts side by side):
# each holds this lock shared; a test that stops the engine takes it exclusively.
ENGINE_LOCK = os.environ.get("FLUSTER_TEST_ENGINE_LOCK", "/tmp/fluster-test-engine.lock")


# Tests that own the machine (they stop dockerd or fill a disk) run last, after
# everything that needs the engine up and the disk free.
MACHINE_MARKERS = ("engine_outage", "small_disk")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def owns_machine(item: pytest.Item) -> bool:
        return any(item.get_closest_marker(name) is not None for name in MACHINE_MARKERS)

    items.sort(key=owns_machine)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def _engine_lock() -> Iterator[IO[bytes]]:
    with open(ENGINE_LOCK, "ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        yield handle
        fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _engine_shared_for_docker_tests(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("docker") is not None:
        request.getfixturevalue("_engine_lock")


@pytest.fixture
def engine_exclusive(_engine_lock: IO[bytes]) -> Iterator[None]:
    """The engine to this test alone (it stops or restarts dockerd): waits until no
    other session uses the engine. The test must leave the engine running."""
    fcntl.flock(_engine_lock, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(_engine_lock, fcntl.LOCK_SH)


@pytest.fixture(scope="session")
def docker_client(_engine_lock: IO[bytes]) -> Iterator[object]:
    import docker

    client = docker.from_env()
    client.ping()
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_client: object) -> str:
    docker_client.images.get(BASE_IMAGE)  # type: ignore[attr-defined]
    return BASE_IMAGE


@pytest.fixture
def blocking_pool() -> Iterator[object]:
    """A started BlockingPool on the real reactor, stopped after the test."""
    from twisted.internet import reactor

    from fluster_worker.common.threads import BlockingPool

    pool = BlockingPool(reactor, "test-pool", max_threads=8)  # type: ignore[arg-type]
    pool.startService()
    yield pool
    pool.pool.stop()


@pytest.fixture
def make_job_rig(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``make_job_rig(root=None, **options)``: a JobRig (fluster_worker.testing.jobs)
    on ``root`` (a fresh directory under tmp_path by default), closed after the
    test so that no job's run is left suspended."""
    from fluster_worker.testing.jobs import JobRig

    rigs: list[JobRig] = []

    def make(root: Path | None = None, **options: Any) -> JobRig:
        rig = JobRig(root if root is not None else tmp_path / f"rig-{len(rigs)}", **options)
        rigs.append(rig)
        return rig

    yield make
    for rig in reversed(rigs):
        rig.close()
