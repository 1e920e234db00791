"""The bundle cache: fetch a job's code bundle (a zip), unpack it once, lease it out.

Sources: absolute paths and ``file://`` URLs (read on the BlockingPool; only under
``bundle_roots`` when given: local.py), ``http(s)://`` (treq, streamed to a temp file
through the pool; the worker's client connects only to allowed addresses: hosts.py),
``gs://`` (the optional ``gcs`` extra). Layout under ``cache_dir``::

    bundles/<sha256>/   an unpacked bundle: the zip's root, read-only by contract
    bundles/tmp/        downloads, unpacks and deletions in progress; emptied at first use

Reuse. A local file is keyed by (path, size, mtime_ns, dev, inode) -> sha256: an
unchanged file is neither read nor unpacked again. An http(s) URL remembers the
ETag/Last-Modified of its last 200 and asks again with If-None-Match/If-Modified-Since;
a 304 reuses the bundle, a 200 is downloaded and hashed, and unpacked only if its sha256
is new. A gs:// object is keyed by its generation. Bundles found on disk at start are
valid: they are renamed into place only once complete.

Sharing. One operation per source in flight, and one unpack per digest; each caller gets
its own Deferred and its own lease. Cancelling that Deferred drops only that caller; when
the last one leaves, the operation is aborted and removes its temp files.

Eviction. Once the unpacked bundles total more than ``max_cache_bytes`` (file bytes), the
least recently acquired ones without a lease are renamed into tmp and deleted. After a
restart, recency is the bundle directory's mtime. A restarted worker ``pin``s, by
digest, the bundles of the jobs it is about to re-adopt (their containers mount them
at /app), before anything can evict: a pinned bundle is never evicted.
"""

from __future__ import annotations

import re
import secrets
import shutil
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fluster_worker.bundles import unzip
from fluster_worker.bundles.abort import Abort
from fluster_worker.bundles.fetch import Fetcher
from fluster_worker.bundles.sources import BundleError, Fetched, Source, parse_source, shown
from fluster_worker.common.threads import BlockingPool
from fluster_worker.common.waiters import Waiters

__all__ = ["Bundle", "BundleCache", "BundleError", "BundleLease"]

GiB = 1024**3
LogFn = Callable[[str], None]
T = TypeVar("T")

_log = Logger()
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Bundle:
    digest: str  # sha256 hex of the zip bytes
    path: Path  # the unpacked project root directory (treat as read-only)


class BundleLease:
    """Keeps ``bundle`` on disk until released. ``release`` is idempotent."""

    def __init__(self, bundle: Bundle, on_release: Callable[[], None]) -> None:
        self.bundle = bundle
        self._on_release: Callable[[], None] | None = on_release

    def release(self) -> None:
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release()


@dataclass
class _Entry:
    bundle: Bundle
    size: int
    leases: int = 0


class _Flight:
    """One fetch shared by its waiters; each waiter has its own Deferred."""

    def __init__(self, source: Source, on_abandoned: Callable[[_Flight], None]) -> None:
        self.source = source
        self.abort = Abort()
        self._on_abandoned = on_abandoned
        self._waiters: dict[Deferred[BundleLease], LogFn | None] = {}

    def join(self, log: LogFn | None) -> Deferred[BundleLease]:
        waiter: Deferred[BundleLease] = Deferred(self._leave)
        self._waiters[waiter] = log
        return waiter

    def _leave(self, waiter: Deferred[BundleLease]) -> None:
        # The canceller of a waiter; Deferred.cancel then fails it with CancelledError.
        self._waiters.pop(waiter, None)
        if not self._waiters and not self.abort.is_set():
            self.abort.set()
            self._on_abandoned(self)

    def say(self, line: str) -> None:
        for log in list(self._waiters.values()):
            _say(log, line)

    def land(self, result: _Entry | BundleError, lease: Callable[[_Entry], BundleLease]) -> None:
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters:
            if waiter.called:  # cancelled by the callback of an earlier waiter
                continue
            if isinstance(result, BundleError):
                waiter.errback(BundleError(str(result)))
            else:
                waiter.callback(lease(result))


class BundleCache:
    """Fetches, verifies, unpacks and caches job bundles; see the module docstring."""

    def __init__(
        self,
        reactor: IReactorTime,
        pool: BlockingPool,
        cache_dir: Path,
        http_client: Any,
        *,
        max_download_bytes: int = 4 * GiB,
        max_unpacked_bytes: int = 2 * GiB,
        max_members: int = 100_000,
        max_cache_bytes: int = 10 * GiB,
        bundle_roots: Sequence[Path | str] = (),
    ) -> None:
        """``http_client``: a treq client; the worker's checks the addresses it
        connects to (`hosts.bundle_http_client`). ``bundle_roots``: the directories
        local bundles may lie in; none (the default, with a warning): anywhere."""
        self._pool = pool
        self._root = Path(cache_dir) / "bundles"
        self._tmp = self._root / "tmp"
        roots = tuple(str(r) for r in bundle_roots)
        self._fetcher = Fetcher(reactor, pool, http_client, self._tmp, max_download_bytes, roots)
        if not roots:
            _log.warn(
                "file:// bundles are read from any path this worker can read; "
                "--bundle-roots limits them to the directories named"
            )
        self._limits = unzip.Limits(max_bytes=max_unpacked_bytes, max_members=max_members)
        self._max_cache = max_cache_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._cached_bytes = 0
        self._pins: Counter[str] = Counter()  # digest -> pins (`pin`), entry or not
        self._flights: dict[Source, _Flight] = {}
        self._locks: dict[str, DeferredLock] = {}  # per digest: unpack vs. delete
        self._recovery = DeferredLock()
        self._recovered = False
        self._busy: set[Deferred[None]] = set()
        self._idle: Waiters[None] = Waiters()

    def acquire(self, url: str, log: LogFn | None = None) -> Deferred[BundleLease]:
        """Fetch and unpack the bundle at ``url`` (or reuse it) and lease it."""
        try:
            source = parse_source(url)
        except BundleError as e:
            return fail(e)
        flight = self._flights.get(source)
        if flight is not None:
            _say(log, f"waiting for the fetch of {shown(source[1])} already in progress")
            return flight.join(log)
        flight = self._flights[source] = _Flight(source, self._forget)
        waiter = flight.join(log)
        self._spawn(self._fly(flight))
        return waiter

    def pin(self, digest: str) -> BundleLease:
        """Keep the cached bundle ``digest`` on disk until the lease is released:
        the bundle of a job a previous worker process started, whose container
        still mounts it (re-adoption). The pin holds at once, before the bundles
        on disk are loaded (which it starts) and whether or not ``digest`` is among
        them, so nothing evicts it in between. ValueError if ``digest`` is not a
        sha256 in hex."""
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"not a bundle digest: {digest[:80]!r}")
        self._pins[digest] += 1
        self._spawn(self._check_pinned(digest))
        return BundleLease(Bundle(digest, self._root / digest), lambda: self._unpin(digest))

    def idle(self) -> Deferred[None]:
        """Fires once no fetch, unpack or deletion is running (shutdown, tests)."""
        return self._idle.wait() if self._busy else succeed(None)

    # Flights and leases: all on the reactor thread, so no step below can interleave
    # with another except at an ``await``.

    async def _fly(self, flight: _Flight) -> None:
        result: _Entry | BundleError
        try:
            result = await self._obtain(flight)
        except BundleError as e:
            result = e
        except Exception as e:
            if flight.abort.is_set():  # nobody is waiting any more
                reason = "cancelled"
            else:
                _log.failure("bundle fetch of {source} failed", source=shown(flight.source[1]))
                reason = unzip.oneline(str(e) or repr(e))
            result = BundleError(f"cannot fetch bundle {shown(flight.source[1])}: {reason}")
        self._forget(flight)
        flight.land(result, self._lease)  # each waiter takes its own lease...
        if isinstance(result, _Entry):
            self._release(result)  # ...before the operation lets go of its own

    def _forget(self, flight: _Flight) -> None:
        if self._flights.get(flight.source) is flight:
            del self._flights[flight.source]

    def _hit(self, digest: str) -> _Entry | None:
        """The unpacked bundle ``digest``, leased to the caller, if it is cached."""
        entry = self._entries.get(digest)
        if entry is not None:
            entry.leases += 1
            self._entries.move_to_end(entry.bundle.digest)
        return entry

    def _lease(self, entry: _Entry) -> BundleLease:
        entry.leases += 1
        if entry.bundle.digest in self._entries:
            self._entries.move_to_end(entry.bundle.digest)
        return BundleLease(entry.bundle, lambda: self._release(entry))

    def _release(self, entry: _Entry) -> None:
        entry.leases -= 1
        self._evict()

    def _unpin(self, digest: str) -> None:
        self._pins[digest] -= 1
        if self._pins[digest] <= 0:
            del self._pins[digest]
        self._evict()

    async def _check_pinned(self, digest: str) -> None:
        await self._recover(Abort())
        if digest in self._pins and digest not in self._entries:
            _log.warn("bundle {digest} is pinned (a re-adopted job's) but not in the cache", digest=digest)

    def _evict(self) -> None:
        """Delete least recently used bundles without leases or pins while over the cap."""
        for digest, entry in list(self._entries.items()):
            if self._cached_bytes <= self._max_cache:
                return
            if entry.leases == 0 and digest not in self._pins:
                del self._entries[digest]
                self._cached_bytes -= entry.size
                _log.info("evicting bundle {digest} ({size} bytes)", digest=digest, size=entry.size)
                self._spawn(self._delete(digest))

    # The operations.

    async def _obtain(self, flight: _Flight) -> _Entry:
        """Fetch and unpack ``flight.source``; returns the entry with one lease taken."""
        await self._recover(flight.abort)
        fetch = self._fetcher.fetch
        fetched = await fetch(flight.source, flight.abort, flight.say, self._entries.__contains__)
        entry = await self._install(fetched, flight)
        if entry is None:  # evicted since the fetcher saw it cached: get the bytes
            fetched = await fetch(flight.source, flight.abort, flight.say, lambda _: False)
            entry = await self._install(fetched, flight)
        assert entry is not None
        return entry

    async def _recover(self, abort: Abort) -> None:
        async with _holding(self._recovery, abort):
            if self._recovered:
                return
            found = await self._pool.run(_scan_cache, self._root, self._tmp)
            for digest, size in found:
                self._add(digest, size)
            self._recovered = True
            _log.info("bundle cache has {n} bundles, {size} bytes", n=len(found),
                      size=self._cached_bytes)
        self._evict()

    async def _install(self, fetched: Fetched, flight: _Flight) -> _Entry | None:
        """The bundle, unpacked unless cached, and leased; None if it has no bytes
        (``zip_path`` None) and is not cached any more. Deletes the temp zip."""
        digest = fetched.digest
        try:
            async with self._locked(digest, flight.abort):
                entry = self._hit(digest)
                if entry is not None:
                    flight.say(f"bundle cached (sha256 {digest[:12]})")
                    return entry
                if fetched.zip_path is None:
                    return None
                flight.say(f"unpacking bundle (sha256 {digest[:12]})")
                size = await self._blocking(
                    unzip.unpack_into_place, fetched.zip_path, self._temp("unpack"),
                    self._root / digest, self._limits, flight.abort.event,
                )
                entry = self._add(digest, size)
                entry.leases += 1
                flight.say(f"bundle unpacked (sha256 {digest[:12]}, {size} bytes)")
                return entry
        finally:
            if fetched.zip_path is not None:
                await self._pool.run(fetched.zip_path.unlink, True)

    async def _delete(self, digest: str) -> None:
        async with self._locked(digest, Abort()):
            await self._pool.run(_remove_tree, self._root / digest, self._temp("evicted"))

    # Helpers.

    def _add(self, digest: str, size: int) -> _Entry:
        entry = self._entries[digest] = _Entry(Bundle(digest, self._root / digest), size)
        self._cached_bytes += size
        return entry

    def _temp(self, kind: str) -> Path:
        return self._tmp / f"{kind}-{secrets.token_hex(8)}"

    async def _blocking(self, f: Callable[..., T], *args: Any) -> T:
        try:
            return await self._pool.run(f, *args)
        except unzip.UnzipError as e:
            raise BundleError(str(e)) from None
        except unzip.Aborted:
            raise CancelledError() from None

    @asynccontextmanager
    async def _locked(self, digest: str, abort: Abort) -> AsyncIterator[None]:
        lock = self._locks.setdefault(digest, DeferredLock())
        try:
            async with _holding(lock, abort):
                yield
        finally:
            if not lock.locked and not lock.waiting:
                self._locks.pop(digest, None)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = Deferred.fromCoroutine(work)
        self._busy.add(task)
        task.addErrback(lambda f: _log.failure("bundle cache task failed", f))
        task.addBoth(self._task_done, task)

    def _task_done(self, _: object, task: Deferred[None]) -> None:
        self._busy.discard(task)
        if not self._busy:
            self._idle.fire(None)


def _say(log: LogFn | None, line: str) -> None:
    if log is not None:
        try:
            log(line)
        except Exception:
            _log.failure("bundle log callback failed")


@asynccontextmanager
async def _holding(lock: DeferredLock, abort: Abort) -> AsyncIterator[None]:
    await abort.wait(lock.acquire())
    try:
        yield
    finally:
        lock.release()


# Blocking helpers: run on the pool.


def _scan_cache(root: Path, tmp: Path) -> list[tuple[str, int]]:
    """Empty tmp; list (digest, size) of the unpacked bundles, oldest first."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    found = []
    for child in root.iterdir():
        if _DIGEST.fullmatch(child.name) and child.is_dir() and not child.is_symlink():
            found.append((child.stat().st_mtime_ns, child.name, unzip.tree_size(child)))
    return [(digest, size) for _, digest, size in sorted(found)]


def _remove_tree(path: Path, grave: Path) -> None:
    try:
        path.rename(grave)  # never a half-deleted tree under a digest's name
    except FileNotFoundError:
        return
    shutil.rmtree(grave, ignore_errors=True)
