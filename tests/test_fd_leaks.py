"""No file descriptor leaks on any bundle-validation path: the hostile bundles
of the unzip suite, sent to a real worker again and again, fail their jobs
and leave the worker's open fds where they were."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted

from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import Harness, entrypoint, start_worker, worker_config
from tests.test_bundle import HOSTILE_MEMBERS, lying_zip, zip_bytes

pytestmark = pytest.mark.docker

PYPROJECT = b'[project]\nname = "demo"\nversion = "0.1.0"\n'


def noop() -> None:
    pass


def hostile_bundles(directory: Path) -> list[tuple[str, str]]:
    """(bundle path, a word of the error) for every way a bundle is refused."""
    directory.mkdir()
    contents: list[tuple[bytes, str]] = [(content, words[0]) for content, words in HOSTILE_MEMBERS]
    contents += [
        (zip_bytes({"pyproject.toml/": b"", "main.py": b""}), "pyproject.toml is a directory"),
        (zip_bytes({"pyproject.toml/x": b"", "main.py": b""}), "pyproject.toml is a directory"),
        (zip_bytes({"pyproject.toml": PYPROJECT, "uv.lock/": b""}), "uv.lock is a directory"),
        (zip_bytes({"pyproject.toml": b"[project\n"}), "pyproject.toml"),
        (lying_zip(bytes(1000), declared=3 * 2**30), "unpacks to more than"),
        (b"PK\x03\x04 this is not a zip", "not a valid zip"),
    ]
    bundles = []
    for i, (content, word) in enumerate(contents):
        path = directory / f"hostile-{i}.zip"
        path.write_bytes(content)
        bundles.append((str(path), word))
    fifo = directory / "fifo.zip"
    os.mkfifo(fifo)
    bundles += [
        (str(directory), "not a regular file"),  # a directory as the bundle
        (str(fifo), "not a regular file"),
        (str(directory / "missing.zip"), "not found"),
    ]
    return bundles


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest_twisted.async_yield_fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_worker(worker_config(tmp_path))
    yield h
    await h.worker.stopService()


async def one_round(harness: Harness, bundles: list[tuple[str, str]]) -> None:
    ep = entrypoint(noop)
    for url, word in bundles:
        request = pb.RunJobRequest(
            job_id=f"hostile-{uuid.uuid4().hex[:8]}", serialized_entrypoint=ep, bundle_gcs_path=url
        )
        status = await harness.run(request, timeout=120)
        assert status.state == pb.JOB_STATE_FAILED, (url, status)
        assert word in status.error, (url, status.error)


@pytest_twisted.ensureDeferred
async def test_hostile_bundles_leak_no_fds(harness: Harness, tmp_path: Path) -> None:
    bundles = hostile_bundles(tmp_path / "hostile")
    await one_round(harness, bundles)  # warm up: pools, connections, caches
    before = open_fds()
    for _ in range(5):
        await one_round(harness, bundles)
    # A leak on any path would add at least 5 (one per round).
    assert open_fds() <= before + 2, (before, open_fds())
