"""``/api/jobs`` and ``/api/v1/jobs`` from rows kept per job (web/rows.py), over a
real socket: equal to the rows made now, changes seen, many rows on the pool."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
import treq
from klein import Klein
from twisted.internet import reactor
from twisted.internet.task import Clock

from fluster_worker.common.threads import BlockingPool
from fluster_worker.jobs.model import JobState
from fluster_worker.testing.dashboard import FakeLogs, FakeManager, make_record
from fluster_worker.web.api import JobsApi
from fluster_worker.web.compat_api import CompatApi, job_row
from fluster_worker.web.job_json import job_summary, now_ms
from fluster_worker.web.views import Facts


class Pool:
    def __init__(self, pool: BlockingPool) -> None:
        self.inner = pool
        self.calls = 0

    def run(self, f: Any, *args: Any) -> Any:
        self.calls += 1
        return self.inner.run(f, *args)


class Worker:
    def __init__(self, pool: Pool) -> None:
        self.manager = FakeManager(Clock())
        self.logs = FakeLogs()
        self.reactor = reactor
        self.cpu_pool = pool


@pytest_twisted.async_yield_fixture
async def site(blocking_pool: BlockingPool) -> AsyncIterator[tuple[str, Worker]]:
    worker = Worker(Pool(blocking_pool))
    app = Klein()
    JobsApi(worker, Facts(started_s=0.0, memory_total_bytes=2**30)).mount(app)  # type: ignore[arg-type]
    CompatApi(worker).mount(app)  # type: ignore[arg-type]
    from twisted.web.server import Site

    port = reactor.listenTCP(0, Site(app.resource()), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}", worker
    await port.stopListening()


async def get(url: str) -> Any:
    response = await treq.get(url)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json; charset=utf-8"]
    return json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_job_lists_from_kept_rows(site: tuple[str, Worker]) -> None:
    base, worker = site
    states = [JobState.SUCCEEDED, JobState.FAILED, JobState.RUNNING, JobState.PENDING]
    records = [
        worker.manager.add(make_record(f"job-{i:03d}", states[i % 4], submitted_ms=1_000_000 + i, ports={"p": i}))
        for i in range(100)
    ]

    def compat() -> list[Any]:
        return [job_row(r) for r in sorted(records, key=lambda r: (r.submitted_at_ms, r.job_id))]

    def v1() -> dict[str, Any]:
        now = now_ms(reactor)
        rows = [job_summary(r, now) for r in sorted(records, key=lambda r: r.submitted_at_ms, reverse=True)]
        for row in rows:  # a running job's duration moves with the clock
            if row["state"] == "RUNNING":
                row["duration_ms"] = None
        return {"jobs": rows}

    def still(body: dict[str, Any]) -> dict[str, Any]:
        for row in body["jobs"]:
            if row["state"] == "RUNNING":
                row["duration_ms"] = None
        return body

    assert await get(base + "/api/jobs") == compat()
    assert worker.cpu_pool.calls == 1  # 100 rows to encode: off the reactor
    assert await get(base + "/api/jobs") == compat()
    assert worker.cpu_pool.calls == 1  # then kept
    assert still(await get(base + "/api/v1/jobs")) == v1()
    assert worker.cpu_pool.calls == 2
    assert still(await get(base + "/api/v1/jobs")) == v1()
    assert worker.cpu_pool.calls == 3  # running and pending rows are not kept: 50 to make again
    # Changes, notified or not, are served at once.
    records[0].usage.memory_mb = 4321
    records[4].error = "changed"
    records[2].move(JobState.SUCCEEDED, records[2].started_at_ms + 5, "")
    assert await get(base + "/api/jobs") == compat()
    assert still(await get(base + "/api/v1/jobs")) == v1()
    assert (await get(base + "/api/jobs"))[0]["memory_mb"] == 4321
