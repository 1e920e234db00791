"""Getting a bundle's bytes: check the URL, then copy, download or skip.

`Fetcher.fetch` leaves the zip in a temp file (the caller deletes it), or reports
that the source is unchanged since it gave some digest that is still cached:

- file: keyed by (path, size, mtime_ns, dev, inode); read on the BlockingPool, only
  under the bundle roots when some are given (local.py).
- http(s): conditional GET with the ETag/Last-Modified of the last 200; the body is
  streamed to disk through the pool, the socket paused while the disk lags behind.
  Redirects are followed here (at most MAX_REDIRECTS), each a new request through
  the client, whose connections check the address they reach (hosts.py). Every
  failed download is the same one line to the job (`download_failed`), whatever the
  cause: a job must not map the ports of the worker's network by its errors.
- gs: keyed by the object's generation; needs the ``gcs`` extra (gcsfs).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from fluster_worker.bundles import unzip
from fluster_worker.bundles.hosts import HostRefused
from fluster_worker.common.threads import BlockingPool

T = TypeVar("T")
Source = tuple[str, str]  # ("file", "/abs/path") or (scheme, url)
HIGH_WATER = 8 * 1024 * 1024  # body bytes waiting for the disk before pausing the socket
RESPONSE_TIMEOUT = 60.0  # seconds to get the response headers of a download
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
#: What a job is told of any failed download; the worker's log has the cause.
DOWNLOAD_FAILED = "download failed (the worker's log has the cause)"
GCS_EXTRA = "gs:// bundles need the gcs extra: pip install 'fluster-worker[gcs]'"
_REMEMBERED = 10_000  # sources whose last digest is kept in memory
_log = Logger()


class BundleError(Exception):
    """A bundle cannot be fetched or unpacked; ``str(e)`` is one line naming the cause."""


@dataclass(frozen=True)
class Fetched:
    digest: str  # sha256 of the zip
    zip_path: Path | None  # a temp file, or None: unchanged since `digest`, still cached


class Abort:
    """Stops an operation nobody waits for any more: an Event for pool threads, and
    hooks (cancel a Deferred, drop a connection) for work on the reactor."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._hooks: list[Callable[[], object]] = []

    def is_set(self) -> bool:
        return self.event.is_set()

    def set(self) -> None:
        self.event.set()
        for hook in list(self._hooks):
            hook()

    @contextmanager
    def hooked(self, hook: Callable[[], object]) -> Iterator[None]:
        """Run ``hook`` if the operation is (or gets) aborted while in this block."""
        if self.is_set():
            hook()
        self._hooks.append(hook)
        try:
            yield
        finally:
            self._hooks.remove(hook)

    async def wait(self, d: Deferred[T]) -> T:
        """Await ``d``, cancelling it on abort."""
        with self.hooked(d.cancel):
            return await d


class Fetcher:
    def __init__(
        self, reactor: IReactorTime, pool: BlockingPool, http_client: Any, tmp: Path,
        max_bytes: int, roots: Sequence[str] = (),
    ) -> None:
        """``roots``: the directories local bundles may lie in (none: anywhere)."""
        self._reactor = reactor
        self._roots = tuple(roots)
        self._pool = pool
        self._http = http_client
        self._tmp = tmp
        self._max_bytes = max_bytes
        self._known: OrderedDict[object, str] = OrderedDict()  # file/gs key -> digest
        self._validators: OrderedDict[str, tuple[str, Headers]] = OrderedDict()  # http
        self._gcs: Any = None

    async def fetch(
        self, source: Source, abort: Abort, say: Callable[[str], None],
        cached: Callable[[str], bool],
    ) -> Fetched:
        """The bytes of ``source``, or just its digest when unchanged and ``cached``."""
        scheme, where = source
        if scheme == "file":
            key = await self._blocking(unzip.stat_key, where, self._roots)
            if cached(digest := self._known.get(key, "")):
                return Fetched(digest, None)
            say(f"reading bundle {shown(where)}")
            temp = self._temp()
            key, digest = await self._blocking(
                unzip.copy_file, where, temp, self._max_bytes, abort.event, self._roots
            )
            _remember(self._known, key, digest)
            return Fetched(digest, temp)
        if scheme == "gs":
            return await self._fetch_gcs(where, abort, say, cached)
        return await self._fetch_http(where, abort, say, cached)

    async def _fetch_gcs(
        self, url: str, abort: Abort, say: Callable[[str], None], cached: Callable[[str], bool]
    ) -> Fetched:
        if self._gcs is None:
            self._gcs = await self._blocking(_gcs_filesystem)
        info = await self._blocking(_gcs_info, self._gcs, url)
        key = ("gs", url, str(info.get("generation") or info.get("etag") or ""))
        if key[2] and cached(digest := self._known.get(key, "")):
            return Fetched(digest, None)
        say(f"downloading bundle from {shown(url)}")
        temp = self._temp()
        digest = await self._blocking(_gcs_copy, self._gcs, url, temp, self._max_bytes, abort.event)
        if key[2]:
            _remember(self._known, key, digest)
        return Fetched(digest, temp)

    async def _fetch_http(
        self, url: str, abort: Abort, say: Callable[[str], None], cached: Callable[[str], bool]
    ) -> Fetched:
        known, validators = self._validators.get(url, ("", Headers()))
        conditional = cached(known)
        say(f"downloading bundle from {shown(url)}")
        response = await self._get(url, validators if conditional else Headers(), abort)
        code = response.code
        if code == 304 and conditional:
            _discard_body(response)
            say(f"bundle not modified since sha256 {known[:12]}")
            return Fetched(known, None)
        if code != 200:
            _discard_body(response)
            raise download_failed(url, f"HTTP {code}")
        if response.length is not UNKNOWN_LENGTH and response.length > self._max_bytes:
            _discard_body(response)
            raise download_failed(url, f"Content-Length {response.length} over {self._max_bytes} bytes")
        temp = self._temp()
        try:
            digest = await self._download(response, temp, abort)
        except BaseException as e:
            await self._pool.run(temp.unlink, True)
            if isinstance(e, BundleError):
                raise download_failed(url, str(e)) from None
            raise
        if (validators_now := _validators_of(response.headers)) is not None:
            _remember(self._validators, url, (digest, validators_now))
        return Fetched(digest, temp)

    async def _get(self, url: str, headers: Headers, abort: Abort) -> Any:
        """The response to GET ``url``, redirects followed (at most MAX_REDIRECTS);
        each hop connects through the client's own address check (hosts.py)."""
        current = url
        for hop in range(MAX_REDIRECTS + 1):
            try:
                response = await abort.wait(self._http.get(
                    current, headers=headers.copy(), unbuffered=True, allow_redirects=False,
                    reactor=self._reactor, timeout=RESPONSE_TIMEOUT,
                ))
            except Exception as e:
                if abort.is_set():
                    raise CancelledError() from None
                refused = _refused_host(e)
                if refused is not None:
                    _log.warn("bundle download from {url} refused: {host} resolves to a private address",
                              url=shown(current), host=unzip.oneline(refused))
                    host = unzip.oneline(refused, 100)
                    what = f"bundle host {host}" if hop == 0 else "bundle URL redirects to a host that"
                    raise BundleError(
                        f"{what} is not allowed (a private address; see --allow-private-bundle-hosts): "
                        f"{shown(url)}"
                    ) from None
                where = f" (redirected to {shown(current)})" if hop else ""
                raise download_failed(url, f"{http_reason(e)}{where}") from None
            if response.code not in REDIRECTS:
                return response
            _discard_body(response)
            location = (response.headers.getRawHeaders(b"location") or [b""])[0]
            try:
                target = urljoin(current, location.decode("ascii"))
                scheme = urlsplit(target).scheme.lower()
            except (UnicodeDecodeError, ValueError):
                target, scheme = "", ""
            if not location or scheme not in ("http", "https"):
                raise download_failed(url, f"HTTP {response.code} to a bad Location {location[:100]!r}")
            current = target
        raise download_failed(url, f"more than {MAX_REDIRECTS} redirects")

    async def _download(self, response: Any, dest: Path, abort: Abort) -> str:
        """Stream the body to ``dest`` through the pool, a batch at a time."""
        try:
            out = await self._pool.run(open, dest, "xb")
        except BaseException:
            _discard_body(response)
            raise
        digest = hashlib.sha256()
        sink = BodySink(self._max_bytes)
        try:
            response.deliverBody(sink)
            with abort.hooked(lambda: sink.stop(CancelledError())):
                while (batch := await sink.next()) is not None:
                    await self._pool.run(_write_batch, out, digest, batch)
                    sink.drained()
        finally:
            sink.stop(CancelledError())  # a no-op once the body is complete
            await self._pool.run(out.close)
        return digest.hexdigest()

    async def _blocking(self, f: Callable[..., T], *args: Any) -> T:
        try:
            return await self._pool.run(f, *args)
        except unzip.UnzipError as e:
            raise BundleError(str(e)) from None
        except unzip.Aborted:
            raise CancelledError() from None

    def _temp(self) -> Path:
        return self._tmp / f"zip-{secrets.token_hex(8)}"


def parse_source(url: str) -> Source:
    """Check a bundle URL: absolute paths, file://, http(s):// and gs:// only."""
    if not url:
        raise BundleError("bundle URL is empty")
    if url.startswith("/"):
        return ("file", url)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise BundleError(f"invalid bundle URL: {shown(url)}") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost"):
            raise BundleError(f"file:// bundle URL names a remote host: {shown(url)}")
        if not path.startswith("/"):
            raise BundleError(f"bundle path is not absolute: {shown(url)}")
        return ("file", path)
    if scheme in ("http", "https", "gs"):
        if not parts.netloc:
            raise BundleError(f"bundle URL has no host: {shown(url)}")
        return (scheme, url)
    if not scheme:
        raise BundleError(f"bundle path is not absolute: {shown(url)}")
    raise BundleError(f"unsupported bundle URL scheme {unzip.oneline(scheme)!r}: {shown(url)}")


def shown(url: str) -> str:
    """``url`` fit for a log line: one line, no credentials or query (signed URLs)."""
    try:
        parts = urlsplit(url)
        if parts.scheme and (parts.query or parts.fragment or "@" in parts.netloc):
            netloc = parts.netloc.rpartition("@")[2]
            url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
            url += "?..." if parts.query else ""
    except ValueError:
        pass
    return unzip.oneline(url)


def download_failed(url: str, detail: str) -> BundleError:
    """The one error of every failed download (connection refused, timeout, any
    HTTP status, a cut body...): a job must not learn from it which ports answer.
    The detail goes to the worker's log, for the operator."""
    _log.warn("bundle download from {url} failed: {detail}", url=shown(url), detail=unzip.oneline(detail))
    return BundleError(f"cannot download bundle {shown(url)}: {DOWNLOAD_FAILED}")


def _refused_host(error: BaseException) -> str | None:
    """The host name when ``error`` is the address check's refusal (possibly
    wrapped in twisted's ``reasons``)."""
    for cause in [error, *(getattr(error, "reasons", None) or [])]:
        value = cause.value if isinstance(cause, Failure) else cause
        if isinstance(value, HostRefused):
            return value.host
    return None


def http_reason(error: BaseException) -> str:
    """One line for a failed HTTP request (twisted wraps causes in ``reasons``)."""
    reasons = getattr(error, "reasons", None)
    if reasons and isinstance(reasons[0], Failure) and reasons[0].value is not None:
        error = reasons[0].value
    if isinstance(error, (CancelledError, ConnectingCancelledError)):
        return "timed out"
    return unzip.oneline(str(error) or type(error).__name__)


class BodySink(Protocol):
    """Takes a response body for a writer that consumes it in batches (``next``):
    pauses the connection while HIGH_WATER bytes wait, stops it past ``limit``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._received = 0
        self._paused = False
        self._end: Failure | None = None
        self._error: Exception | None = None
        self._wakeup: Deferred[None] | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._received += len(data)
        if self._received > self._limit:
            self.stop(BundleError(f"bundle is larger than {self._limit} bytes"))
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self._wake()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._end = reason
        self._wake()

    def stop(self, error: Exception) -> None:
        """Drop the connection unless the body is complete; ``next`` raises ``error``."""
        if self._error is None and self._end is None:
            self._error = error
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
        self._wake()

    async def next(self) -> list[bytes] | None:
        """The chunks received since the last call; None at the end of the body."""
        while True:
            if self._error is not None:
                raise self._error
            if self._chunks:
                batch, self._chunks, self._buffered = self._chunks, [], 0
                return batch
            if self._end is not None:
                if self._end.check(ResponseDone, PotentialDataLoss):
                    return None
                reason = http_reason(self._end.value) if self._end.value else "unknown"
                raise BundleError(f"download interrupted ({reason})")
            self._wakeup = Deferred()
            await self._wakeup

    def drained(self) -> None:
        """The writer caught up: resume a paused connection."""
        if self._paused and self._buffered < HIGH_WATER and self._error is None:
            self._paused = False
            if self._end is None:
                self.transport.resumeProducing()  # type: ignore[union-attr]

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.callback(None)


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def _discard_body(response: Any) -> None:
    """Drop an unwanted response body without reading it."""
    try:
        response.deliverBody(_Discard())
    except Exception:
        pass


def _validators_of(headers: Headers) -> Headers | None:
    """Conditional request headers for the next GET of the same URL."""
    conditional = Headers()
    for name, condition in ((b"etag", b"If-None-Match"), (b"last-modified", b"If-Modified-Since")):
        values = headers.getRawHeaders(name) or []
        if len(values) == 1 and len(values[0]) <= 1024:
            conditional.setRawHeaders(condition, [values[0]])
    return conditional if list(conditional.getAllRawHeaders()) else None


def _remember(memory: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > _REMEMBERED:
        memory.popitem(last=False)


# Blocking helpers: run on the pool.


def _write_batch(out: Any, digest: Any, batch: list[bytes]) -> None:
    for chunk in batch:
        digest.update(chunk)
        out.write(chunk)


def _gcs_filesystem() -> Any:
    try:
        import gcsfs  # the optional ``gcs`` extra
    except ImportError:
        raise BundleError(GCS_EXTRA) from None
    return gcsfs.GCSFileSystem()


def _gcs_info(fs: Any, url: str) -> dict[str, Any]:
    try:
        return dict(fs.info(url))
    except FileNotFoundError:
        raise BundleError(f"bundle not found: {shown(url)}") from None
    except Exception as e:
        raise BundleError(f"cannot fetch bundle {shown(url)}: {unzip.oneline(str(e))}") from None


def _gcs_copy(fs: Any, url: str, dest: Path, max_bytes: int, abort: threading.Event) -> str:
    try:
        with fs.open(url, "rb") as src:
            return unzip.copy_stream(src, dest, max_bytes, abort)
    except (unzip.UnzipError, unzip.Aborted):
        raise
    except FileNotFoundError:
        raise BundleError(f"bundle not found: {shown(url)}") from None
    except Exception as e:
        raise BundleError(f"cannot fetch bundle {shown(url)}: {unzip.oneline(str(e))}") from None
