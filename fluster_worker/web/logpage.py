"""A FetchLogs answer as bytes, encoded in slices off the reactor.

A page holds up to 100,000 entries (logs/query.py). Turning it into a
FetchLogsResponse and serializing that in one go holds the reactor (building the
messages, ``ByteSize``) or the GIL (one long C call: ``SerializeToString`` of
10 MB, ``json.dumps`` of 16 MB) long enough to stall every other call. So a
large page is encoded on the router's CPU pool, ``SLICE`` entries at a time, and
the slices are joined: a ``repeated LogEntry logs = 1`` field is, on the wire,
each entry behind its tag and length, so the slices' serializations concatenate
to the whole message's; in proto3 JSON the slices' entries are joined into one
``logs`` list, byte for byte what ``codec.encode`` gives for the whole message.

At most ``PAGES_IN_FLIGHT`` pages are in the worker at once, from their query to
their encoded bytes (``PageGate``): a page is tens of MB as Python objects, and
clients asking for pages faster than the CPU pool encodes them would otherwise
pile them up in memory (40 such calls held 1.4 GB). Further calls wait their
turn. The bytes of an answer its client does not read are bounded by the site
(``rpc.site``: ``max_unsent_bytes``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from google.protobuf import json_format
from twisted.internet.defer import Deferred, DeferredSemaphore

from fluster_worker.common.threads import BlockingPool
from fluster_worker.logs.model import LogLine
from fluster_worker.web import wire
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.rpc import codec
from fluster_worker.web.rpc.connect import Encoded

#: Entries encoded per slice (one short C call each).
SLICE = 1000
#: Pages of at most this many entries are encoded inline, on the reactor.
INLINE_ENTRIES = 200
#: Pages in the worker at once (PageGate).
PAGES_IN_FLIGHT = 4


class PageGate:
    """At most ``limit`` pages between the start of their query and the end of
    their encoding (see the module doc)."""

    def __init__(self, limit: int = PAGES_IN_FLIGHT) -> None:
        self._slots = DeferredSemaphore(limit)

    async def page(self, query: Callable[[], Deferred[list[LogLine]]]) -> Encoded:
        """The encoded answer of ``query()``, run when a slot is free."""
        await self._slots.acquire()
        try:
            lines = await query()
        except BaseException:
            self._slots.release()
            raise
        return log_page(lines, done=self._slots.release)


def log_page(
    lines: list[LogLine], inline_entries: int = INLINE_ENTRIES, done: Callable[[], object] = lambda: None
) -> Encoded:
    """The FetchLogsResponse of ``lines``, encoded when the router asks for a codec;
    ``done()`` once it is. The list is emptied once encoded: freeing 100,000 lines
    takes tens of milliseconds, which the pool thread spends, not the reactor."""

    def body(media: str, pool: BlockingPool) -> bytes | Deferred[bytes]:
        if len(lines) <= inline_entries:
            try:
                return codec.encode(wire.log_entries(lines), media)
            finally:
                done()
        encoded = pool.run(_encode_and_free, lines, media)

        def finished(result: object) -> object:
            done()
            return result

        return encoded.addBoth(finished)

    return Encoded(pb.FetchLogsResponse, body)


def _encode_and_free(lines: list[LogLine], media: str) -> bytes:
    try:
        return encode_page(lines, media)
    finally:
        lines.clear()


def encode_page(lines: Sequence[LogLine], media: str) -> bytes:
    """``codec.encode(wire.log_entries(lines), media)``, a slice at a time."""
    slices = [lines[i : i + SLICE] for i in range(0, len(lines), SLICE)]
    if media == codec.PROTO:
        return b"".join(wire.log_entries(part).SerializeToString() for part in slices)
    if not lines:
        return codec.encode(pb.FetchLogsResponse(), media)
    parts = []
    for part in slices:
        entries = json_format.MessageToDict(wire.log_entries(part))["logs"]
        parts.append(json.dumps(entries)[1:-1])
    return ('{"logs": [' + ", ".join(parts) + "]}").encode("utf-8")
