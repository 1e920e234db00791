"""A real worker process holding a finished job with a multi-million-line log,
and a blocking HTTP client to call it from threads (for the tests that must see
the worker's reactor stay free while heavy calls are served).

The log is written straight into the LogStore's format (logs/layout.py: the
``.dat`` lines and the fixed-width ``.idx``), which takes a second or two for
millions of lines, where a container printing them would take minutes; the
worker reads it as it reads any log it stored."""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from fluster_worker.common.jobnames import job_key
from fluster_worker.jobs.model import JobRecord, JobSpec, JobState
from fluster_worker.logs.layout import to_disk

T0_NS = 1_700_000_000_000_000_000
LINES_PER_MS = 100
LINE = b"%08d the quick brown fox jumps over the lazy dog; a line of a very long log"
SERVICE = "/fluster.cluster.WorkerService/"


def write_big_log(state_dir: Path, job_id: str, worker_id: str, lines: int) -> None:
    """A SUCCEEDED job ``job_id`` whose stdout holds ``lines`` lines
    (``LINES_PER_MS`` a millisecond), in the state dir a worker will load."""
    logs = state_dir / "logs" / job_key(job_id)
    logs.mkdir(parents=True, exist_ok=True)
    width = len(LINE % 0) + 1
    with open(logs / "stdout.0.dat", "wb") as dat:
        step = 100_000
        for start in range(0, lines, step):
            dat.write(b"".join(LINE % i + b"\n" for i in range(start, min(start + step, lines))))
    entries = array("q", bytes(24 * lines))
    entries[0::3] = array("q", range(T0_NS, T0_NS + lines * (1_000_000 // LINES_PER_MS), 1_000_000 // LINES_PER_MS))
    entries[1::3] = array("q", range(lines))
    entries[2::3] = array("q", range(width, width * (lines + 1), width))
    (logs / "stdout.0.idx").write_bytes(to_disk(entries))
    jobs = state_dir / "jobs" / job_key(job_id)
    jobs.mkdir(parents=True, exist_ok=True)
    now_ms = int(time.time() * 1000)
    record = JobRecord(job_id=job_id, attempt_id=0, worker_id=worker_id, spec=JobSpec(), submitted_at_ms=now_ms)
    record.move(JobState.BUILDING, now_ms)
    record.move(JobState.RUNNING, now_ms)
    record.move(JobState.SUCCEEDED, now_ms)
    (jobs / "record.json").write_text(json.dumps(record.to_json()))
    os.chmod(state_dir, 0o700)


@dataclass
class Answer:
    status: int
    body: bytes
    seconds: float


class Caller:
    """Blocking calls on one keep-alive connection (one per thread)."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self._conn = http.client.HTTPConnection(host, int(port), timeout=timeout)

    def rpc(self, method: str, body: bytes, content_type: str = "application/json") -> Answer:
        started = time.monotonic()
        self._conn.request(
            "POST", SERVICE + method, body=body,
            headers={"Content-Type": content_type, "Connect-Protocol-Version": "1"},
        )
        response = self._conn.getresponse()
        data = response.read()
        return Answer(response.status, data, time.monotonic() - started)

    def get(self, path: str) -> Answer:
        started = time.monotonic()
        self._conn.request("GET", path)
        response = self._conn.getresponse()
        data = response.read()
        return Answer(response.status, data, time.monotonic() - started)

    def close(self) -> None:
        self._conn.close()


def raw_request(url: str, data: bytes, timeout: float = 30.0) -> bytes:
    """Send ``data`` on a new connection; everything the server answers until it
    closes (or ``timeout``)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    out = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may answer and close before reading everything
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return out


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM: the peak) of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]
