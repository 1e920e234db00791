"""Shared fixtures. Docker-backed fixtures fail loudly when the engine or the
base image is missing: `make test` provides both (scripts/ensure-*.sh)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "stubs"))

BASE_IMAGE = os.environ.get("FLUSTER_WORKER_BASE_IMAGE", "fluster-base:bookworm")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@pytest.fixture(scope="session")
def docker_client() -> Iterator[object]:
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
