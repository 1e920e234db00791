"""A worker as a real ``twistd -n fluster-worker`` process, for the tests (and
the bench) that kill, stop and restart it under running jobs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater

from fluster_worker.testing.client import WorkerClient

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


class WorkerProcess:
    """One worker identity and state dir; ``start()`` runs a twistd process on
    it, again after each ``kill()`` or ``terminate()``."""

    def __init__(self, root: Path, *options: str, worker_id: str | None = None) -> None:
        self.root = root
        self.worker_id = worker_id or f"t{uuid.uuid4().hex[:8]}"
        self.options = list(options)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.client: WorkerClient | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.root / f"twistd-{self.starts}.log"

    async def start(self, timeout: float = 60.0) -> WorkerClient:
        """Start twistd and wait until it listens."""
        self.starts += 1
        self.root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for key in [k for k in env if k.startswith("FLUSTER_WORKER_")]:
            del env[key]
        self.proc = subprocess.Popen(
            [
                TWISTD, "-n", "--pidfile=", f"--logfile={self.log_path}", "fluster-worker",
                "--listen", "tcp:0:interface=127.0.0.1",
                "--state-dir", str(self.root / "state"),
                "--cache-dir", str(self.root / "cache"),
                "--worker-id", self.worker_id,
                "--ca-bundle", CA_BUNDLE,
                *self.options,
            ],
            cwd=self.root,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_path.read_text() if self.log_path.exists() else ""
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
            if match:
                break
            if self.proc.poll() is not None:
                raise AssertionError(f"twistd exited with {self.proc.returncode}:\n{text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"twistd did not listen within {timeout} s:\n{text}")
            await deferLater(reactor, 0.02, lambda: None)
        self.url = f"http://127.0.0.1:{match.group(1)}"
        self.client = WorkerClient(self.url)
        return self.client

    def kill(self) -> None:
        """SIGKILL: the worker dies without a word."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    async def terminate(self, timeout: float = 60.0) -> float:
        """SIGTERM, as ``twistd`` stop does; seconds until the process is gone."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        while self.proc.poll() is None:
            if time.monotonic() - started > timeout:
                raise AssertionError("twistd did not stop on SIGTERM")
            await deferLater(reactor, 0.02, lambda: None)
        return time.monotonic() - started

    def log_text(self) -> str:
        return "\n".join(
            (self.root / f"twistd-{i}.log").read_text()
            for i in range(1, self.starts + 1)
            if (self.root / f"twistd-{i}.log").exists()
        )

    def close(self, docker_client: Any = None) -> None:
        """Kill the process and remove the containers of this worker id."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if docker_client is not None:
            for container in docker_client.containers.list(
                all=True, filters={"label": f"fluster.worker_id={self.worker_id}"}
            ):
                container.remove(force=True)


def processes_mentioning(words: Sequence[str]) -> list[int]:
    """Pids of live processes whose command line holds every one of ``words``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        args = raw.split(b"\0")
        if all(any(word.encode() in arg for arg in args) for word in words):
            found.append(int(entry))
    return found
