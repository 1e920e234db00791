"""KeptBytes: bytes made from each job's record, kept while the record does not change.

The RPC's job statuses (statuses.py) and the JSON job lists (rows.py) are made
once per change of a job's record and kept as bytes. A change is seen by
comparing a key of the fields the bytes are made of with the key they were made
from (and the record object itself), so no change is missed, notified or not. A
key of None means "not kept": made at every call (bytes that depend on the time).

When many jobs have no bytes yet (the first list after a start), they are made on
the CPU pool, off the reactor. The keys are taken first, on the reactor, so bytes
made from a record that changed meanwhile carry an older key and are made again
at the next call; one that fails on the pool (a record changed under it) is made
again on the reactor.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

from twisted.internet.defer import Deferred

from fluster_worker.common.threads import BlockingPool
from fluster_worker.jobs.model import JobRecord

#: Jobs without bytes that one call makes inline; past this, on the pool.
INLINE_MISSES = 32

Key = Callable[[JobRecord], Hashable | None]
Make = Callable[[JobRecord], bytes]


class KeptBytes:
    """Bytes per job, kept while their key stays (see the module doc)."""

    def __init__(self, known: Callable[[], Iterable[str]], inline_misses: int = INLINE_MISSES) -> None:
        """``known()``: the ids of the jobs the worker still keeps (the others are forgotten)."""
        self._known = known
        self._inline_misses = inline_misses
        self._kept: dict[str, tuple[JobRecord, Hashable, bytes]] = {}
        self._sweep_at = 256

    def __len__(self) -> int:
        return len(self._kept)

    def one(self, record: JobRecord, key: Key, make: Make) -> bytes:
        """The bytes of ``record``, made now unless kept."""
        k = key(record)
        data = self._lookup(record, k)
        if data is None:
            data = make(record)
            self._keep(record, k, data)
        return data

    def many(
        self, records: Sequence[JobRecord], key: Key, make: Make, pool: BlockingPool
    ) -> list[bytes] | Deferred[list[bytes]]:
        """The bytes of each of ``records``, in order; those not kept are made
        inline when few, else on ``pool``."""
        datas: list[bytes | None] = []
        missing: list[tuple[int, JobRecord, Hashable | None]] = []
        for i, record in enumerate(records):
            k = key(record)
            data = self._lookup(record, k)
            datas.append(data)
            if data is None:
                missing.append((i, record, k))

        def fill(made: list[bytes | None]) -> list[bytes]:
            for (i, record, k), data in zip(missing, made, strict=True):
                if data is None:  # failed on the pool (a record changed under it): made here
                    data = make(record)
                datas[i] = data
                self._keep(record, k, data)
            return [d for d in datas if d is not None]

        if len(missing) <= self._inline_misses:
            return fill([make(record) for _, record, _ in missing])
        return pool.run(_make_all, make, [record for _, record, _ in missing]).addCallback(fill)

    def sweep(self) -> None:
        """Forget the jobs the worker no longer keeps."""
        known = set(self._known())
        self._kept = {k: v for k, v in self._kept.items() if k in known}
        self._sweep_at = 2 * len(self._kept) + 256

    def _lookup(self, record: JobRecord, key: Hashable | None) -> bytes | None:
        if key is None:
            return None
        kept = self._kept.get(record.job_id)
        if kept is not None and kept[0] is record and kept[1] == key:
            return kept[2]
        return None

    def _keep(self, record: JobRecord, key: Hashable | None, data: bytes) -> None:
        if key is None:
            return
        self._kept[record.job_id] = (record, key, data)
        if len(self._kept) > self._sweep_at:
            self.sweep()


def _make_all(make: Make, records: Sequence[JobRecord]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for record in records:
        try:
            out.append(make(record))
        except Exception:
            out.append(None)
    return out
