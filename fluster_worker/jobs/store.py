"""Job records and per-job files under the state dir, so a restarted worker
still answers for finished jobs.

Layout, one directory per job::

    <root>/<job_id>/record.json      the JobRecord, replaced atomically
    <root>/<job_id>/entrypoint.pkl   the request's pickle (only the container reads it)
    <root>/<job_id>/out/             the runner writes result.pkl here
    <root>/<job_id>/workdir/         mounted at /workdir
    <root>/<job_id>/app/             the job's copy of its bundle, mounted at /app
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from fluster_worker.common.files import write_atomically
from fluster_worker.common.threads import BlockingPool
from fluster_worker.jobs.model import JobRecord


class ResultTooLarge(Exception):
    pass


class JobStore:
    log = Logger()

    def __init__(self, root: Path, pool: BlockingPool) -> None:
        self.root = root
        self._pool = pool
        # One FIFO lock per job keeps that job's file writes in order.
        self._locks: dict[str, DeferredLock] = {}

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def entrypoint_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "entrypoint.pkl"

    def out_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "out"

    def result_path(self, job_id: str) -> Path:
        return self.out_dir(job_id) / "result.pkl"

    def workdir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "workdir"

    def app_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "app"

    def save(self, record: JobRecord) -> Deferred[None]:
        """Persist a snapshot of ``record`` (taken now), after earlier saves of it."""
        data = json.dumps(record.to_json()).encode("utf-8")
        path = self.job_dir(record.job_id) / "record.json"
        return self._chain(record.job_id, lambda: write_atomically(path, data))

    def prepare(self, job_id: str, entrypoint: bytes) -> Deferred[None]:
        """Create the job's directories and write its entry point. (A replaced
        attempt's directory was deleted before; the record saved meanwhile stays.)"""

        def make() -> None:
            for d in (self.out_dir(job_id), self.workdir(job_id), self.app_dir(job_id)):
                d.mkdir(parents=True, exist_ok=True)
            write_atomically(self.entrypoint_path(job_id), entrypoint)

        return self._chain(job_id, make)

    def fill_app(self, job_id: str, bundle_dir: Path | None) -> Deferred[None]:
        """Copy the unpacked bundle into the job's own /app, so a job writing to
        its working directory never touches the shared bundle cache."""

        def copy() -> None:
            app = self.app_dir(job_id)
            shutil.rmtree(app, ignore_errors=True)
            if bundle_dir is None:
                app.mkdir(parents=True)
            else:
                shutil.copytree(bundle_dir, app, symlinks=True)

        return self._pool.run(copy)

    def load_all(self) -> Deferred[list[JobRecord]]:
        def load() -> list[JobRecord]:
            records: list[JobRecord] = []
            if not self.root.is_dir():
                return records
            for entry in sorted(self.root.iterdir()):
                path = entry / "record.json"
                try:
                    records.append(JobRecord.from_json(json.loads(path.read_bytes())))
                except FileNotFoundError:
                    shutil.rmtree(entry, ignore_errors=True)  # never got a record: debris
                except (ValueError, KeyError, TypeError) as e:
                    self.log.warn("unreadable job record {path}: {error}", path=str(path), error=str(e))
            return records

        return self._pool.run(load)

    def read_result(self, job_id: str, limit: int) -> Deferred[bytes]:
        def read() -> bytes:
            path = self.result_path(job_id)
            try:
                with path.open("rb") as f:
                    data = f.read(limit + 1)
            except FileNotFoundError:
                return b""
            if len(data) > limit:
                raise ResultTooLarge(f"result of {job_id} exceeds {limit} bytes")
            return data

        return self._pool.run(read)

    def has_result(self, job_id: str) -> Deferred[bool]:
        return self._pool.run(self.result_path(job_id).is_file)

    def disk_bytes(self, job_id: str) -> Deferred[int]:
        return self._pool.run(_tree_bytes, self.workdir(job_id))

    def delete(self, job_id: str) -> Deferred[None]:
        return self._chain(job_id, lambda: shutil.rmtree(self.job_dir(job_id), ignore_errors=True))

    def _chain(self, job_id: str, work: Callable[[], None]) -> Deferred[None]:
        lock = self._locks.get(job_id)
        if lock is None:
            lock = self._locks[job_id] = DeferredLock()
        return lock.run(self._pool.run, work)

    def forget(self, job_id: str) -> None:
        """Drop the job's write lock once it has no writes in flight."""
        lock = self._locks.get(job_id)
        if lock is not None and not lock.locked:
            del self._locks[job_id]


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total
