"""A full disk is visible and loses nothing silently: the worker's state dir on a
small filesystem (a tmpfs this test mounts and unmounts), a job that logs more
than fits. The job's error says its logs are incomplete, the worker reports the
low space before and after, and refuses new jobs below its floor."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from fluster_worker.testing.client import RpcError
from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import TERMINAL, entrypoint, make_bundle, start_worker, worker_config

pytestmark = [pytest.mark.docker, pytest.mark.small_disk, pytest.mark.slow]

MiB = 2**20


def flood(lines: int) -> int:
    """About 100 bytes a line."""
    import sys

    row = "x" * 96
    for i in range(lines):
        sys.stdout.write(f"{i:>6} {row}\n")
    sys.stdout.flush()
    return lines


def quick() -> str:
    return "done"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def job(bundle: Path, ep: bytes, job_id: str) -> pb.RunJobRequest:
    return pb.RunJobRequest(job_id=job_id, serialized_entrypoint=ep, bundle_gcs_path=f"file://{bundle}")


async def stats(url: str) -> dict[str, Any]:
    return await (await treq.get(f"{url}/api/v1/stats")).json()  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_a_full_state_disk_is_reported_and_never_a_silent_success(
    tmp_path: Path, small_fs: Path, docker_client: Any
) -> None:
    config = worker_config(
        tmp_path, state_dir=small_fs / "state", min_free_disk_bytes=8 * MiB, low_free_disk_bytes=64 * MiB
    )
    h = await start_worker(config)
    try:
        # 48 MiB is below the low mark from the start: reported before anything fails.
        deadline = time.monotonic() + 30
        while not (current := await stats(h.url))["conditions"]:
            assert time.monotonic() < deadline, current
            await deferLater(reactor, 0.2, lambda: None)
        assert current["conditions"][0]["name"] == "disk"
        assert current["conditions"][0]["severity"] == "warning"
        assert "low disk space" in current["conditions"][0]["reason"]
        assert (await h.client.health()).healthy

        status = await h.run(job(make_bundle(tmp_path), entrypoint(flood, 1_000_000), "flood"), timeout=600)
        assert status.state in TERMINAL
        # Whatever it ended as, it says that its logs are not all there.
        assert "logs incomplete" in status.error, status

        # Now the disk is below the floor: unhealthy, saying why, and new work refused.
        deadline = time.monotonic() + 60
        while (await h.client.health()).healthy:
            assert time.monotonic() < deadline, "the worker never said it was unhealthy"
            await deferLater(reactor, 0.2, lambda: None)
        current = await stats(h.url)
        disk = next(c for c in current["conditions"] if c["name"] == "disk")
        assert disk["severity"] == "exhausted" and ("disk nearly full" in disk["reason"] or "saving" in disk["reason"])
        with pytest.raises(RpcError) as refused:
            await h.client.run_job(job(make_bundle(tmp_path), entrypoint(quick), "refused"))
        assert refused.value.code == "resource_exhausted"
    finally:
        await h.worker.stopService()
        for container in docker_client.containers.list(
            all=True, filters={"label": f"fluster.worker_id={h.worker.worker_id}"}
        ):
            container.remove(force=True)
