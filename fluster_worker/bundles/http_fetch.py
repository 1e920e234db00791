"""http(s) bundles: a conditional GET with the ETag/Last-Modified of the last
200; the body is streamed to disk through the pool, the socket paused while the
disk lags behind (http_body.py). Redirects are followed here (at most
MAX_REDIRECTS), each a new request through the client, whose connections check
the address they reach (hosts.py). Every failed download is the same one line
to the job (``download_failed``), whatever the cause: a job must not map the
ports of the worker's network by its errors."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from fluster_worker.bundles import unzip
from fluster_worker.bundles.abort import Abort
from fluster_worker.bundles.hosts import HostRefused
from fluster_worker.bundles.http_body import BodySink, discard_body, http_reason
from fluster_worker.bundles.memo import remember
from fluster_worker.bundles.sources import BundleError, Fetched, shown
from fluster_worker.common.threads import BlockingPool

__all__ = ["DOWNLOAD_FAILED", "MAX_REDIRECTS", "HttpFetcher", "download_failed"]

RESPONSE_TIMEOUT = 60.0  # seconds to get the response headers of a download
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
#: What a job is told of any failed download; the worker's log has the cause.
DOWNLOAD_FAILED = "download failed (the worker's log has the cause)"
_log = Logger()


class HttpFetcher:
    """Downloads of one Fetcher (fetch.py), which hands ``temp`` (a new temp
    file path) and gets ``Fetched`` results back."""

    def __init__(
        self, reactor: IReactorTime, pool: BlockingPool, http_client: Any, max_bytes: int,
        temp: Callable[[], Path],
    ) -> None:
        self._reactor = reactor
        self._pool = pool
        self._http = http_client
        self._max_bytes = max_bytes
        self._temp = temp
        self._memory: OrderedDict[str, tuple[str, Headers]] = OrderedDict()  # url -> (digest, validators)

    async def fetch(
        self, url: str, abort: Abort, say: Callable[[str], None], cached: Callable[[str], bool]
    ) -> Fetched:
        known, validators = self._memory.get(url, ("", Headers()))
        conditional = cached(known)
        say(f"downloading bundle from {shown(url)}")
        response = await self._get(url, validators if conditional else Headers(), abort)
        code = response.code
        if code == 304 and conditional:
            discard_body(response)
            say(f"bundle not modified since sha256 {known[:12]}")
            return Fetched(known, None)
        if code != 200:
            discard_body(response)
            raise download_failed(url, f"HTTP {code}")
        if response.length is not UNKNOWN_LENGTH and response.length > self._max_bytes:
            discard_body(response)
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
            remember(self._memory, url, (digest, validators_now))
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
            discard_body(response)
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
            discard_body(response)
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


def _validators_of(headers: Headers) -> Headers | None:
    """Conditional request headers for the next GET of the same URL."""
    conditional = Headers()
    for name, condition in ((b"etag", b"If-None-Match"), (b"last-modified", b"If-Modified-Since")):
        values = headers.getRawHeaders(name) or []
        if len(values) == 1 and len(values[0]) <= 1024:
            conditional.setRawHeaders(condition, [values[0]])
    return conditional if list(conditional.getAllRawHeaders()) else None


def _write_batch(out: Any, digest: Any, batch: list[bytes]) -> None:
    for chunk in batch:
        digest.update(chunk)
        out.write(chunk)
