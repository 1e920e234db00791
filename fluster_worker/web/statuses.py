"""Each job's JobStatus, serialized once per change and served as cached bytes.

GetJobStatus is the call that clients poll, and ListJobs answers every job the
worker keeps (1,000 by default): both are served from bytes kept per job and per
codec (binary proto, proto3 JSON) by a KeptBytes (kept.py), made the first time
they are asked for after the job's record changed: the key is ``wire.status_key``
(the fields the status is made of), so no change can be missed, whoever made it
(state moves, usage samples).

A listing is the concatenation of the kept bytes: a ``repeated JobStatus jobs =
1`` field is, on the wire, each status's bytes behind its tag and length, and in
JSON a list of the kept objects. Many statuses to make (a restarted worker's
first ListJobs) are made on the router's CPU pool, off the reactor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred

from fluster_worker.common.threads import BlockingPool
from fluster_worker.jobs.model import JobRecord
from fluster_worker.web import wire
from fluster_worker.web.kept import INLINE_MISSES, KeptBytes
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.rpc import codec
from fluster_worker.web.rpc.connect import Encoded


class StatusCache:
    """JobStatus bytes per job and codec (see the module doc)."""

    def __init__(
        self,
        records: Callable[[], list[JobRecord]],
        address: Callable[[], str],
        inline_misses: int = INLINE_MISSES,
    ) -> None:
        self._records = records
        self._address = address

        def known() -> list[str]:
            return [r.job_id for r in records()]

        self._kept = {media: KeptBytes(known, inline_misses) for media in (codec.PROTO, codec.JSON)}

    def status(self, record: JobRecord) -> Encoded:
        """GetJobStatus (without a result) of ``record``."""
        address = self._address()

        def body(media: str, pool: BlockingPool) -> bytes:
            return self._kept[media].one(record, *_key_and_make(address, media))

        return Encoded(pb.JobStatus, body)

    def listing(self) -> Encoded:
        """ListJobs: every job's status."""
        records = self._records()
        address = self._address()

        def body(media: str, pool: BlockingPool) -> bytes | Deferred[bytes]:
            kept = self._kept[media]
            if len(kept) > len(records) + 64:
                kept.sweep()
            datas = kept.many(records, *_key_and_make(address, media), pool)
            if isinstance(datas, Deferred):
                return datas.addCallback(_joined, media)
            return _joined(datas, media)

        return Encoded(pb.ListJobsResponse, body)


def _key_and_make(
    address: str, media: str
) -> tuple[Callable[[JobRecord], tuple[object, ...]], Callable[[JobRecord], bytes]]:
    def key(record: JobRecord) -> tuple[object, ...]:
        return wire.status_key(record, address)

    def make(record: JobRecord) -> bytes:
        return codec.encode(wire.job_status(record, address), media)

    return key, make


def _joined(datas: Sequence[bytes], media: str) -> bytes:
    if media == codec.PROTO:
        parts: list[bytes] = []
        for data in datas:
            parts.append(b"\x0a")  # field 1, length-delimited
            parts.append(_varint(len(data)))
            parts.append(data)
        return b"".join(parts)
    if not datas:
        return codec.encode(pb.ListJobsResponse(), media)
    return b'{"jobs": [' + b", ".join(datas) + b"]}"


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
