"""JSON job lists (``/api/jobs``, ``/api/v1/jobs``) joined from rows kept per job.

Like the RPC's statuses (statuses.py), each job's row is encoded once per change
of its record and kept as bytes by a KeptBytes (kept.py); a list is the rows
joined. The key is ``wire.status_key`` plus the submission time and the devices,
so no change is missed, notified or not. A row that depends on the time (a
running job's duration) is not kept. Many rows to make (the first list after a
start) are made on the worker's CPU pool, off the reactor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred

from fluster_worker.common.threads import BlockingPool
from fluster_worker.jobs.model import JobRecord
from fluster_worker.web import wire
from fluster_worker.web.answers import json_text
from fluster_worker.web.kept import INLINE_MISSES, KeptBytes


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
        self._keep = keep
        self._kept = KeptBytes(known, inline_misses)

    def joined(self, records: Sequence[JobRecord], pool: BlockingPool, prefix: bytes = b"[",
               suffix: bytes = b"]") -> bytes | Deferred[bytes]:
        """``prefix``, the rows of ``records`` joined by commas, ``suffix``."""
        rows = self._kept.many(records, self._key, self._make, pool)
        if isinstance(rows, Deferred):
            return rows.addCallback(lambda made: prefix + b",".join(made) + suffix)
        return prefix + b",".join(rows) + suffix

    def _key(self, record: JobRecord) -> tuple[Any, ...] | None:
        if not self._keep(record):
            return None
        return (wire.status_key(record), record.submitted_at_ms, tuple(record.devices))

    def _make(self, record: JobRecord) -> bytes:
        return json_text(self._row(record))
