"""JSON job lists (``/api/jobs``, ``/api/v1/jobs``) joined from rows kept per job.

Like the RPC's statuses (statuses.py), each job's row is encoded once per change
of its record and kept as bytes; a list is the rows joined. A change is seen by
comparing a key of the fields a row is made of (``wire.status_key`` plus the
submission time and the devices), so no change is missed, notified or not. A row
that depends on the time (a running job's duration) is not kept. When many rows
are missing (the first list after a start), they are encoded on the worker's CPU
pool, off the reactor: the key is taken first, so a row made from a record that
changed meanwhile carries an older key and is made again at the next call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from fluster_worker.common.threads import BlockingPool
from fluster_worker.jobs.model import JobRecord
from fluster_worker.web import wire

# Rows to encode that a list encodes inline; past this, on the pool.
INLINE_MISSES = 32


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_bytes(request: Request, body: bytes) -> bytes:
    """A 200 JSON answer of already encoded bytes (as ``views.json_response``)."""
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return body


class RowCache:
    """One JSON row per job, kept while its record does not change."""

    def __init__(
        self,
        row: Callable[[JobRecord], Any],
        known: Callable[[], Iterable[str]],
        keep: Callable[[JobRecord], bool] = lambda record: True,
        inline_misses: int = INLINE_MISSES,
    ) -> None:
        """``row(record)`` is a job's row; ``known()`` the ids the worker still
        keeps (to forget the others); ``keep(record)`` whether its row may be
        kept (False for rows that depend on the time)."""
        self._row = row
        self._known = known
        self._keep = keep
        self._inline_misses = inline_misses
        self._rows: dict[str, tuple[JobRecord, tuple[Any, ...], bytes]] = {}
        self._sweep_at = 256

    def joined(self, records: Sequence[JobRecord], pool: BlockingPool, prefix: bytes = b"[",
               suffix: bytes = b"]") -> bytes | Deferred[bytes]:
        """``prefix``, the rows of ``records`` joined by commas, ``suffix``."""
        rows: list[bytes | None] = []
        missing: list[tuple[int, JobRecord, tuple[Any, ...] | None]] = []
        for i, record in enumerate(records):
            key = self._key(record) if self._keep(record) else None
            kept = self._rows.get(record.job_id) if key is not None else None
            if kept is not None and kept[0] is record and kept[1] == key:
                rows.append(kept[2])
            else:
                rows.append(None)
                missing.append((i, record, key))
        if len(self._rows) > self._sweep_at:
            known = set(self._known())
            self._rows = {k: v for k, v in self._rows.items() if k in known}
            self._sweep_at = 2 * len(self._rows) + 256

        def fill(made: list[bytes | None]) -> bytes:
            for (i, record, key), data in zip(missing, made, strict=True):
                if data is None:  # failed on the pool (a record changed under it): made here
                    data = _dumps(self._row(record))
                rows[i] = data
                if key is not None:
                    self._rows[record.job_id] = (record, key, data)
            return prefix + b",".join(r for r in rows if r is not None) + suffix

        if len(missing) <= self._inline_misses:
            return fill([_dumps(self._row(record)) for _, record, _ in missing])
        return pool.run(_encode_all, self._row, [record for _, record, _ in missing]).addCallback(fill)

    @staticmethod
    def _key(record: JobRecord) -> tuple[Any, ...]:
        return (wire.status_key(record), record.submitted_at_ms, tuple(record.devices))


def _encode_all(row: Callable[[JobRecord], Any], records: Sequence[JobRecord]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for record in records:
        try:
            out.append(_dumps(row(record)))
        except Exception:
            out.append(None)
    return out
