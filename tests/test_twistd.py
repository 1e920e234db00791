"""`twistd -n fluster-worker` as a real process, run from the project's venv in
another directory without PYTHONPATH (as the README's recipes do): it serves
HealthCheck over a real socket in both encodings, to the official Connect
client, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_connect import WorkerServiceClientSync
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from fluster_worker.web.rpc import cluster_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


def plain_env(**extra: str) -> dict[str, str]:
    """The environment without PYTHONPATH: the plugin must come from the install."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def wait_for(predicate: object, timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()  # type: ignore[operator]
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def twistd(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    log = tmp_path / "twistd.log"
    env = plain_env(FLUSTER_WORKER_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.Popen(
        [
            TWISTD, "-n", "--pidfile=", f"--logfile={log}", "fluster-worker",
            "--listen", "tcp:0:interface=127.0.0.1",
            "--cache-dir", str(tmp_path / "cache"),
            "--worker-id", "twistd-test",
        ],
        cwd=tmp_path,
        env=env,
    )

    def address() -> str | None:
        text = log.read_text() if log.exists() else ""
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
        if proc.poll() is not None:
            raise AssertionError(f"twistd exited with {proc.returncode}:\n{text}")
        return f"http://127.0.0.1:{match.group(1)}" if match else None

    url = str(wait_for(address, 60, "twistd to listen"))
    yield proc, url, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.docker
def test_twistd_serves_health_in_both_encodings_and_stops_on_sigterm(
    twistd: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    proc, url, log = twistd
    for proto_json in (False, True):
        with WorkerServiceClientSync(url, proto_json=proto_json, timeout_ms=10_000) as client:
            health = client.health_check(pb.Empty())
            assert health.healthy
            assert health.uptime_ms >= 0
            with pytest.raises(ConnectError) as e:
                client.get_job_status(pb.GetJobStatusRequest(job_id="nope"))
            assert e.value.code == Code.NOT_FOUND

    proc.send_signal(signal.SIGTERM)
    # Twisted stops the reactor, runs every stopService, then re-raises SIGTERM.
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    text = log.read_text()
    assert "Traceback" not in text, text
    assert "Main loop terminated" in text


def test_help_documents_every_option_from_any_directory(tmp_path: Path) -> None:
    out = subprocess.run(
        [TWISTD, "fluster-worker", "--help"],
        env=plain_env(),
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    for option in (
        "--listen", "--cache-dir", "--state-dir", "--worker-id", "--controller", "--base-image",
        "--max-concurrent-jobs", "--port-range", "--ca-bundle", "FLUSTER_WORKER_BASE_IMAGE",
        "--stop-jobs-on-exit", "FLUSTER_WORKER_STOP_JOBS_ON_EXIT", "--min-free-disk-bytes", "--low-free-disk-bytes",
    ):
        assert option in out
