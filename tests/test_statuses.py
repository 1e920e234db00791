"""GetJobStatus and ListJobs from cached bytes (web/statuses.py), over a real
socket: the bytes equal a fresh encoding in both codecs, and any change of a
record, notified or not, is served at the next call."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
import treq
from google.protobuf import json_format
from klein import Klein
from twisted.internet import reactor
from twisted.internet.task import Clock

from fluster_worker.common.threads import BlockingPool
from fluster_worker.jobs.model import JobState
from fluster_worker.testing.dashboard import FakeLogs, FakeManager, make_record
from fluster_worker.web import wire
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.rpc.connect import ConnectRouter
from fluster_worker.web.rpc.site import bounded_site
from fluster_worker.web.service import WorkerService

ADDRESS = "10.0.0.7:8080"


class CountingPool(BlockingPool):
    def __init__(self, pool: BlockingPool) -> None:
        self._inner = pool
        self.calls = 0

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._inner.run(f, *args, **kwargs)


@pytest_twisted.async_yield_fixture
async def rig(blocking_pool: BlockingPool) -> AsyncIterator[tuple[str, FakeManager, CountingPool]]:
    manager = FakeManager(Clock())
    service = WorkerService(manager, FakeLogs(), Clock(), lambda: ADDRESS)  # type: ignore[arg-type]
    pool = CountingPool(blocking_pool)
    app = Klein()
    ConnectRouter(pb.DESCRIPTOR.services_by_name["WorkerService"], service, reactor, pool=pool).mount(app)
    port = reactor.listenTCP(0, bounded_site(app.resource()), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}/fluster.cluster.WorkerService/", manager, pool
    await port.stopListening()


async def call(base: str, method: str, request: Any, media: str) -> bytes:
    body = request.SerializeToString() if media == "proto" else json_format.MessageToJson(request).encode()
    response = await treq.post(base + method, data=body, headers={"Content-Type": [f"application/{media}"]})
    content: bytes = await response.content()
    assert response.code == 200, content
    return content


def fresh(message: Any, media: str) -> Any:
    """What the answer must be: the message encoded now (JSON compared as data)."""
    return message.SerializeToString() if media == "proto" else json.loads(json_format.MessageToJson(message))


def got(body: bytes, media: str) -> Any:
    return body if media == "proto" else json.loads(body)


@pytest_twisted.ensureDeferred
async def test_status_follows_every_change(rig: tuple[str, FakeManager, CountingPool]) -> None:
    base, manager, _ = rig
    record = manager.add(make_record("job-a", JobState.RUNNING, ports={"http": 31000}))
    ask = pb.GetJobStatusRequest(job_id="job-a")
    for media in ("proto", "json"):
        expected = fresh(wire.job_status(record, ADDRESS), media)
        assert got(await call(base, "GetJobStatus", ask, media), media) == expected
    first = await call(base, "GetJobStatus", ask, "proto")
    assert await call(base, "GetJobStatus", ask, "proto") == first  # the same bytes again
    # A usage sample changes the record without any notification: still seen.
    record.usage.memory_mb += 7
    for media in ("proto", "json"):
        body = got(await call(base, "GetJobStatus", ask, media), media)
        assert body == fresh(wire.job_status(record, ADDRESS), media)
    assert pb.JobStatus.FromString(await call(base, "GetJobStatus", ask, "proto")).resource_usage.memory_mb == 127
    record.move(JobState.SUCCEEDED, record.started_at_ms + 10, "")
    status = pb.JobStatus.FromString(await call(base, "GetJobStatus", ask, "proto"))
    assert status.state == pb.JOB_STATE_SUCCEEDED
    assert json.loads(await call(base, "GetJobStatus", ask, "json"))["state"] == "JOB_STATE_SUCCEEDED"
    # A new job under the same id (the old one pruned) is never served the old bytes.
    manager.jobs.pop("job-a")
    manager.add(make_record("job-a", JobState.PENDING))
    assert pb.JobStatus.FromString(await call(base, "GetJobStatus", ask, "proto")).state == pb.JOB_STATE_PENDING


@pytest_twisted.ensureDeferred
async def test_listing_equals_a_fresh_encoding_and_large_ones_use_the_pool(
    rig: tuple[str, FakeManager, CountingPool],
) -> None:
    base, manager, pool = rig
    for media in ("proto", "json"):
        assert got(await call(base, "ListJobs", pb.ListJobsRequest(), media), media) == fresh(
            pb.ListJobsResponse(), media
        )
    states = [JobState.PENDING, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED]
    records = [
        manager.add(make_record(f"job-{i}", states[i % 4], error="boom" if i % 4 == 3 else "")) for i in range(300)
    ]
    for media in ("proto", "json"):
        before = pool.calls
        body = await call(base, "ListJobs", pb.ListJobsRequest(), media)
        assert got(body, media) == fresh(wire.job_statuses(records, ADDRESS), media)
        assert pool.calls == before + 1  # 300 statuses to encode: off the reactor
        body = await call(base, "ListJobs", pb.ListJobsRequest(), media)
        assert pool.calls == before + 1  # then served from the kept bytes
    records[5].usage.cpu_percent = 99
    records[6].status_message = "something else"
    for media in ("proto", "json"):
        body = await call(base, "ListJobs", pb.ListJobsRequest(), media)
        assert got(body, media) == fresh(wire.job_statuses(records, ADDRESS), media)
    listed = pb.ListJobsResponse.FromString(await call(base, "ListJobs", pb.ListJobsRequest(), "proto"))
    assert [j.job_id for j in listed.jobs] == [r.job_id for r in records]
    assert listed.jobs[5].resource_usage.cpu_percent == 99
