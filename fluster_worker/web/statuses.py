"""Each job's JobStatus, serialized once per change and served as cached bytes.

GetJobStatus is the call that clients poll, and ListJobs answers every job the
worker keeps (1,000 by default): both are served from bytes kept per job and per
codec (binary proto, proto3 JSON), made the first time they are asked for after
the job's record changed. A change is seen by comparing ``wire.status_key`` (the
fields the status is made of) with the key the bytes were made from, so no
change can be missed, whoever made it (state moves, usage samples).

A listing is the concatenation of the kept bytes: a ``repeated JobStatus jobs =
1`` field is, on the wire, each status's bytes behind its tag and length, and in
JSON a list of the kept objects. When many jobs have no bytes yet (a restarted
worker's first ListJobs), they are encoded on the router's CPU pool, off the
reactor. Records are read there without a lock: the key is taken first, on the
reactor, so bytes made from a record that changed meanwhile carry an older key
and are made again at the next call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred

from fluster_worker.common.threads import BlockingPool
from fluster_worker.jobs.model import JobRecord
from fluster_worker.web import wire
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.rpc import codec
from fluster_worker.web.rpc.connect import Encoded

# Jobs without bytes that a listing encodes inline; past this, on the pool.
INLINE_MISSES = 32


class _Entry:
    __slots__ = ("record", "key", "proto", "json")

    def __init__(self, record: JobRecord, key: tuple[object, ...]) -> None:
        self.record = record
        self.key = key
        self.proto: bytes | None = None
        self.json: bytes | None = None


def _encode(record: JobRecord, address: str, media: str) -> bytes:
    return codec.encode(wire.job_status(record, address), media)


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
        self._inline_misses = inline_misses
        self._entries: dict[str, _Entry] = {}
        self._sweep_at = 256

    def status(self, record: JobRecord) -> Encoded:
        """GetJobStatus (without a result) of ``record``."""
        address = self._address()

        def body(media: str, pool: BlockingPool) -> bytes:
            entry = self._entry(record, address)
            data = entry.proto if media == codec.PROTO else entry.json
            if data is None:
                data = _encode(record, address, media)
                self._keep(entry, media, data)
            return data

        return Encoded(pb.JobStatus, body)

    def listing(self) -> Encoded:
        """ListJobs: every job's status."""
        records = self._records()
        address = self._address()

        def body(media: str, pool: BlockingPool) -> bytes | Deferred[bytes]:
            entries = [self._entry(r, address) for r in records]
            if len(self._entries) > len(records) + 64:
                self._sweep({r.job_id for r in records})
            missing = [e for e in entries if (e.proto if media == codec.PROTO else e.json) is None]
            if len(missing) <= self._inline_misses:
                for e in missing:
                    self._keep(e, media, _encode(e.record, address, media))
                return _joined(entries, media)
            encoded = pool.run(_encode_all, [e.record for e in missing], address, media)

            def kept(datas: list[bytes | None]) -> bytes:
                for e, data in zip(missing, datas, strict=True):
                    # None: it failed on the pool (a record changed under it); made here.
                    self._keep(e, media, data if data is not None else _encode(e.record, address, media))
                return _joined(entries, media)

            return encoded.addCallback(kept)

        return Encoded(pb.ListJobsResponse, body)

    def _entry(self, record: JobRecord, address: str) -> _Entry:
        key = wire.status_key(record, address)
        entry = self._entries.get(record.job_id)
        if entry is None or entry.record is not record or entry.key != key:
            entry = _Entry(record, key)
            self._entries[record.job_id] = entry
            if len(self._entries) > self._sweep_at:
                self._sweep({r.job_id for r in self._records()})
        return entry

    def _keep(self, entry: _Entry, media: str, data: bytes) -> None:
        # The entry may have been replaced meanwhile (its record changed): these
        # bytes then only answer this call.
        if media == codec.PROTO:
            entry.proto = data
        else:
            entry.json = data

    def _sweep(self, known: set[str]) -> None:
        """Forget the jobs the worker no longer keeps."""
        self._entries = {k: e for k, e in self._entries.items() if k in known}
        self._sweep_at = 2 * len(self._entries) + 256


def _encode_all(records: Sequence[JobRecord], address: str, media: str) -> list[bytes | None]:
    out: list[bytes | None] = []
    for record in records:
        try:
            out.append(_encode(record, address, media))
        except Exception:
            out.append(None)
    return out


def _joined(entries: Sequence[_Entry], media: str) -> bytes:
    if media == codec.PROTO:
        parts: list[bytes] = []
        for e in entries:
            data = e.proto
            assert data is not None
            parts.append(b"\x0a")  # field 1, length-delimited
            parts.append(_varint(len(data)))
            parts.append(data)
        return b"".join(parts)
    if not entries:
        return codec.encode(pb.ListJobsResponse(), media)
    return b'{"jobs": [' + b", ".join(e.json for e in entries if e.json is not None) + b"]}"


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
