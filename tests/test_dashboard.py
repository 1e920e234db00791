"""The dashboard pages and the JSON API: in memory against fakes (StubTreq), plus
the real worker end to end (a running job on the page, killed from the page)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
import treq
from markupsafe import escape
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from fluster_worker.config import WorkerConfig
from fluster_worker.jobs.model import JobSpec, JobState
from fluster_worker.testing.dashboard import T0_MS, FakeRegistration, FakeWorker, make_record
from fluster_worker.web.app import SECURITY_HEADERS, build_resource
from fluster_worker.web.dashboard import _shielded, controller_url, fmt_duration, same_origin
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.views import Facts
from tests.jobkit import Harness, entrypoint, make_bundle, start_worker, until, worker_config

BASE = "http://worker.test"
HOSTILE = "<script>alert(1)</script> \"double\" 'single' {{7*7}} {% raw %} &amp;"
ESCAPED_SCRIPT = "&lt;script&gt;alert(1)&lt;/script&gt;"


# -- helpers ----------------------------------------------------------------------


class Page:
    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body
        self.text = body.decode("utf-8")

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def _fired(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the request did not finish"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class Client:
    def __init__(self, worker: FakeWorker) -> None:
        self.stub: Any = StubTreq(build_resource(worker, facts=Facts(started_s=worker.reactor.seconds() - 90,
                                                                 memory_total_bytes=8 * 2**30)))

    def request(self, method: str, path: str, **kwargs: Any) -> Page:
        d = self.stub.request(method, BASE + path, **kwargs)
        self.stub.flush()
        response = _fired(d)
        content = self.stub.content(response)
        self.stub.flush()
        return Page(response.code, response.headers, _fired(content))

    def get(self, path: str, **kwargs: Any) -> Page:
        return self.request("GET", path, **kwargs)

    def post_form(self, path: str, fields: dict[str, str], headers: dict[str, str] | None = None) -> Page:
        h = {"Content-Type": ["application/x-www-form-urlencoded"]}
        for k, v in (headers or {}).items():
            h[k] = [v]
        return self.request("POST", path, data=urlencode(fields).encode(), headers=h, allow_redirects=False)


@pytest.fixture
def worker() -> FakeWorker:
    w = FakeWorker(
        config=WorkerConfig(controller="controller.test:10000", advertise_cpu=8, advertise_memory="15g"),
        registration=FakeRegistration(connected=True, last_heartbeat_ms=T0_MS - 3000),
    )
    m = w.manager
    m.add(make_record("job-running", JobState.RUNNING, ports={"http": 30001}, submitted_ms=T0_MS - 30_000))
    m.add(make_record("job-done", JobState.SUCCEEDED, from_cache=True, submitted_ms=T0_MS - 50_000))
    m.add(make_record("job-failed", JobState.FAILED, error="Exit code: 3", exit_code=3, submitted_ms=T0_MS - 40_000))
    m.add(make_record("job-pending", JobState.PENDING, submitted_ms=T0_MS - 1_000))
    for i in range(30):
        w.logs.add("job-running", "stdout" if i % 2 == 0 else "stderr", f"line {i}")
    w.logs.add("job-failed", "stderr", "Traceback: boom")
    w.logs.add("job-failed", "error", "Exit code: 3")
    return w


@pytest.fixture
def client(worker: FakeWorker) -> Client:
    return Client(worker)


def token_of(page: Page) -> str:
    match = re.search(r'name="token" value="([0-9a-f]+)"', page.text)
    assert match, "no kill form token on the page"
    return match.group(1)


# -- pages ------------------------------------------------------------------------


def test_index_shows_identity_health_controller_resources_and_every_job(client: Client) -> None:
    page = client.get("/")
    assert page.code == 200
    assert page.header("content-type") == "text/html; charset=utf-8"
    text = page.text
    for expected in ("fake-worker", "10.1.2.3:8080", "0.1.0", "healthy", "1m 30s",  # identity, uptime
                     "controller.test:10000", 'href="http://controller.test:10000/"', "3.0 s ago",
                     "8 cores", "8.0 GiB", "15g"):
        assert expected in text, expected
    for job_id in ("job-running", "job-done", "job-failed", "job-pending"):
        assert f'href="/job/{job_id}"' in text
    assert "Exit code: 3" in text
    assert "http</span> 30001" in text  # ports
    assert "37%" in text and "120 MiB" in text  # usage of the running job
    # Counts by state, each a filter link.
    assert re.search(r'href="/\?state=running"[^>]*>running <b>1</b>', text)
    assert re.search(r'href="/\?state=succeeded"[^>]*>succeeded <b>1</b>', text)
    # Newest first.
    assert text.index("job-pending") < text.index("job-running") < text.index("job-failed") < text.index("job-done")


def test_index_filters_by_state(client: Client) -> None:
    page = client.get("/?state=failed")
    assert page.code == 200
    assert 'href="/job/job-failed"' in page.text
    assert 'href="/job/job-running"' not in page.text
    assert client.get("/?state=bogus").code == 400


def test_index_without_controller_or_jobs() -> None:
    page = Client(FakeWorker()).get("/")
    assert page.code == 200
    assert "standalone worker" in page.text
    assert "No jobs yet." in page.text


def test_running_job_page(client: Client) -> None:
    page = client.get("/job/job-running")
    assert page.code == 200
    text = page.text
    assert '<h1 class="mono">job-running</h1>' in text
    assert 'id="job-state">running</span>' in text
    # The timeline: every phase with its duration, the last one ongoing.
    for phase in ("pending", "building", "downloading bundle", "building image", "preparing container"):
        assert f"<td>{phase}</td>" in text, phase
    assert "4.0 s" in text  # the image build
    assert "so far" in text
    # Build, ports, usage.
    assert "fluster-job:abc123" in text and ">built<" in text
    assert "http</span> 30001" in text
    assert 'value="37"' in text and "120 MiB of 512" in text
    # The log, server-rendered (last lines of all sources), followed live by the JS.
    assert "line 29" in text and "line 0" in text
    assert 'data-follow="yes"' in text
    assert 'data-after-seq="29"' in text
    # The kill form: a POST with a token, confirmed by the next step (or confirm()).
    assert 'action="/job/job-running/kill"' in text and 'method="post"' in text
    assert 'name="confirmed" value="no"' in text
    token_of(page)


def test_log_tabs_and_tail(client: Client) -> None:
    page = client.get("/job/job-running?source=stderr&tail=3")
    assert page.code == 200
    lines = re.findall(r'<span class="text">(line \d+)</span>', page.text)
    assert lines == ["line 25", "line 27", "line 29"]
    assert 'class="tab active">stderr<' in page.text
    assert 'data-source="stderr"' in page.text
    assert client.get("/job/job-running?source=nope").code == 400
    assert client.get("/job/job-running?tail=0").code == 400
    assert client.get("/job/job-running?tail=x").code == 400


def test_finished_and_failed_job_pages(client: Client) -> None:
    done = client.get("/job/job-done")
    assert done.code == 200
    assert 'id="job-state">succeeded</span>' in done.text
    assert ">hit<" in done.text  # image from the cache
    assert "/kill" not in done.text  # nothing to kill
    assert 'data-follow="no"' in done.text
    assert "No log lines." in done.text

    failed = client.get("/job/job-failed")
    assert failed.code == 200
    assert 'class="alert"' in failed.text and "Exit code: 3" in failed.text
    assert "Traceback: boom" in failed.text
    assert '<span class="src">error</span>' in failed.text


def test_pending_job_page(client: Client) -> None:
    page = client.get("/job/job-pending")
    assert page.code == 200
    assert 'id="job-state">pending</span>' in page.text
    assert "/kill" in page.text


def test_hostile_strings_are_escaped_everywhere(worker: FakeWorker, client: Client) -> None:
    record = make_record(
        "job-hostile", JobState.FAILED, error=HOSTILE, exit_code=1,
        spec=JobSpec(bundle_url=HOSTILE, memory=HOSTILE, env_vars={HOSTILE: "secret-value"}, port_names=["p"]),
        ports={HOSTILE: 30005},
    )
    record.phases.insert(1, (HOSTILE, record.phases[0][1]))
    record.status_message = HOSTILE
    record.build.image_tag = HOSTILE
    worker.manager.add(record)
    worker.logs.add("job-hostile", "stdout", HOSTILE)
    worker.logs.add("job-hostile", "stderr", "</div></pre><img src=x onerror=alert(2)>")
    for path in ("/", "/job/job-hostile", "/job/job-hostile?source=stderr", "/?state=failed"):
        page = client.get(path)
        assert page.code == 200, path
        assert "<script>alert" not in page.text, path
        assert "<img src=x" not in page.text, path
        assert ESCAPED_SCRIPT in page.text, path
        assert "{{7*7}}" in page.text, path  # data, not a template
    job_page = client.get("/job/job-hostile")
    assert str(escape(HOSTILE)) in job_page.text
    assert "&#34;double&#34;" in job_page.text and "&#39;single&#39;" in job_page.text
    assert "secret-value" not in job_page.text  # env values are never shown
    # Hostile ids in URLs never reach a lookup and come back escaped.
    page = client.get("/job/%3Cscript%3Ealert(1)%22'")
    assert page.code == 404
    assert "<script>alert" not in page.text and "&lt;script&gt;alert(1)&#34;" in page.text
    api = client.get("/api/v1/jobs/job-hostile")
    assert api.json()["error"] == HOSTILE
    assert "secret-value" not in api.text


def test_not_found(client: Client) -> None:
    for path in ("/job/no-such-job", "/job/..", "/job/-rf", "/job/" + "a" * 300):
        page = client.get(path)
        assert page.code == 404, path
        assert page.header("content-type") == "text/html; charset=utf-8"
        assert "Job not found" in page.text
    page = client.get("/no/such/page")
    assert page.code == 404 and "Not found" in page.text
    assert client.get("/static/missing.js").code == 404
    api = client.get("/api/v1/jobs/no-such-job")
    assert api.code == 404 and api.json() == {"error": "job no-such-job not found"}
    assert client.get("/api/v1/jobs/no-such-job/logs").code == 404
    assert client.get("/api/v1/jobs/a/b/c").json() == {"error": "job a/b/c not found"}
    assert client.get("/api/v1/jobs/a/%2E%2E/c").json() == {"error": "invalid job id 'a/../c'"}
    assert client.get("/api/v1/nope").json() == {"error": "no such API route"}


def test_routing_keeps_rpc_and_pages_apart(client: Client) -> None:
    # GET on the RPC path: 405 (the error handler must not turn it into 404/500).
    assert client.get("/fluster.cluster.WorkerService/HealthCheck").code == 405
    # GET on the kill path: 405 too.
    assert client.get("/job/job-running/kill").code == 405
    # The RPC still answers.
    rpc = client.request(
        "POST", "/fluster.cluster.WorkerService/HealthCheck", data=b"{}",
        headers={"Content-Type": ["application/json"]},
    )
    assert rpc.code == 200 and rpc.json()["healthy"] is True
    # Another service: Connect's unimplemented.
    other = client.request("POST", "/job/job-running", data=b"{}", headers={"Content-Type": ["application/json"]})
    assert other.code == 501


def test_security_headers_and_no_outside_assets(client: Client) -> None:
    for path in ("/", "/job/job-running", "/api/v1/stats", "/static/dashboard.css", "/metrics", "/nope"):
        page = client.get(path)
        assert page.header("content-security-policy", ) is not None, path
        assert (page.header("content-security-policy") or "").startswith("default-src 'self'"), path
        assert page.header("x-content-type-options") == "nosniff", path
        for name, value in SECURITY_HEADERS.items():
            assert page.header(name.decode()) == value.decode(), (path, name)
    for path in ("/", "/job/job-running", "/job/job-failed"):
        text = client.get(path).text
        assert not re.search(r"<script(?![^>]*\ssrc=\"/static/)", text), "inline or outside script"
        assert " style=" not in text and "<style" not in text, "inline style (blocked by the CSP)"
        assert " on" not in re.sub(r"<[^>]*>", lambda m: "" if not re.search(r"\son\w+=", m.group()) else " on",
                                   text), "inline event handler"
        for url in re.findall(r'(?:src|href)="([^"]+)"', text):
            assert url.startswith(("/", "#", "?")) or url == "http://controller.test:10000/", url


def test_static_assets(client: Client) -> None:
    css = client.get("/static/dashboard.css")
    assert css.code == 200 and css.header("content-type") == "text/css; charset=utf-8"
    js = client.get("/static/dashboard.js")
    assert js.code == 200 and js.header("content-type") == "text/javascript; charset=utf-8"
    assert ".innerHTML" not in js.text and "eval(" not in js.text
    assert "after_seq" in js.text and "confirm(" in js.text
    assert client.get("/static/..%2Fdashboard.py").code == 404


# -- kill -------------------------------------------------------------------------


def test_kill_asks_for_confirmation_then_kills(worker: FakeWorker, client: Client) -> None:
    token = token_of(client.get("/job/job-running"))
    confirm = client.post_form("/job/job-running/kill", {"token": token, "confirmed": "no"})
    assert confirm.code == 200
    assert "Kill job" in confirm.text and 'name="confirmed" value="yes"' in confirm.text
    assert worker.manager.kills == []
    assert worker.manager.jobs["job-running"].state is JobState.RUNNING

    done = client.post_form(
        "/job/job-running/kill", {"token": token_of(confirm), "confirmed": "yes"},
        headers={"Origin": "http://worker.test"},
    )
    assert done.code == 303
    assert done.header("location") == "/job/job-running"
    assert worker.manager.kills == [("job-running", 5000)]
    assert worker.manager.jobs["job-running"].state is JobState.KILLED
    # Killing again: already finished.
    again = client.post_form("/job/job-running/kill", {"token": token, "confirmed": "yes"})
    assert again.code == 409 and "already finished" in again.text


def test_kill_refuses_forged_requests(worker: FakeWorker, client: Client) -> None:
    token = token_of(client.get("/job/job-running"))
    no_token = client.post_form("/job/job-running/kill", {"confirmed": "yes"})
    assert no_token.code == 403
    wrong_job_token = client.post_form(
        "/job/job-running/kill", {"token": token_of(client.get("/job/job-pending")), "confirmed": "yes"}
    )
    assert wrong_job_token.code == 403
    cross_site = client.post_form(
        "/job/job-running/kill", {"token": token, "confirmed": "yes"}, headers={"Origin": "http://evil.test"}
    )
    assert cross_site.code == 403 and "cross-site" in cross_site.text
    cross_referer = client.post_form(
        "/job/job-running/kill", {"token": token, "confirmed": "yes"},
        headers={"Referer": "http://evil.test/job/job-running"},
    )
    assert cross_referer.code == 403
    odd_token = client.post_form("/job/job-running/kill", {"token": "\u00e9\u00e8" * 16, "confirmed": "yes"})
    assert odd_token.code == 403
    assert worker.manager.kills == []
    unknown = client.post_form("/job/nope/kill", {"token": token, "confirmed": "yes"})
    assert unknown.code == 404


def test_a_new_process_rejects_old_tokens(worker: FakeWorker, client: Client) -> None:
    token = token_of(client.get("/job/job-running"))
    other = Client(worker)  # a restarted worker has a new secret
    assert other.post_form("/job/job-running/kill", {"token": token, "confirmed": "yes"}).code == 403


def test_shielded_kill_survives_a_disconnect() -> None:
    inner: Deferred[None] = Deferred()
    outer = _shielded(inner)
    outer.addErrback(lambda f: f.trap(CancelledError))
    outer.cancel()
    assert not inner.called  # the kill goes on
    inner.callback(None)
    assert outer.called


def test_same_origin() -> None:
    class R:
        def __init__(self, **headers: str) -> None:
            self.h = {k.encode(): v.encode() for k, v in headers.items()}

        def getHeader(self, name: bytes) -> bytes | None:
            return self.h.get(name)

    assert same_origin(R(host="w:8080"))  # type: ignore[arg-type]
    assert same_origin(R(host="w:8080", origin="http://w:8080"))  # type: ignore[arg-type]
    assert same_origin(R(host="w:8080", referer="http://w:8080/job/x"))  # type: ignore[arg-type]
    assert not same_origin(R(host="w:8080", origin="http://w:8081"))  # type: ignore[arg-type]
    assert not same_origin(R(host="w:8080", origin="null"))  # type: ignore[arg-type]
    assert not same_origin(R(host="w:8080", origin="javascript://w:8080"))  # type: ignore[arg-type]


def test_formatting() -> None:
    assert fmt_duration(850) == "850 ms"
    assert fmt_duration(12_345) == "12.3 s"
    assert fmt_duration(245_000) == "4m 05s"
    assert fmt_duration(2 * 3600_000 + 180_000) == "2h 03m"
    assert fmt_duration(3 * 86400_000 + 4 * 3600_000) == "3d 04h"
    assert controller_url("c:1") == "http://c:1/"
    assert controller_url("https://c:1/x?y") == "https://c:1/"
    assert controller_url(None) == ""


# -- the JSON API -----------------------------------------------------------------


def test_api_stats(client: Client) -> None:
    page = client.get("/api/v1/stats")
    assert page.code == 200 and page.header("content-type") == "application/json; charset=utf-8"
    stats = page.json()
    assert stats == {
        "worker_id": "fake-worker",
        "version": "0.1.0",
        "address": "10.1.2.3:8080",
        "healthy": True,
        "conditions": [],
        "disk_free_bytes": None,
        "uptime_ms": 90_000,
        "controller": {
            "address": "controller.test:10000", "registered": True, "last_heartbeat_ms": T0_MS - 3000,
            "heartbeats_paused": None,
        },
        "resources": {"cpu_count": 8, "memory": "15g", "memory_total_bytes": 8 * 2**30, "max_concurrent_jobs": 4},
        "jobs": {
            "total": 4,
            "running": 1,
            "by_state": {"PENDING": 1, "BUILDING": 0, "RUNNING": 1, "SUCCEEDED": 1, "FAILED": 1, "KILLED": 0,
                         "WORKER_FAILED": 0, "UNSCHEDULABLE": 0},
        },
    }


def test_api_jobs(client: Client) -> None:
    jobs = client.get("/api/v1/jobs").json()["jobs"]
    assert [j["job_id"] for j in jobs] == ["job-pending", "job-running", "job-failed", "job-done"]
    running = jobs[1]
    assert set(running) == {
        "job_id", "attempt_id", "state", "terminal", "status_message", "exit_code", "error", "submitted_at_ms",
        "started_at_ms", "finished_at_ms", "duration_ms", "ports", "devices", "usage",
    }
    assert running["state"] == "RUNNING" and running["terminal"] is False
    assert running["ports"] == {"http": 30001}
    assert running["usage"]["cpu_percent"] == 37 and running["usage"]["memory_mb"] == 120
    assert running["duration_ms"] == T0_MS - running["started_at_ms"]  # until now
    assert [j["job_id"] for j in client.get("/api/v1/jobs?state=failed").json()["jobs"]] == ["job-failed"]
    assert len(client.get("/api/v1/jobs?limit=2").json()["jobs"]) == 2
    assert client.get("/api/v1/jobs?state=nope").code == 400
    assert client.get("/api/v1/jobs?limit=0").code == 400


def test_api_job(client: Client) -> None:
    job = client.get("/api/v1/jobs/job-failed").json()
    assert job["state"] == "FAILED" and job["exit_code"] == 3 and job["error"] == "Exit code: 3"
    assert job["build"] == {
        "started_ms": job["build"]["started_ms"], "finished_ms": job["build"]["started_ms"] + 4000,
        "duration_ms": 4000, "from_cache": False, "image_tag": "fluster-job:abc123",
    }
    names = [p["name"] for p in job["phases"]]
    assert names == ["pending", "building", "downloading bundle", "building image", "preparing container",
                     "running", "failed"]
    assert [p["duration_ms"] for p in job["phases"]] == [100, 50, 400, 4000, 300, 5000, 0]
    assert job["phases"][-1]["offset_ms"] == 9850
    assert not any(p["ongoing"] for p in job["phases"])
    assert job["log_lines"] == 2
    assert job["spec"]["memory"] == "512m" and job["spec"]["env_var_names"] == []
    running = client.get("/api/v1/jobs/job-running").json()
    assert running["phases"][-1]["ongoing"] is True


def test_api_logs(client: Client) -> None:
    tail = client.get("/api/v1/jobs/job-running/logs?tail=4").json()
    assert tail["state"] == "RUNNING" and tail["terminal"] is False
    assert [x["data"] for x in tail["lines"]] == ["line 26", "line 27", "line 28", "line 29"]
    assert set(tail["lines"][0]) == {"seq", "timestamp_ms", "source", "data"}
    assert tail["last_seq"] == 29
    stderr = client.get("/api/v1/jobs/job-running/logs?tail=2&source=stderr").json()["lines"]
    assert [(x["source"], x["data"]) for x in stderr] == [("stderr", "line 27"), ("stderr", "line 29")]
    # The live follow: pages forward from a seq.
    after = client.get("/api/v1/jobs/job-running/logs?after_seq=25&tail=2").json()
    assert [x["seq"] for x in after["lines"]] == [26, 27] and after["last_seq"] == 27
    from_start = client.get("/api/v1/jobs/job-running/logs?after_seq=-1&tail=2").json()
    assert [x["seq"] for x in from_start["lines"]] == [0, 1]
    nothing_new = client.get("/api/v1/jobs/job-running/logs?after_seq=29").json()
    assert nothing_new["lines"] == [] and nothing_new["last_seq"] == 29
    both = client.get("/api/v1/jobs/job-running/logs?source=stdout,stderr&tail=1").json()["lines"]
    assert [x["data"] for x in both] == ["line 29"]
    regex = client.get("/api/v1/jobs/job-running/logs?regex=line%202%5B05%5D").json()["lines"]
    assert [x["data"] for x in regex] == ["line 20", "line 25"]
    for bad in ("source=nope", "tail=0", f"tail={10**6}", "after_seq=x", "regex=(", "after_seq=-2"):
        page = client.get("/api/v1/jobs/job-running/logs?" + bad)
        assert page.code == 400, bad
        assert page.json()["error"], bad


def test_api_logs_see_new_lines(worker: FakeWorker, client: Client) -> None:
    first = client.get("/api/v1/jobs/job-running/logs?tail=1").json()
    worker.logs.add("job-running", "stdout", "fresh line")
    later = client.get(f"/api/v1/jobs/job-running/logs?after_seq={first['last_seq']}").json()
    assert [x["data"] for x in later["lines"]] == ["fresh line"]


# -- end to end on the real worker --------------------------------------------------


def print_forever(period: float) -> None:
    i = 0
    while True:
        print(f"tick {i}", flush=True)
        i += 1
        time.sleep(period)


async def start_recovered_worker(tmp_path: Path) -> Harness:
    """start_worker: its site opens only once the JobManager has recovered its state dir."""
    return await start_worker(worker_config(tmp_path))


@pytest_twisted.async_yield_fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_recovered_worker(tmp_path)
    yield h
    await h.worker.stopService()


async def _get(url: str, **kwargs: Any) -> tuple[int, str, Any]:
    response = await treq.get(url, **kwargs)
    body = await response.text("utf-8")
    return response.code, body, response.headers


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_dashboard_shows_and_kills_a_real_running_job(harness: Harness, tmp_path: Path) -> None:
    job_id = f"dash-{uuid.uuid4().hex[:8]}"
    request = pb.RunJobRequest(
        job_id=job_id,
        serialized_entrypoint=entrypoint(print_forever, 0.2),
        bundle_gcs_path=f"file://{make_bundle(tmp_path / 'bundle')}",
    )
    await harness.client.run_job(request)
    await harness.wait_state(job_id, {pb.JOB_STATE_RUNNING})

    async def ticking() -> bool:
        code, body, _ = await _get(f"{harness.url}/api/v1/jobs/{job_id}/logs?tail=5&source=stdout")
        return code == 200 and any(x["data"].startswith("tick ") for x in json.loads(body)["lines"])

    await until(ticking, 60, "the job's first lines")

    code, index, _ = await _get(harness.url + "/")
    assert code == 200 and f'href="/job/{job_id}"' in index and "running" in index
    code, page, headers = await _get(f"{harness.url}/job/{job_id}")
    assert code == 200
    assert 'id="job-state">running</span>' in page and "tick " in page
    assert headers.getRawHeaders("content-security-policy")[0].startswith("default-src 'self'")
    match = re.search(r'name="token" value="([0-9a-f]+)"', page)
    assert match
    stats = json.loads((await _get(harness.url + "/api/v1/stats"))[1])
    assert stats["jobs"]["running"] == 1 and stats["worker_id"] == harness.worker.worker_id

    # The confirmed kill, as the browser posts it (same origin).
    origin: dict[bytes | str, bytes | str] = {"Origin": harness.url}
    response = await treq.post(
        f"{harness.url}/job/{job_id}/kill",
        data={"token": match.group(1), "confirmed": "yes"},
        headers=origin,
        allow_redirects=False,
    )
    await response.content()
    assert response.code == 303
    assert response.headers.getRawHeaders("location") == [f"/job/{job_id}"]
    status = await harness.wait_state(job_id, timeout=30)
    assert status.state == pb.JOB_STATE_KILLED
    code, page, _ = await _get(f"{harness.url}/job/{job_id}")
    assert code == 200 and 'id="job-state">killed</span>' in page and "/kill" not in page


def test_internal_errors_are_a_plain_500(worker: FakeWorker, client: Client) -> None:
    def broken(job_id: str, q: Any) -> Deferred[Any]:
        raise RuntimeError("disk on fire <b>")

    worker.logs.query = broken  # type: ignore[method-assign]
    page = client.get("/job/job-running")
    assert page.code == 500
    assert "internal error: RuntimeError" in page.text
    assert "disk on fire" not in page.text and "Traceback" not in page.text
    assert page.header("x-content-type-options") == "nosniff"
