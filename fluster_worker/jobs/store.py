"""Job records and per-job files under the state dir, so a restarted worker
still answers for finished jobs.

Layout, one directory per job (0700, the worker's), named by ``job_key(job_id)``
(common.jobnames: the id itself for ids of the first, flat rule, so older state
dirs load as they are; ``<slug>~<hash>`` for the others, e.g. ``parent/child``)::

    <root>/<key>/record.json      the JobRecord, replaced atomically (0600)
    <root>/<key>/entrypoint.pkl   the request's pickle (0600, the job user's: only the container reads it)
    <root>/<key>/out/             the runner writes result.pkl (and error.txt) here } 0700, owned by
    <root>/<key>/workdir/         mounted at /workdir                               } the job user
    <root>/<key>/tmp/             mounted at /tmp and /var/tmp                      }
    <root>/<key>/app/             empty, mounted at /app when the job has no bundle

Everything under out/, workdir/ and tmp/ is the job's: read it only through
``common.safe_files`` and ``common.safe_tree``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.common.backoff import Backoff
from fluster_worker.common.files import make_private_dir, write_atomically
from fluster_worker.common.jobnames import job_key, valid_job_id
from fluster_worker.common.safe_files import FileTooLarge, UnsafeFile, probe_regular, read_regular
from fluster_worker.common.safe_tree import TreeUsage, remove_tree, tree_usage
from fluster_worker.common.text import one_line
from fluster_worker.common.threads import BlockingPool
from fluster_worker.common.waiters import Waiters
from fluster_worker.images.dockerfile import CONTAINER_IO_DIR
from fluster_worker.jobs.model import JobRecord

_RESULT = ("out", "result.pkl")  # relative to the job's directory; /fluster/out/result.pkl for the job
#: The runner's record of the exception that ended the job, beside result.pkl.
ERROR_FILE = "error.txt"
_ERROR = ("out", ERROR_FILE)
#: The most of it read (the runner writes at most 500 characters); the most kept.
MAX_ERROR_FILE_BYTES = 4096
MAX_ERROR_CHARS = 1000
# A record that could not be saved (a full disk) is written again: 1 s, doubling to 30 s.
SAVE_RETRY = Backoff(initial_s=1.0, max_s=30.0, factor=2.0, jitter=0.0)


class ResultTooLarge(Exception):
    pass


class JobStore:
    log = Logger()

    def __init__(
        self,
        root: Path,
        pool: BlockingPool,
        *,
        clock: IReactorTime | None = None,
        owner: tuple[int, int] | None = None,
    ) -> None:
        """``clock``: when given, records whose save failed are written again on
        their own (SAVE_RETRY); without it, only by the next save of the job."""
        self.root = root
        self._pool = pool
        self._clock = clock
        # (uid, gid) of the job user: the owner of what the job may write.
        self._owner = owner
        # One FIFO lock per job keeps that job's file writes in order; it goes
        # away when the job has no write in flight or waiting.
        self._locks: dict[str, DeferredLock] = {}
        # The newest snapshot of each job whose save failed, and its retries.
        self._unsaved: dict[str, bytes] = {}
        self._failures: dict[str, int] = {}
        self._retries: dict[str, IDelayedCall] = {}
        self._saved: dict[str, Waiters[None]] = {}
        #: The error of the newest failed save ("" once every record is saved).
        self.save_error = ""

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_key(job_id)

    def entrypoint_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "entrypoint.pkl"

    def out_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "out"

    def result_path(self, job_id: str) -> Path:
        return self.out_dir(job_id) / "result.pkl"

    def workdir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "workdir"

    def tmp_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "tmp"

    def app_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "app"

    def _scratch(self, job_id: str) -> tuple[Path, Path]:
        """The directories removed when the job ends."""
        return self.workdir(job_id), self.tmp_dir(job_id)

    def save(self, record: JobRecord) -> Deferred[bool]:
        """Persist a snapshot of ``record`` (taken now), after earlier saves of it.
        Fires with True once written, False if that failed: the snapshot (or a
        newer one) is then written again until it is (see ``saved``)."""
        job_id = record.job_id
        data = json.dumps(record.to_json()).encode("utf-8")
        self._unsaved.pop(job_id, None)  # superseded by this one
        return self._write_record(job_id, data)

    def saved(self, job_id: str) -> Deferred[None]:
        """A new Deferred that fires once no failed save of the job waits to be
        written again (at once if none does)."""
        if job_id not in self._unsaved:
            return succeed(None)
        return self._saved.setdefault(job_id, Waiters()).wait()

    @property
    def unsaved_count(self) -> int:
        """Jobs whose newest record could not be written yet."""
        return len(self._unsaved)

    def _write_record(self, job_id: str, data: bytes) -> Deferred[bool]:
        path = self.job_dir(job_id) / "record.json"

        def written(_: None) -> bool:
            if job_id not in self._unsaved:
                self._failures.pop(job_id, None)
                self._cancel_retry(job_id)
                waiters = self._saved.pop(job_id, None)
                if waiters is not None:
                    waiters.fire(None)
                if not self._unsaved:
                    self.save_error = ""
            return True

        def failed(failure: Failure) -> bool:
            self.save_error = f"saving the record of {job_id} failed: {failure.getErrorMessage()}"
            failures = self._failures.get(job_id, 0)
            if failures == 0:
                self.log.error("{error}; retrying", error=self.save_error)
            self._failures[job_id] = failures + 1
            self._unsaved.setdefault(job_id, data)
            self._schedule_retry(job_id, SAVE_RETRY.base(failures))
            return False

        return self._chain(job_id, lambda: write_atomically(path, data)).addCallbacks(written, failed)

    def _schedule_retry(self, job_id: str, delay: float) -> None:
        if self._clock is None or job_id in self._retries:
            return
        self._retries[job_id] = self._clock.callLater(delay, self._retry, job_id)

    def _retry(self, job_id: str) -> None:
        self._retries.pop(job_id, None)
        data = self._unsaved.pop(job_id, None)
        if data is not None:
            self._write_record(job_id, data)

    def _cancel_retry(self, job_id: str) -> None:
        call = self._retries.pop(job_id, None)
        if call is not None and call.active():
            call.cancel()

    def prepare(self, job_id: str, entrypoint: bytes) -> Deferred[None]:
        """Create the job's directories and write its entry point. (A replaced
        attempt's directory was deleted before; the record saved meanwhile stays.)"""

        def make() -> None:
            make_private_dir(self.root)
            make_private_dir(self.job_dir(job_id))
            for d in (self.out_dir(job_id), *self._scratch(job_id)):
                d.mkdir(mode=0o700, exist_ok=True)
                os.chmod(d, 0o700, follow_symlinks=False)
                if self._owner is not None:
                    os.chown(d, *self._owner, follow_symlinks=False)
            self.app_dir(job_id).mkdir(mode=0o755, exist_ok=True)
            os.chmod(self.app_dir(job_id), 0o755)
            write_atomically(self.entrypoint_path(job_id), entrypoint, 0o600, self._owner)

        return self._chain(job_id, make)

    def clear_scratch(self, job_id: str) -> Deferred[None]:
        """Remove the job's /workdir and /tmp (the job has ended); its result,
        record and logs stay until retention."""

        def clear() -> None:
            for d in self._scratch(job_id):
                _remove(d)

        return self._chain(job_id, clear)

    def load_all(self) -> Deferred[list[JobRecord]]:
        def load() -> list[JobRecord]:
            records: list[JobRecord] = []
            if not self.root.is_dir():
                return records
            for entry in sorted(self.root.iterdir()):
                path = entry / "record.json"
                try:
                    record = JobRecord.from_json(json.loads(path.read_bytes()))
                except FileNotFoundError:
                    _remove(entry)  # never got a record: debris
                    continue
                except (ValueError, KeyError, TypeError) as e:
                    self.log.warn("unreadable job record {path}: {error}", path=str(path), error=str(e))
                    continue
                # A record is only ever written to its own job's directory: anything
                # else was put there by hand, and is left alone rather than trusted.
                if not valid_job_id(record.job_id) or job_key(record.job_id) != entry.name:
                    self.log.warn("job record {path} is not in its job's directory: skipped", path=str(path))
                    continue
                records.append(record)
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

    def read_error(self, job_id: str) -> Deferred[str]:
        """What the runner recorded of the exception that ended the job: one line
        of at most MAX_ERROR_CHARS, control characters blanked; "" when there is
        none. The job could have written anything there: it is read as hostile
        (a regular file only, no link followed, bounded) and any doubt means ""."""

        def read() -> str:
            try:
                data = read_regular(self.job_dir(job_id), _ERROR, MAX_ERROR_FILE_BYTES)
            except (UnsafeFile, FileTooLarge, OSError) as e:  # the job's outcome stands without it
                self.log.warn("ignoring the error record of {job_id}: {error}", job_id=job_id, error=str(e))
                return ""
            if not data:
                return ""
            text = data.decode("utf-8", errors="replace")
            return one_line("".join(c if c.isprintable() else " " for c in text), MAX_ERROR_CHARS)

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

    def disk_usage(self, job_id: str, max_entries: int) -> Deferred[TreeUsage]:
        """What the job's writable directories hold now (walked without following
        anything), counting at most ``max_entries`` entries in all."""

        def measure() -> TreeUsage:
            total = TreeUsage(0, 0)
            for d in (self.out_dir(job_id), *self._scratch(job_id)):
                usage = tree_usage(d, max_entries - total.entries)
                total = TreeUsage(
                    total.bytes + usage.bytes,
                    total.entries + usage.entries,
                    total.truncated or usage.truncated,
                    total.changed or usage.changed,
                )
                if total.truncated:
                    break
            return total

        return self._pool.run(measure)

    def delete(self, job_id: str) -> Deferred[None]:
        self._unsaved.pop(job_id, None)
        self._failures.pop(job_id, None)
        self._cancel_retry(job_id)
        waiters = self._saved.pop(job_id, None)
        if waiters is not None:
            waiters.fire(None)
        return self._chain(job_id, lambda: _remove(self.job_dir(job_id)))

    def _chain(self, job_id: str, work: Callable[[], None]) -> Deferred[None]:
        lock = self._locks.get(job_id)
        if lock is None:
            lock = self._locks[job_id] = DeferredLock()

        def idle(result: object) -> object:
            # Nobody else holds or waits for it: drop it (no lock per job kept forever).
            if not lock.locked and self._locks.get(job_id) is lock:
                del self._locks[job_id]
            return result

        return lock.run(self._pool.run, work).addBoth(idle)

    def forget(self, job_id: str) -> None:
        """Kept for callers: a job's write lock now goes away by itself when idle."""


def _remove(path: Path) -> None:
    try:
        remove_tree(path)
    except OSError as e:
        JobStore.log.warn("could not remove all of {path}: {error}", path=str(path), error=str(e))


def _shown_in_container(error: UnsafeFile) -> UnsafeFile:
    """The job's files under its directory are under CONTAINER_IO_DIR for the job."""
    return UnsafeFile(f"{CONTAINER_IO_DIR}/{error}")
