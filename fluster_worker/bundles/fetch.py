"""Getting a bundle's bytes: check the URL, then copy, download or skip.

`Fetcher.fetch` leaves the zip in a temp file (the caller deletes it), or reports
that the source is unchanged since it gave some digest that is still cached:

- file: keyed by (path, size, mtime_ns, dev, inode); read on the BlockingPool, only
  under the bundle roots when some are given (local.py).
- http(s): http_fetch.py (conditional GETs, redirects, one line for any failure).
- gs: keyed by the object's generation; needs the ``gcs`` extra (gcs.py).

The URLs, their errors and what a fetch gives are sources.py; stopping a fetch
nobody waits for is abort.py.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime

from fluster_worker.bundles import unzip
from fluster_worker.bundles.abort import Abort
from fluster_worker.bundles.gcs import gcs_copy, gcs_filesystem, gcs_info
from fluster_worker.bundles.http_fetch import HttpFetcher
from fluster_worker.bundles.memo import remember
from fluster_worker.bundles.sources import BundleError, Fetched, Source, shown
from fluster_worker.common.threads import BlockingPool

__all__ = ["Fetcher"]

T = TypeVar("T")


class Fetcher:
    def __init__(
        self, reactor: IReactorTime, pool: BlockingPool, http_client: Any, tmp: Path,
        max_bytes: int, roots: Sequence[str] = (),
    ) -> None:
        """``roots``: the directories local bundles may lie in (none: anywhere)."""
        self._reactor = reactor
        self._roots = tuple(roots)
        self._pool = pool
        self._tmp = tmp
        self._max_bytes = max_bytes
        self._known: OrderedDict[object, str] = OrderedDict()  # file/gs key -> digest
        self._gcs: Any = None
        self._http = HttpFetcher(reactor, pool, http_client, max_bytes, self._temp)

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
            remember(self._known, key, digest)
            return Fetched(digest, temp)
        if scheme == "gs":
            return await self._fetch_gcs(where, abort, say, cached)
        return await self._http.fetch(where, abort, say, cached)

    async def _fetch_gcs(
        self, url: str, abort: Abort, say: Callable[[str], None], cached: Callable[[str], bool]
    ) -> Fetched:
        if self._gcs is None:
            self._gcs = await self._blocking(gcs_filesystem)
        info = await self._blocking(gcs_info, self._gcs, url)
        key = ("gs", url, str(info.get("generation") or info.get("etag") or ""))
        if key[2] and cached(digest := self._known.get(key, "")):
            return Fetched(digest, None)
        say(f"downloading bundle from {shown(url)}")
        temp = self._temp()
        digest = await self._blocking(gcs_copy, self._gcs, url, temp, self._max_bytes, abort.event)
        if key[2]:
            remember(self._known, key, digest)
        return Fetched(digest, temp)

    async def _blocking(self, f: Callable[..., T], *args: Any) -> T:
        try:
            return await self._pool.run(f, *args)
        except unzip.UnzipError as e:
            raise BundleError(str(e)) from None
        except unzip.Aborted:
            raise CancelledError() from None

    def _temp(self) -> Path:
        return self._tmp / f"zip-{secrets.token_hex(8)}"
