"""/metrics: Prometheus text from the worker's own registry; counters that move
when jobs run (fakes first, then a real job on the real worker)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq

from fluster_worker.jobs.model import BuildInfo, JobRecord, JobState
from fluster_worker.testing.dashboard import FakeRegistration, FakeWorker, make_record
from fluster_worker.web.app import build_resource, build_site
from fluster_worker.web.listener import WebService
from fluster_worker.web.metrics import WorkerMetrics
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.views import Facts
from tests.jobkit import Harness, entrypoint, make_bundle
from tests.test_dashboard import start_recovered_worker
from tests.test_site_limits import connect, dechunk, get, with_deadline

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of the exposition, keyed by (name, sorted labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Scraper:
    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.stub: Any = StubTreq(build_resource(worker, facts=Facts(worker.reactor.seconds() - 5, 2**30)))

    def _done(self, d: Any) -> Any:
        self.stub.flush()
        out: list[Any] = []
        d.addBoth(out.append)
        assert out
        return out[0]

    def scrape(self, accept: str | None = None) -> tuple[str, Samples]:
        headers = {"Accept": [accept]} if accept else {}
        response = self._done(self.stub.get("http://w/metrics", headers=headers))
        assert response.code == 200
        content_type = response.headers.getRawHeaders("content-type")[0]
        text = self._done(self.stub.content(response)).decode("utf-8")
        return content_type, parse(text) if "openmetrics" not in content_type else {}

    def rpc(self, method: str, body: bytes = b"{}") -> int:
        response = self._done(self.stub.post(
            f"http://w/fluster.cluster.WorkerService/{method}", data=body,
            headers={"Content-Type": ["application/json"]},
        ))
        self._done(self.stub.content(response))
        return int(response.code)


def test_metrics_text_parses_and_counts_jobs_by_state() -> None:
    worker = FakeWorker(registration=FakeRegistration(connected=True))
    scraper = Scraper(worker)
    worker.manager.add(make_record("a", JobState.RUNNING))
    worker.manager.add(make_record("b", JobState.RUNNING))
    worker.manager.add(make_record("c", JobState.FAILED, error="x"))
    worker.logs.add("a", "stdout", "one")
    worker.logs.add("a", "stdout", "two")
    worker.logs.add("c", "stderr", "three")
    content_type, samples = scraper.scrape()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert value(samples, "fluster_worker_jobs", state="running") == 2
    assert value(samples, "fluster_worker_jobs", state="failed") == 1
    assert value(samples, "fluster_worker_jobs", state="pending") == 0
    assert ("fluster_worker_jobs", (("state", "pending"),)) in samples  # zeros are exported too
    assert value(samples, "fluster_worker_log_lines", source="all") == 3
    assert value(samples, "fluster_worker_uptime_seconds") == 0  # the metrics started with the app
    assert value(samples, "fluster_worker_info", worker_id="fake-worker", version="0.1.0") == 1
    assert value(samples, "fluster_worker_controller_connected") == 1
    assert value(samples, "fluster_worker_log_bytes_read_total") == 0
    worker.reactor.advance(7)
    assert value(scraper.scrape()[1], "fluster_worker_uptime_seconds") == 7


def test_openmetrics_on_request() -> None:
    content_type, _ = Scraper(FakeWorker()).scrape(accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")


def test_counters_move_once_per_job_and_attempt() -> None:
    worker = FakeWorker()
    scraper = Scraper(worker)
    m = worker.manager
    record = m.add(make_record("j1", JobState.PENDING))
    m.changed(record)  # repeated events count once
    _, s = scraper.scrape()
    assert value(s, "fluster_worker_jobs_submitted_total") == 1

    record.move(JobState.BUILDING, 1, "building")
    m.changed(record)
    record.build = BuildInfo(started_ms=1000, finished_ms=4500, from_cache=False, image_tag="img:1")
    record.phase("preparing container", 4500)
    m.changed(record)
    m.changed(record)
    record.move(JobState.RUNNING, 5000, "running")
    m.changed(record)
    _, s = scraper.scrape()
    assert value(s, "fluster_worker_image_builds_total") == 1
    assert value(s, "fluster_worker_image_cache_hits_total") == 0
    assert value(s, "fluster_worker_image_build_seconds_count") == 1
    assert value(s, "fluster_worker_image_build_seconds_sum") == 3.5
    assert value(s, "fluster_worker_jobs_finished_total", state="succeeded") == 0

    record.move(JobState.SUCCEEDED, 6000, "succeeded")
    m.changed(record)
    m.changed(record)
    # A second job hits the image cache and fails.
    second = m.add(make_record("j2", JobState.PENDING))
    second.move(JobState.BUILDING, 1, "building")
    second.build = BuildInfo(started_ms=1, finished_ms=2, from_cache=True, image_tag="img:1")
    m.changed(second)
    second.move(JobState.RUNNING, 3, "running")
    second.move(JobState.FAILED, 4, "failed")
    m.changed(second)
    _, s = scraper.scrape()
    assert value(s, "fluster_worker_jobs_submitted_total") == 2
    assert value(s, "fluster_worker_image_builds_total") == 1
    assert value(s, "fluster_worker_image_cache_hits_total") == 1
    assert value(s, "fluster_worker_jobs_finished_total", state="succeeded") == 1
    assert value(s, "fluster_worker_jobs_finished_total", state="failed") == 1
    assert value(s, "fluster_worker_jobs_finished_total", state="killed") == 0

    # The same job id again as a new attempt counts again.
    retry = make_record("j1", JobState.PENDING, attempt_id=1)
    m.add(retry)
    retry.move(JobState.BUILDING, 1, "building")
    retry.move(JobState.FAILED, 2, "failed")
    m.changed(retry)
    _, s = scraper.scrape()
    assert value(s, "fluster_worker_jobs_submitted_total") == 3
    assert value(s, "fluster_worker_jobs_finished_total", state="failed") == 2


def test_recovered_jobs_do_not_count_as_new_builds() -> None:
    worker = FakeWorker()
    scraper = Scraper(worker)
    # What a restarted worker's manager reports: an old job, already built, now WORKER_FAILED.
    old: JobRecord = make_record("old", JobState.RUNNING)
    old.move(JobState.WORKER_FAILED, 10, "worker restarted")
    worker.manager.add(old)
    _, s = scraper.scrape()
    assert value(s, "fluster_worker_image_builds_total") == 0
    assert value(s, "fluster_worker_jobs_submitted_total") == 0
    assert value(s, "fluster_worker_jobs_finished_total", state="worker_failed") == 1


def test_rpc_latency_by_method_and_code() -> None:
    worker = FakeWorker()
    scraper = Scraper(worker)
    assert scraper.rpc("HealthCheck") == 200
    assert scraper.rpc("HealthCheck") == 200
    assert scraper.rpc("GetJobStatus", b'{"jobId": "nope"}') == 404
    assert scraper.rpc("NoSuchMethod") == 501
    assert scraper.rpc("<script>" + "x" * 500) == 501
    _, s = scraper.scrape()
    count = "fluster_worker_rpc_duration_seconds_count"
    assert value(s, count, method="HealthCheck", code="ok") == 2
    assert value(s, count, method="GetJobStatus", code="not_found") == 1
    # Methods from the URL are hostile: anything unknown shares one label value.
    assert value(s, count, method="unknown", code="unimplemented") == 2
    assert value(s, "fluster_worker_rpc_duration_seconds_bucket", method="HealthCheck", code="ok", le="+Inf") == 2
    methods = {dict(labels).get("method") for (name, labels) in s if name == count}
    assert methods == {"HealthCheck", "GetJobStatus", "unknown"}


def test_own_registry_not_the_global_one() -> None:
    worker = FakeWorker()
    metrics = WorkerMetrics(worker.manager, worker.logs, worker.reactor, worker_id="w1")
    metrics.watch(worker.manager)
    again = WorkerMetrics(worker.manager, worker.logs, worker.reactor, worker_id="w2")  # no duplicate error
    assert again.registry is not metrics.registry
    global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "fluster_worker_" not in global_text


# -- a real job on the real worker ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_sites_connection_counters_are_exposed() -> None:
    """The worker's own site (build_site, behind its WebService) on a real
    socket: a connection past the cap is refused, and /metrics says so."""
    from twisted.internet import reactor

    worker: Any = FakeWorker()
    worker.web = WebService(reactor, "tcp:0:interface=127.0.0.1", build_site(worker), max_connections=2)
    port = (await worker.web.startService()).getHost().port
    try:
        held = [await connect(port) for _ in range(2)]
        for client in held:
            client.send(get(b"/", close=False))
            await with_deadline(client.until(b"</html>"))
        extra = await connect(port)
        assert (await with_deadline(extra.closed)).startswith(b"HTTP/1.1 503 ")
        held[1].transport.loseConnection()
        held[0].send(get(b"/metrics", close=True))
        answer = await with_deadline(held[0].closed)
    finally:
        await worker.web.stopService()
    last = answer[answer.rindex(b"HTTP/1.1 ") :]
    assert last.startswith(b"HTTP/1.1 200 "), last[:200]
    samples = parse(dechunk(last).decode())
    assert value(samples, "fluster_worker_connections_refused_total") == 1
    assert ("fluster_worker_connections_evicted_total", ()) in samples
    assert value(samples, "fluster_worker_connections_evicted_total") == 0


def test_the_sites_counters_are_read_at_scrape() -> None:
    class Site:
        refused_connections = 3
        evicted_connections = 2

    worker = FakeWorker()
    metrics = WorkerMetrics(worker.manager, worker.logs, worker.reactor, worker_id="w", site=lambda: Site)
    samples = parse(metrics.exposition(None)[0].decode())
    assert value(samples, "fluster_worker_connections_refused_total") == 3
    assert value(samples, "fluster_worker_connections_evicted_total") == 2
    Site.evicted_connections = 5
    assert value(parse(metrics.exposition(None)[0].decode()), "fluster_worker_connections_evicted_total") == 5
    # Without a site (tests, an app served by another Site): no such series.
    bare = WorkerMetrics(worker.manager, worker.logs, worker.reactor, worker_id="w")
    assert "connections_refused" not in bare.exposition(None)[0].decode()


def say_lines(n: int) -> int:
    for i in range(n):
        print(f"metric line {i}", flush=True)
    return n


@pytest_twisted.async_yield_fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_recovered_worker(tmp_path)
    yield h
    await h.worker.stopService()


async def scrape_url(url: str) -> Samples:
    response = await treq.get(url + "/metrics")
    assert response.code == 200
    return parse(await response.text("utf-8"))


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_counters_move_when_real_jobs_run(harness: Harness, tmp_path: Path) -> None:
    before = await scrape_url(harness.url)
    bundle = make_bundle(tmp_path / "bundle", nonce=uuid.uuid4().hex)
    first = await harness.run(pb.RunJobRequest(
        job_id=f"m1-{uuid.uuid4().hex[:6]}", serialized_entrypoint=entrypoint(say_lines, 25),
        bundle_gcs_path=f"file://{bundle}",
    ))
    assert first.state == pb.JOB_STATE_SUCCEEDED, first.error
    second = await harness.run(pb.RunJobRequest(
        job_id=f"m2-{uuid.uuid4().hex[:6]}", serialized_entrypoint=entrypoint(say_lines, 5),
        bundle_gcs_path=f"file://{bundle}",
    ))
    assert second.state == pb.JOB_STATE_SUCCEEDED, second.error
    assert second.build_metrics.from_cache
    after = await scrape_url(harness.url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("fluster_worker_jobs_submitted_total") == 2
    assert moved("fluster_worker_jobs_finished_total", state="succeeded") == 2
    assert moved("fluster_worker_image_builds_total") + moved("fluster_worker_image_cache_hits_total") == 2
    assert moved("fluster_worker_image_cache_hits_total") >= 1
    assert value(after, "fluster_worker_jobs", state="succeeded") == 2
    assert value(after, "fluster_worker_jobs", state="running") == 0
    assert value(after, "fluster_worker_log_lines", source="all") >= 30
    assert moved("fluster_worker_rpc_duration_seconds_count", method="RunJob", code="ok") == 2
    assert moved("fluster_worker_rpc_duration_seconds_count", method="GetJobStatus", code="ok") >= 2
    # The assembled worker's site counters are read (none refused, none evicted here).
    assert ("fluster_worker_connections_refused_total", ()) in after
    assert ("fluster_worker_connections_evicted_total", ()) in after
