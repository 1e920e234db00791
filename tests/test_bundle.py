"""BundleCache on real files, real zips and the real reactor (pytest-twisted)."""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import struct
import sys
import threading
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import ResponseDone
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from fluster_worker.bundles import unzip
from fluster_worker.bundles.cache import BundleCache, BundleError, BundleLease
from fluster_worker.bundles.hosts import bundle_http_client
from fluster_worker.bundles.http_body import HIGH_WATER, BodySink
from fluster_worker.testing.bundle import RecordingPool

reactor: Any = _reactor
pytestmark = pytest.mark.timeout(120)  # a regression may hang on a Deferred
UNPACK = unzip.unpack_into_place
COPY = unzip.copy_file


# Helpers.


def zip_bytes(files: dict[str, bytes], modes: dict[str, int] | None = None,
              method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            if modes and name in modes:
                info.external_attr = modes[name] << 16
            archive.writestr(info, data)
    return buf.getvalue()


def write_zip(path: Path, files: dict[str, bytes], **kw: Any) -> Path:
    path.write_bytes(zip_bytes(files, **kw))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(cache_dir: Path) -> list[str]:
    """Everything in the cache but the finished bundles."""
    tmp = cache_dir / "bundles" / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


def bundles(cache_dir: Path) -> list[str]:
    root = cache_dir / "bundles"
    return sorted(p.name for p in root.iterdir() if p.name != "tmp") if root.exists() else []


async def expect_error(d: Deferred[BundleLease], *words: str) -> str:
    with pytest.raises(BundleError) as info:
        await d
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


class Lines(list[str]):
    def __call__(self, line: str) -> None:
        self.append(line)


@pytest.fixture
def pool() -> Iterator[RecordingPool]:
    p = RecordingPool(reactor, "bundle-test")
    p.startService()
    yield p
    p.pool.stop()


@pytest.fixture
def make_cache(pool: RecordingPool, tmp_path: Path) -> Callable[..., BundleCache]:
    def make(http: Any = None, **kw: Any) -> BundleCache:
        return BundleCache(reactor, pool, tmp_path / "cache", http or treq, **kw)

    return make


# Local files.


@pytest_twisted.ensureDeferred
async def test_plain_path_and_file_url(make_cache: Any, pool: RecordingPool,
                                       tmp_path: Path) -> None:
    bundle = write_zip(tmp_path / "b.zip", {
        "pyproject.toml": b"[project]\n", "pkg/__init__.py": b"", "bin/run": b"#!/bin/sh\n",
        "bin/suid": b"x", "private": b"y",
    }, modes={"bin/run": 0o100755, "bin/suid": 0o104755, "private": 0o100600})
    cache = make_cache()
    log = Lines()
    lease = await cache.acquire(str(bundle), log)
    root = lease.bundle.path
    assert lease.bundle.digest == sha256(bundle)
    assert root == tmp_path / "cache" / "bundles" / sha256(bundle)
    assert (root / "pyproject.toml").read_bytes() == b"[project]\n"
    assert (root / "pkg" / "__init__.py").exists()
    assert stat.S_IMODE((root / "bin" / "run").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "bin" / "suid").stat().st_mode) == 0o755  # no setuid
    assert stat.S_IMODE((root / "private").stat().st_mode) == 0o644
    assert any(line.startswith("reading bundle") for line in log)
    assert any(line.startswith("unpacking bundle") for line in log)

    log2 = Lines()
    again = await cache.acquire(bundle.as_uri(), log2)
    assert again.bundle == lease.bundle
    assert pool.calls[COPY] == 1 and pool.calls[UNPACK] == 1
    assert log2 == [f"bundle cached (sha256 {lease.bundle.digest[:12]})"]
    lease.release()
    lease.release()  # idempotent
    again.release()
    await cache.idle()
    assert leftovers(tmp_path / "cache") == []


@pytest_twisted.ensureDeferred
async def test_file_changes_are_noticed(make_cache: Any, pool: RecordingPool,
                                        tmp_path: Path) -> None:
    bundle = write_zip(tmp_path / "b.zip", {"a.py": b"1"})
    cache = make_cache()
    first = await cache.acquire(str(bundle))
    # Touched, same bytes: read again (the key changed) but not unpacked again.
    os.utime(bundle, ns=(1, 1))
    touched = await cache.acquire(str(bundle))
    assert touched.bundle == first.bundle
    assert pool.calls[COPY] == 2 and pool.calls[UNPACK] == 1
    # New content: a new bundle.
    write_zip(tmp_path / "new.zip", {"a.py": b"2"}).replace(bundle)
    changed = await cache.acquire(str(bundle))
    assert changed.bundle.digest == sha256(bundle) != first.bundle.digest
    assert (changed.bundle.path / "a.py").read_bytes() == b"2"
    assert pool.calls[UNPACK] == 2


@pytest_twisted.ensureDeferred
async def test_concurrent_acquires_fetch_and_unpack_once(make_cache: Any, pool: RecordingPool,
                                                         tmp_path: Path) -> None:
    bundle = write_zip(tmp_path / "b.zip", {"a.py": b"x"})
    cache = make_cache()
    held = pool.hold(COPY)
    logs = [Lines() for _ in range(3)]
    waiters = [cache.acquire(str(bundle), logs[0]), cache.acquire(bundle.as_uri(), logs[1]),
               cache.acquire(str(bundle), logs[2])]
    await held.reached
    assert not any(w.called for w in waiters)
    held.release()
    leases = [await w for w in waiters]
    assert len({lease.bundle for lease in leases}) == 1
    assert len({id(lease) for lease in leases}) == 3
    assert pool.calls[COPY] == 1 and pool.calls[UNPACK] == 1
    assert any("already in progress" in line for line in logs[1])
    assert all(any(line.startswith("unpacking") for line in log) for log in logs)


@pytest_twisted.ensureDeferred
async def test_same_bytes_from_two_sources_unpack_once(make_cache: Any, pool: RecordingPool,
                                                       tmp_path: Path) -> None:
    bundle = write_zip(tmp_path / "b.zip", {"a.py": b"x"})
    twin = tmp_path / "twin.zip"
    twin.write_bytes(bundle.read_bytes())
    cache = make_cache()
    held = pool.hold(UNPACK)
    first = cache.acquire(str(bundle))
    await held.reached
    twin_log = Lines()
    second = cache.acquire(str(twin), twin_log)
    held.release()
    assert (await first).bundle == (await second).bundle
    assert pool.calls[COPY] == 2 and pool.calls[UNPACK] == 1
    assert twin_log[-1].startswith("bundle cached")


@pytest.mark.parametrize("url, words", [
    ("ftp://example.com/b.zip", ["unsupported bundle URL scheme 'ftp'"]),
    ("bundles/b.zip", ["not absolute"]),
    ("file:b.zip", ["not absolute"]),
    ("file://otherhost/b.zip", ["remote host"]),
    ("", ["empty"]),
])
@pytest_twisted.ensureDeferred
async def test_bad_urls(make_cache: Any, url: str, words: list[str]) -> None:
    await expect_error(make_cache().acquire(url), *words)


@pytest_twisted.ensureDeferred
async def test_missing_and_not_zip(make_cache: Any, tmp_path: Path) -> None:
    cache = make_cache()
    missing = tmp_path / "nope.zip"
    assert await expect_error(cache.acquire(str(missing))) == f"bundle not found: {missing}"
    os.mkfifo(tmp_path / "fifo.zip")
    await expect_error(cache.acquire(str(tmp_path / "fifo.zip")), "not a regular file")
    await expect_error(cache.acquire(str(tmp_path)), "not a regular file")
    junk = tmp_path / "junk.zip"
    junk.write_bytes(os.urandom(5000))
    await expect_error(cache.acquire(str(junk)), "not a valid zip")
    corrupt = tmp_path / "corrupt.zip"
    data = bytearray(zip_bytes({"a.py": os.urandom(4000)}))
    data[60:200] = bytes(140)  # inside the compressed member
    corrupt.write_bytes(bytes(data))
    await expect_error(cache.acquire(str(corrupt)), "corrupt bundle member 'a.py'")
    await cache.idle()
    assert bundles(tmp_path / "cache") == [] and leftovers(tmp_path / "cache") == []


@pytest_twisted.ensureDeferred
async def test_gs_without_gcsfs_names_the_extra(make_cache: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs -> ImportError
    await expect_error(make_cache().acquire("gs://bucket/b.zip"), "pip install 'fluster-worker[gcs]'")


# Hostile zips.


def symlink_zip() -> bytes:
    return zip_bytes({"ok.py": b"", "link": b"/etc/passwd"}, modes={"link": 0o120777})


# (zip bytes, words of the error): also run in a loop by tests/test_fd_leaks.py.
HOSTILE_MEMBERS = [
    (zip_bytes({"ok.py": b"", "../evil.py": b"x"}), ["escapes the bundle", "../evil.py"]),
    (zip_bytes({"a/../../evil.py": b"x"}), ["escapes the bundle"]),
    (zip_bytes({"/tmp/evil.py": b"x"}), ["absolute path"]),
    (zip_bytes({"C:/evil.py": b"x"}), ["absolute path"]),
    (zip_bytes({"..\\evil.py": b"x"}), ["unsafe"]),
    (symlink_zip(), ["symlink", "'link'"]),
    (zip_bytes({"fifo": b""}, modes={"fifo": 0o010644}), ["not a regular file"]),
    (zip_bytes({"a.py": b"1", "b/": b"", "b": b"2"}), ["clashes"]),
    (zip_bytes({"a/" * 300 + "x.py": b""}), ["too long"]),
]


@pytest.mark.parametrize("content, words", HOSTILE_MEMBERS)
@pytest_twisted.ensureDeferred
async def test_hostile_members_rejected(make_cache: Any, tmp_path: Path, content: bytes,
                                        words: list[str]) -> None:
    bundle = tmp_path / "in" / "b.zip"
    bundle.parent.mkdir()
    bundle.write_bytes(content)
    cache = make_cache()
    await expect_error(cache.acquire(str(bundle)), *words)
    await cache.idle()
    assert bundles(tmp_path / "cache") == [] and leftovers(tmp_path / "cache") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "in"]


@pytest_twisted.ensureDeferred
async def test_member_count_bomb(make_cache: Any, tmp_path: Path) -> None:
    cache = make_cache(max_members=10)
    ok = write_zip(tmp_path / "ok.zip", {f"f{i}": b"" for i in range(10)})
    (await cache.acquire(str(ok))).release()
    bomb = write_zip(tmp_path / "bomb.zip", {f"f{i}": b"" for i in range(11)})
    await expect_error(cache.acquire(str(bomb)), "too many members (11 > 10)")


@pytest.mark.parametrize("members, limits, message", [
    (65536, unzip.Limits(10**9, 65535), "too many members (65536 > 65535)"),  # zip64 record
    (20, unzip.Limits(10**9, 100), "zip directory is too large"),
])
def test_central_directory_checked_before_parsing(tmp_path: Path, members: int,
                                                  limits: unzip.Limits, message: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "b.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(members):
            info = zipfile.ZipInfo(str(i))
            info.comment = b"c" * 60_000 if members == 20 else b""
            z.writestr(info, b"")
    monkeypatch.setattr(zipfile, "ZipFile", None)  # rejected before zipfile reads anything
    with pytest.raises(unzip.UnzipError, match=re.escape(message)):
        unzip.extract(path, tmp_path / "out", limits, threading.Event())
    assert not (tmp_path / "out").exists()


def lying_zip(real: bytes, declared: int) -> bytes:
    """One deflated member whose headers declare ``declared`` bytes, CRC included."""
    raw = bytearray(zip_bytes({"big.bin": real}))
    crc = zlib.crc32(real[:declared])
    struct.pack_into("<LLL", raw, 14, crc, struct.unpack_from("<L", raw, 18)[0], declared)
    central = raw.rfind(b"PK\x01\x02")
    struct.pack_into("<L", raw, central + 16, crc)
    struct.pack_into("<L", raw, central + 24, declared)
    return bytes(raw)


@pytest_twisted.ensureDeferred
async def test_byte_bombs(make_cache: Any, tmp_path: Path) -> None:
    cache = make_cache(max_unpacked_bytes=1024 * 1024)
    honest = write_zip(tmp_path / "honest.zip", {"a": bytes(600_000), "b": bytes(600_000)})
    await expect_error(cache.acquire(str(honest)), "unpacks to more than 1048576 bytes")
    # Declares 100 bytes, inflates to 8 MiB: stopped at the declared size, never written.
    liar = tmp_path / "liar.zip"
    liar.write_bytes(lying_zip(bytes(8 * 1024 * 1024), declared=100))
    lease = await cache.acquire(str(liar))
    assert (lease.bundle.path / "big.bin").stat().st_size == 100
    # Same, but the CRC of the declared prefix does not match: corrupt.
    liar2 = tmp_path / "liar2.zip"
    raw = bytearray(lying_zip(b"\x01" * (8 * 1024 * 1024), declared=100))
    raw[14] ^= 0xFF
    raw[raw.rfind(b"PK\x01\x02") + 16] ^= 0xFF
    liar2.write_bytes(bytes(raw))
    await expect_error(cache.acquire(str(liar2)), "corrupt bundle member 'big.bin'")
    await cache.idle()
    assert leftovers(tmp_path / "cache") == []


def test_extract_counts_actual_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should zipfile ever yield more than declared, the running count stops it."""
    zip_path = write_zip(tmp_path / "b.zip", {"a": bytes(100)})
    real_open = zipfile.ZipFile.open

    class Endless(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            b[:] = bytes(len(b))
            return len(b)

    def lying_open(self: zipfile.ZipFile, *a: Any, **kw: Any) -> Any:
        real_open(self, *a, **kw).close()
        return io.BufferedReader(Endless())

    monkeypatch.setattr(zipfile.ZipFile, "open", lying_open)
    with pytest.raises(unzip.UnzipError, match="more than 5000000 bytes"):
        unzip.extract(zip_path, tmp_path / "out", unzip.Limits(5_000_000, 10), threading.Event())
    assert not (tmp_path / "out").exists()


_parts = st.sampled_from(["a", "b", "..", ".", "", "C:", "\\", "..\\x", "/", "c.py", "\x00"])


@settings(max_examples=200, deadline=None)
@given(names=st.lists(st.lists(_parts, min_size=1, max_size=5).map("/".join), max_size=6))
def test_extract_never_writes_outside(tmp_path_factory: pytest.TempPathFactory,
                                      names: list[str]) -> None:
    base = tmp_path_factory.mktemp("x")
    archive = base / "b.zip"
    with zipfile.ZipFile(archive, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are part of the test
        for name in names:
            if name:
                z.writestr(zipfile.ZipInfo(name), b"x")
    dest = base / "inside" / "out"
    dest.parent.mkdir()
    try:
        unzip.extract(archive, dest, unzip.Limits(10**6, 100), threading.Event())
    except unzip.UnzipError:
        assert not dest.exists()
    everything = {p.relative_to(base) for p in base.rglob("*")}
    assert all(p.parts[0] == "inside" or p == Path("b.zip") for p in everything)
    assert all(not p.is_symlink() for p in base.rglob("*"))


# HTTP.


class ZipResource(Resource):
    isLeaf = True

    def __init__(self, body: bytes, etag: bytes | None = b'"v1"', chunked: bool = False) -> None:
        super().__init__()
        self.body, self.etag, self.chunked = body, etag, chunked
        self.requests: list[dict[bytes, bytes | None]] = []

    def render_GET(self, request: Any) -> bytes | int:
        inm = request.getHeader(b"if-none-match")
        self.requests.append({b"if-none-match": inm})
        if request.path == b"/missing.zip":
            request.setResponseCode(404)
            return b"no"
        if self.etag is not None:
            request.setHeader(b"etag", self.etag)
            if inm == self.etag:
                request.setResponseCode(304)
                return b""
        if self.chunked:  # no Content-Length
            request.write(self.body)
            request.finish()
            return NOT_DONE_YET
        return self.body


@pytest_twisted.ensureDeferred
async def test_http_etag_revalidates_without_download(make_cache: Any, pool: RecordingPool
                                                      ) -> None:
    resource = ZipResource(zip_bytes({"main.py": b"print(1)"}))
    cache = make_cache(StubTreq(resource))
    log = Lines()
    lease = await cache.acquire("http://bundles.example/b.zip?sig=SECRET", log)
    assert (lease.bundle.path / "main.py").read_bytes() == b"print(1)"
    assert lease.bundle.digest == hashlib.sha256(resource.body).hexdigest()
    assert "downloading bundle from http://bundles.example/b.zip?..." in log
    assert not any("SECRET" in line for line in log)
    log2 = Lines()
    again = await cache.acquire("http://bundles.example/b.zip?sig=SECRET", log2)
    assert again.bundle == lease.bundle
    assert [r[b"if-none-match"] for r in resource.requests] == [None, b'"v1"']
    assert pool.calls[UNPACK] == 1
    assert any("not modified" in line for line in log2)


@pytest_twisted.ensureDeferred
async def test_http_without_validators_redownloads_but_does_not_unpack(
        make_cache: Any, pool: RecordingPool) -> None:
    resource = ZipResource(zip_bytes({"main.py": b"x"}), etag=None)
    cache = make_cache(StubTreq(resource))
    first = await cache.acquire("https://bundles.example/b.zip")
    second = await cache.acquire("https://bundles.example/b.zip")
    assert first.bundle == second.bundle
    assert len(resource.requests) == 2 and pool.calls[UNPACK] == 1


@pytest_twisted.ensureDeferred
async def test_http_errors_and_download_cap(make_cache: Any, tmp_path: Path) -> None:
    body = zip_bytes({"a": os.urandom(50_000)}, method=zipfile.ZIP_STORED)
    cache = make_cache(StubTreq(ZipResource(body)), max_download_bytes=10_000)
    # One shape for every failure (the cause is in the worker's log): test_bundle_sources.py.
    failed = "download failed (the worker's log has the cause)"
    await expect_error(cache.acquire("http://h/missing.zip"), f"cannot download bundle http://h/missing.zip: {failed}")
    await expect_error(cache.acquire("http://h/b.zip"), f"cannot download bundle http://h/b.zip: {failed}")
    chunked = make_cache(StubTreq(ZipResource(body, chunked=True)), max_download_bytes=10_000)
    await expect_error(chunked.acquire("http://h/b.zip"), f"cannot download bundle http://h/b.zip: {failed}")
    await cache.idle()
    await chunked.idle()
    assert leftovers(tmp_path / "cache") == []


@pytest.fixture
def real_http() -> Iterator[HTTPClient]:
    """The worker's own client (bundles/hosts.py), told that loopback may serve bundles."""
    client, connections = bundle_http_client(reactor, ["127.0.0.0/8"])
    yield client
    connections.closeCachedConnections()


def listen(resource: Resource) -> tuple[Any, str]:
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}"


class Served(Resource):
    """Serves one body, with Last-Modified (and 304 to If-Modified-Since)."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: Any) -> bytes:
        if request.setLastModified(1_700_000_000) is http.CACHED:
            return b""
        return self.body


@pytest_twisted.ensureDeferred
async def test_http_real_server_streams_big_body(make_cache: Any, tmp_path: Path,
                                                 real_http: HTTPClient) -> None:
    # 24 MiB, stored: more than the sink's high-water mark, so it pauses the socket.
    big = write_zip(tmp_path / "big.zip", {"data.bin": os.urandom(24 * 1024 * 1024)},
                    method=zipfile.ZIP_STORED)
    port, base = listen(Served(big.read_bytes()))
    try:
        cache = make_cache(real_http)
        log = Lines()
        lease = await cache.acquire(f"{base}/big.zip", log)
        assert lease.bundle.digest == sha256(big)
        assert (lease.bundle.path / "data.bin").stat().st_size == 24 * 1024 * 1024
        again = await cache.acquire(f"{base}/big.zip", log)  # If-Modified-Since -> 304
        assert again.bundle == lease.bundle
        assert any("not modified" in line for line in log)
    finally:
        await port.stopListening()


class Stalling(Resource):
    """Sends part of the body, then nothing: a download stuck mid-way."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.started: Deferred[None] = Deferred()
        self.gone: Deferred[None] = Deferred()

    def render_GET(self, request: Any) -> int:
        request.setHeader(b"content-length", b"10000000")
        request.write(b"PK" + bytes(100_000))
        request.notifyFinish().addBoth(lambda _: self.gone.callback(None))
        self.started.callback(None)
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_cancel_stalled_download(make_cache: Any, tmp_path: Path,
                                       real_http: HTTPClient) -> None:
    stalling = Stalling()
    port, base = listen(stalling)
    try:
        cache = make_cache(real_http)
        waiter = cache.acquire(f"{base}/b.zip")
        await stalling.started
        waiter.cancel()
        with pytest.raises(CancelledError):
            await waiter
        await stalling.gone  # the connection was dropped
        await cache.idle()
        assert leftovers(tmp_path / "cache") == [] and bundles(tmp_path / "cache") == []
    finally:
        await port.stopListening()


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_body_sink_pauses_resumes_and_caps() -> None:
    sink = BodySink(limit=2 * HIGH_WATER)
    transport = StringTransport()
    sink.makeConnection(transport)
    waiting = Deferred.fromCoroutine(sink.next())
    assert not waiting.called
    sink.dataReceived(b"x" * (HIGH_WATER - 1))
    assert result_of(waiting) == [b"x" * (HIGH_WATER - 1)]
    assert transport.producerState == "producing"
    sink.dataReceived(b"x" * (HIGH_WATER - 1))
    sink.dataReceived(b"x")
    assert transport.producerState == "paused"  # the disk lags: stop reading the socket
    assert sum(map(len, result_of(Deferred.fromCoroutine(sink.next())))) == HIGH_WATER
    sink.drained()
    assert transport.producerState == "producing"
    sink.dataReceived(b"x" * 2)  # 2 * HIGH_WATER + 1 in all
    assert transport.producerState == "stopped"
    with pytest.raises(BundleError, match="larger than"):
        result_of(Deferred.fromCoroutine(sink.next()))


@pytest.mark.parametrize("end, expected", [(ResponseDone(), None), (ConnectionLost(), BundleError)])
def test_body_sink_end(end: Exception, expected: Any) -> None:
    sink = BodySink(limit=100)
    sink.makeConnection(StringTransport())
    sink.dataReceived(b"abc")
    sink.connectionLost(Failure(end))
    assert result_of(Deferred.fromCoroutine(sink.next())) == [b"abc"]
    if expected is None:
        assert result_of(Deferred.fromCoroutine(sink.next())) is None
    else:
        with pytest.raises(BundleError, match="download interrupted"):
            result_of(Deferred.fromCoroutine(sink.next()))


# Cancellation of local work, sharing.


@pytest.mark.parametrize("step", [COPY, UNPACK])
@pytest_twisted.ensureDeferred
async def test_cancel_leaves_nothing(make_cache: Any, pool: RecordingPool, tmp_path: Path,
                                     step: Any) -> None:
    bundle = write_zip(tmp_path / "b.zip", {"a.py": b"x", "b.py": b"y"})
    cache = make_cache()
    held = pool.hold(step)
    waiter = cache.acquire(str(bundle))
    await held.reached
    waiter.cancel()
    with pytest.raises(CancelledError):
        await waiter
    held.release()
    await cache.idle()
    assert leftovers(tmp_path / "cache") == [] and bundles(tmp_path / "cache") == []
    # A later acquire starts afresh.
    lease = await cache.acquire(str(bundle))
    assert (lease.bundle.path / "b.py").read_bytes() == b"y"


@pytest_twisted.ensureDeferred
async def test_one_waiter_cancels_others_get_the_bundle(make_cache: Any, pool: RecordingPool,
                                                        tmp_path: Path) -> None:
    bundle = write_zip(tmp_path / "b.zip", {"a.py": b"x"})
    cache = make_cache()
    held = pool.hold(UNPACK)
    first, second = cache.acquire(str(bundle)), cache.acquire(str(bundle))
    await held.reached
    first.cancel()
    held.release()
    with pytest.raises(CancelledError):
        await first
    lease = await second
    assert (lease.bundle.path / "a.py").exists()
    assert pool.calls[UNPACK] == 1


# Eviction and restart.


def sized(tmp_path: Path, name: str, size: int = 100_000) -> str:
    # About 106 KB on disk with its directory (4 KiB blocks): the caps below count those.
    return str(write_zip(tmp_path / f"{name}.zip", {name: os.urandom(size)}))


@pytest_twisted.ensureDeferred
async def test_eviction_is_lru(make_cache: Any, tmp_path: Path) -> None:
    cache = make_cache(max_cache_bytes=250_000)
    a, b, c = (sized(tmp_path, n) for n in "abc")
    lease_a = await cache.acquire(a)
    lease_a.release()
    (await cache.acquire(b)).release()
    (await cache.acquire(a)).release()  # a is now more recent than b
    lease_c = await cache.acquire(c)
    await cache.idle()
    assert set(bundles(tmp_path / "cache")) == {lease_a.bundle.digest, lease_c.bundle.digest}
    assert leftovers(tmp_path / "cache") == []


@pytest_twisted.ensureDeferred
async def test_cache_counts_what_the_disk_really_holds(make_cache: Any, tmp_path: Path) -> None:
    """1,000 one-byte files hold 1,000 blocks, not 1,000 bytes: the cap counts blocks."""
    tiny = write_zip(tmp_path / "tiny.zip", {f"d{i % 10}/f{i}": b"x" for i in range(1000)})
    block = os.statvfs(tmp_path).f_bsize
    cache = make_cache(max_cache_bytes=1000 * block)  # under the cap only when counted as bytes
    lines = Lines()
    lease = await cache.acquire(str(tiny), log=lines)
    size = int(re.search(r"unpacked \(sha256 \w+, (\d+) bytes\)", " ".join(lines)).group(1))  # type: ignore[union-attr]
    assert size >= 1010 * block  # files and directories
    lease.release()
    await cache.idle()
    assert bundles(tmp_path / "cache") == []  # over the cap once unleased: evicted


@pytest_twisted.ensureDeferred
async def test_eviction_spares_leased_bundles(make_cache: Any, tmp_path: Path) -> None:
    cache = make_cache(max_cache_bytes=150_000)
    lease_a = await cache.acquire(sized(tmp_path, "a"))
    lease_b = await cache.acquire(sized(tmp_path, "b"))
    await cache.idle()
    assert len(bundles(tmp_path / "cache")) == 2  # over the cap, but both in use
    lease_b.release()  # b is the only candidate, though a is older
    await cache.idle()
    assert bundles(tmp_path / "cache") == [lease_a.bundle.digest]
    assert (lease_a.bundle.path / "a").exists()
    lease_a.release()
    await cache.idle()
    assert bundles(tmp_path / "cache") == [lease_a.bundle.digest]  # under the cap


@pytest_twisted.ensureDeferred
async def test_restart_reuses_bundles_and_clears_tmp(make_cache: Any, pool: RecordingPool,
                                                     tmp_path: Path) -> None:
    bundle = write_zip(tmp_path / "b.zip", {"a.py": b"x"})
    (await make_cache().acquire(str(bundle))).release()
    junk = tmp_path / "cache" / "bundles" / "tmp" / "unpack-dead"
    junk.mkdir()
    (junk / "half.py").write_bytes(b"")
    restarted = make_cache()
    lease = await restarted.acquire(str(bundle))
    assert (lease.bundle.path / "a.py").read_bytes() == b"x"
    assert pool.calls[UNPACK] == 1  # only the first cache unpacked
    assert leftovers(tmp_path / "cache") == []
