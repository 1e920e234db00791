"""What a worker does with the jobs and containers a previous process (or an
engine outage) left behind: a plan, made from the records and the containers
labelled with the worker id. Pure: the Reconciler (reconcile.py) carries it out.

- A container of a job whose record is RUNNING (or PENDING/BUILDING: a worker
  that died between starting the container and saying so), same attempt, that
  ran: re-adopted, whether it still runs or exited meanwhile.
- Every other container of ours (no record, a terminal record, another
  attempt, never started): removed, with the normal grace.
- A RUNNING record without a container: the job is lost (WORKER_FAILED).
- PENDING and BUILDING records without a container: started again from their
  entry point, in their original arrival order.

Jobs this process already runs (``active``) and their containers are left alone.

The bundles they mount. A started container has the cached, unpacked bundle
bind-mounted read-only at /app; the record keeps its digest
(``build.bundle_digest``). A new worker process knows nothing of the leases
the previous one held, so `BundlePins` pins those digests in the bundle cache
as soon as the records are loaded, before anything can fetch a bundle and so
evict one. Recovery hands an adopted job its pin (released when the job ends);
every other pin goes once the plan is carried out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.logger import Logger

from fluster_worker.bundles.cache import BundleLease
from fluster_worker.containers.runtime import ContainerInfo
from fluster_worker.jobs.model import JobRecord, JobState

__all__ = ["BundlePins", "RecoveryPlan", "arrival_order", "plan_recovery"]

_log = Logger()


class Pinning(Protocol):
    def pin(self, digest: str) -> BundleLease: ...


class BundlePins:
    """The pins on the cached bundles of the jobs a previous process left, by job id."""

    def __init__(self, cache: Pinning) -> None:
        self._cache = cache
        self._pins: dict[str, BundleLease] = {}

    def hold(self, records: Iterable[JobRecord]) -> None:
        """Pin the bundle of every record that is not terminal and names one."""
        for record in records:
            digest = record.build.bundle_digest
            if record.state.terminal or not digest or record.job_id in self._pins:
                continue
            try:
                self._pins[record.job_id] = self._cache.pin(digest)
            except ValueError:
                _log.warn("job {job_id}: its record names no valid bundle digest", job_id=record.job_id)

    def take(self, job_id: str) -> BundleLease | None:
        """The pin of ``job_id``'s bundle, now the caller's to release."""
        return self._pins.pop(job_id, None)

    def release_all(self) -> None:
        pins, self._pins = self._pins, {}
        for lease in pins.values():
            lease.release()

    def __len__(self) -> int:
        return len(self._pins)


@dataclass
class RecoveryPlan:
    adopt: list[tuple[JobRecord, ContainerInfo]] = field(default_factory=list)
    restart: list[JobRecord] = field(default_factory=list)
    lost: list[JobRecord] = field(default_factory=list)
    remove: list[ContainerInfo] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.adopt or self.restart or self.lost or self.remove)


def arrival_order(record: JobRecord) -> tuple[int, int, str]:
    return (record.arrival, record.submitted_at_ms, record.job_id)


def plan_recovery(
    records: dict[str, JobRecord], containers: list[ContainerInfo], active: set[str]
) -> RecoveryPlan:
    plan = RecoveryPlan()
    adopted: set[str] = set()
    for container in containers:
        if container.job_id in active:
            continue
        record = records.get(container.job_id)
        if (
            record is not None
            and not record.state.terminal
            and record.attempt_id == container.attempt_id
            and container.started
            and container.job_id not in adopted
        ):
            adopted.add(container.job_id)
            plan.adopt.append((record, container))
        else:
            plan.remove.append(container)
    for job_id, record in records.items():
        if job_id in active or job_id in adopted or record.state.terminal:
            continue
        if record.state is JobState.RUNNING:
            plan.lost.append(record)
        else:
            plan.restart.append(record)
    plan.adopt.sort(key=lambda pair: arrival_order(pair[0]))
    plan.restart.sort(key=arrival_order)
    return plan
