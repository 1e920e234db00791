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
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from fluster_worker.common.files import write_atomically
from fluster_worker.common.safe_files import FileTooLarge, UnsafeFile, probe_regular, read_regular
from fluster_worker.common.safe_tree import remove_tree, tree_usage
from fluster_worker.common.threads import BlockingPool
from fluster_worker.images.dockerfile import CONTAINER_IO_DIR
from fluster_worker.jobs.model import JobRecord

_RESULT = ("out", "result.pkl")  # relative to the job's directory; /fluster/out/result.pkl for the job


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
                    _remove(entry)  # never got a record: debris
                except (ValueError, KeyError, TypeError) as e:
                    self.log.warn("unreadable job record {path}: {error}", path=str(path), error=str(e))
            return records

        return self._pool.run(load)

    def read_result(self, job_id: str, limit: int) -> Deferred[bytes]:
        """The result's bytes, b"" when there is none. The job wrote that file:
        it is read without following links (UnsafeFile) and only up to
        ``limit`` (ResultTooLarge)."""

        def read() -> bytes:
            try:
                data = read_regular(self.job_dir(job_id), _RESULT, limit)
            except FileTooLarge:
                raise ResultTooLarge(f"result of {job_id} exceeds {limit} bytes") from None
            except UnsafeFile as e:
                raise _shown_in_container(e) from None
            return data or b""

        return self._pool.run(read)

    def has_result(self, job_id: str) -> Deferred[bool]:
        """Whether the job left a result: a regular file. UnsafeFile (naming the
        path as the job sees it) when something else is in its place."""

        def probe() -> bool:
            try:
                return probe_regular(self.job_dir(job_id), _RESULT, sys.maxsize) is not None
            except UnsafeFile as e:
                raise _shown_in_container(e) from None

        return self._pool.run(probe)

    def disk_bytes(self, job_id: str) -> Deferred[int]:
        return self._pool.run(lambda: tree_usage(self.workdir(job_id)).bytes)

    def delete(self, job_id: str) -> Deferred[None]:
        return self._chain(job_id, lambda: _remove(self.job_dir(job_id)))

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


def _remove(path: Path) -> None:
    try:
        remove_tree(path)
    except OSError as e:
        JobStore.log.warn("could not remove all of {path}: {error}", path=str(path), error=str(e))


def _shown_in_container(error: UnsafeFile) -> UnsafeFile:
    """The job's files under its directory are under CONTAINER_IO_DIR for the job."""
    return UnsafeFile(f"{CONTAINER_IO_DIR}/{error}")
