"""A re-adopted job keeps its bundle (issue 12): its container mounts the cached
bundle at /app, so a restarted worker pins it by digest before anything can
evict it, and lets go when the job ends. The job core on fakes (JobRig), then
the real BundleCache on real files."""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor as _reactor

from fluster_worker.bundles.cache import BundleCache
from fluster_worker.jobs.model import JobState
from fluster_worker.testing.bundle import RecordingPool
from fluster_worker.testing.jobs import JobRig, result

reactor: Any = _reactor
DIGEST = "ab" * 32
URL = "file:///bundles/b.zip"


def restarted(rig: JobRig, **kw: Any) -> JobRig:
    result(rig, rig.stop())
    again = JobRig(rig.root, runtime=rig.runtime, **kw)
    again.start()
    return again


def rig_with_bundle(tmp_path: Path, **kw: Any) -> JobRig:
    (tmp_path / "app").mkdir(exist_ok=True)
    rig = JobRig(tmp_path, bundle_dir=tmp_path / "app", **kw)
    rig.bundles.auto_digest = DIGEST
    rig.start()
    return rig


# -- the job core, on fakes -----------------------------------------------------------


def test_a_re_adopted_job_pins_its_bundle_until_it_ends(tmp_path: Path) -> None:
    rig = rig_with_bundle(tmp_path)
    rig.submit(bundle_url=URL)
    assert rig.record().state is JobState.RUNNING
    assert rig.record().build.bundle_digest == DIGEST  # kept in the record for the next process
    container = rig.container()
    again = restarted(rig, bundle_dir=tmp_path / "app")
    assert again.record().state is JobState.RUNNING
    assert again.bundles.pinned == [DIGEST]
    assert again.bundles.acquires == []  # nothing fetched for a job that runs already
    container.exit(0)
    again.settle()
    assert again.record().state is JobState.SUCCEEDED
    assert again.bundles.pinned == []


def test_pins_are_taken_before_the_site_opens(tmp_path: Path) -> None:
    """Held from the load of the records on, before any RunJob or restarted job
    could fetch a bundle (and evict one), and while the engine is away."""
    rig = rig_with_bundle(tmp_path)
    rig.submit(bundle_url=URL)
    container = rig.container()
    result(rig, rig.stop())
    rig.runtime.engine_down()
    again = JobRig(tmp_path, runtime=rig.runtime, bundle_dir=tmp_path / "app")
    at_ready: list[list[str]] = []
    again.manager.ready().addCallback(lambda _: at_ready.append(list(again.bundles.pinned)))
    again.start()
    again.advance(30)
    assert at_ready == [[DIGEST]] and again.bundles.pinned == [DIGEST]
    again.runtime.engine_up()
    again.settle()
    assert again.record().state is JobState.RUNNING and again.bundles.pinned == [DIGEST]
    container.exit(0)
    again.settle()
    assert again.bundles.pinned == []


def test_lost_restarted_and_finished_jobs_hold_no_pin(tmp_path: Path) -> None:
    rig = rig_with_bundle(tmp_path, slots=1, auto_build=False)
    rig.submit("building", bundle_url=URL)  # BUILDING: acquired its bundle, no container yet
    assert rig.record("building").state is JobState.BUILDING
    rig.builder.builds[0].finish()
    rig.settle()
    assert rig.record("building").state is JobState.RUNNING
    rig.submit("waiting", bundle_url=URL)  # PENDING behind it: no bundle yet
    result(rig, rig.stop())
    rig.container("building").state = "removed"  # lost while the worker was away
    again = restarted(rig, slots=1, auto_build=False, bundle_dir=tmp_path / "app")
    assert again.record("building").state is JobState.WORKER_FAILED
    assert again.bundles.pinned == []  # the lost job's pin went with the recovery
    assert [p.digest for p in again.bundles.pins] == [DIGEST]


def test_records_of_older_workers_adopt_without_a_pin(tmp_path: Path) -> None:
    rig = JobRig(tmp_path)  # no bundle: the record names no digest
    rig.start()
    rig.submit()
    container = rig.container()
    again = restarted(rig)
    assert again.record().state is JobState.RUNNING and again.bundles.pins == []
    container.exit(0)
    again.settle()
    assert again.record().state is JobState.SUCCEEDED


# -- the real cache -------------------------------------------------------------------


@pytest.fixture
def pool() -> Iterator[RecordingPool]:
    p = RecordingPool(reactor, "bundle-pins")
    p.startService()
    yield p
    p.pool.stop()


def sized_zip(path: Path, name: str, size: int = 100_000) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(name, os.urandom(size))
    return str(path)


def on_disk(cache_dir: Path) -> set[str]:
    return {p.name for p in (cache_dir / "bundles").iterdir() if p.name != "tmp"}


@pytest_twisted.ensureDeferred
async def test_eviction_skips_a_pinned_bundle_of_a_restarted_worker(pool: RecordingPool, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    # The previous process: bundles a (the re-adopted job's, the oldest) and b.
    first = BundleCache(reactor, pool, cache_dir, treq)
    a = await first.acquire(sized_zip(tmp_path / "a.zip", "a"))
    b = await first.acquire(sized_zip(tmp_path / "b.zip", "b"))
    a.release()
    b.release()
    await first.idle()
    # A new process with a cap that holds about two bundles: the pin comes first
    # (at the load of the records), then a new job's bundle pushes it over.
    cache = BundleCache(reactor, pool, cache_dir, treq, max_cache_bytes=250_000)
    pin = cache.pin(a.bundle.digest)
    assert pin.bundle.path == a.bundle.path
    c = await cache.acquire(sized_zip(tmp_path / "c.zip", "c"))
    await cache.idle()
    assert on_disk(cache_dir) == {a.bundle.digest, c.bundle.digest}  # b went, though a is older
    assert (a.bundle.path / "a").stat().st_size == 100_000
    c.release()
    d = await cache.acquire(sized_zip(tmp_path / "d.zip", "d"))
    await cache.idle()
    assert on_disk(cache_dir) == {a.bundle.digest, d.bundle.digest}
    pin.release()  # the job ended: a is the least recently used, and goes
    pin.release()  # idempotent
    d.release()
    e = await cache.acquire(sized_zip(tmp_path / "e.zip", "e"))
    await cache.idle()
    assert on_disk(cache_dir) == {d.bundle.digest, e.bundle.digest}
    e.release()


@pytest_twisted.ensureDeferred
async def test_a_pin_holds_even_before_the_bundle_is_cached(pool: RecordingPool, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache = BundleCache(reactor, pool, cache_dir, treq, max_cache_bytes=50_000)
    bundle = sized_zip(tmp_path / "a.zip", "a")
    digest = hashlib.sha256(Path(bundle).read_bytes()).hexdigest()
    pin = cache.pin(digest)  # a bundle this cache has not seen yet (it warns once loaded)
    lease = await cache.acquire(bundle)
    lease.release()
    await cache.idle()
    assert on_disk(cache_dir) == {digest}  # over the cap, unleased, but pinned
    pin.release()
    await cache.idle()
    assert on_disk(cache_dir) == set()
    with pytest.raises(ValueError):
        cache.pin("../../etc")
