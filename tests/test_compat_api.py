"""The existing worker's JSON API (wire contract section 7) at its paths and in its
shapes, field names and types checked, lists staying lists, and 404s; also for
hierarchical job ids (``parent/child``), written with "/" or "%2F"."""

from __future__ import annotations

from typing import Any

import pytest

from fluster_worker.jobs.model import JobState
from fluster_worker.testing.dashboard import T0_MS, FakeWorker, make_record
from tests.test_dashboard import Client

JOB_ROW = {
    "job_id": str, "attempt_id": int, "status": str, "started_at": int, "finished_at": int, "exit_code": int,
    "error": str, "memory_mb": int, "memory_peak_mb": int, "cpu_percent": int, "process_count": int,
    "disk_mb": int, "build_from_cache": bool, "image_tag": str,
}
JOB_OBJECT = {
    "job_id": str, "attempt_id": int, "status": str, "started_at": int, "finished_at": int, "exit_code": int,
    "error": str, "ports": dict, "resources": dict, "build": dict,
}
RESOURCES = {"memory_mb": int, "memory_peak_mb": int, "cpu_percent": int, "disk_mb": int, "process_count": int}
BUILD = {"started_ms": int, "finished_ms": int, "duration_ms": int, "from_cache": bool, "image_tag": str}
LOG_ENTRY = {"timestamp": int, "source": str, "data": str}


def assert_shape(obj: Any, shape: dict[str, type]) -> None:
    assert isinstance(obj, dict)
    for name, kind in shape.items():
        assert name in obj, f"missing {name}"
        assert type(obj[name]) is kind, f"{name}: {type(obj[name]).__name__} is not {kind.__name__}"


@pytest.fixture
def worker() -> FakeWorker:
    w = FakeWorker()
    m = w.manager
    m.add(make_record("exp", JobState.RUNNING, ports={"actor": 30001}, submitted_ms=T0_MS - 9000, attempt_id=2))
    m.add(make_record("exp/worker-0", JobState.SUCCEEDED, from_cache=True, submitted_ms=T0_MS - 8000))
    m.add(make_record("exp/logs", JobState.FAILED, error="Exit code: 1: ValueError: boom", exit_code=1,
                      submitted_ms=T0_MS - 7000))
    m.add(make_record("waiting", JobState.PENDING, submitted_ms=T0_MS - 6000))
    m.add(make_record("building", JobState.BUILDING, submitted_ms=T0_MS - 5000))
    m.add(make_record("gone", JobState.KILLED, submitted_ms=T0_MS - 4000))
    m.add(make_record("restarted", JobState.WORKER_FAILED, submitted_ms=T0_MS - 3000))
    for i in range(6):
        w.logs.add("exp", ("stdout", "stderr", "build")[i % 3], f"line {i}")
    w.logs.add("exp/worker-0", "stdout", "child says hi")
    w.logs.add("exp/logs", "stderr", "ValueError: boom")
    return w


@pytest.fixture
def client(worker: FakeWorker) -> Client:
    return Client(worker)


def test_stats_are_the_four_counts(client: Client) -> None:
    page = client.get("/api/stats")
    assert page.code == 200 and page.header("content-type") == "application/json; charset=utf-8"
    # completed = SUCCEEDED + FAILED + KILLED (WORKER_FAILED is not among them)
    assert page.json() == {"running": 1, "pending": 1, "building": 1, "completed": 3}


def test_jobs_is_a_list_of_flat_rows(client: Client) -> None:
    jobs = client.get("/api/jobs").json()
    assert isinstance(jobs, list) and len(jobs) == 7
    for row in jobs:
        assert_shape(row, JOB_ROW)
    by_id = {row["job_id"]: row for row in jobs}
    assert {row["status"] for row in jobs} == {
        "running", "succeeded", "failed", "pending", "building", "killed", "unknown",
    }
    assert by_id["restarted"]["status"] == "unknown"
    running = by_id["exp"]
    assert running["attempt_id"] == 2 and running["cpu_percent"] == 37 and running["memory_mb"] == 120
    assert running["started_at"] > 0 and running["finished_at"] == 0
    assert by_id["exp/worker-0"]["build_from_cache"] is True
    assert by_id["exp/worker-0"]["image_tag"] == "fluster-job:abc123"
    assert by_id["exp/logs"]["error"] == "Exit code: 1: ValueError: boom"


def test_jobs_is_an_empty_list_on_an_empty_worker() -> None:
    assert Client(FakeWorker()).get("/api/jobs").json() == []


def test_job_detail_shape(client: Client) -> None:
    job = client.get("/api/jobs/exp").json()
    assert_shape(job, JOB_OBJECT)
    assert_shape(job["resources"], RESOURCES)
    assert_shape(job["build"], BUILD)
    assert job["status"] == "running" and job["ports"] == {"actor": 30001}
    assert job["build"]["duration_ms"] == job["build"]["finished_ms"] - job["build"]["started_ms"] == 4000


@pytest.mark.parametrize("path", ["/api/jobs/exp/worker-0", "/api/jobs/exp%2Fworker-0"])
def test_job_detail_of_a_hierarchical_id(client: Client, path: str) -> None:
    job = client.get(path).json()
    assert job["job_id"] == "exp/worker-0" and job["status"] == "succeeded"


def test_unknown_job_is_404_not_found(client: Client) -> None:
    for path in ("/api/jobs/nope", "/api/jobs/exp/nope", "/api/jobs/%2E%2E/x", "/api/jobs/a%00b"):
        page = client.get(path)
        assert page.code == 404, path
        assert page.json() == {"error": "Not found"}, path


def test_logs_are_a_list_of_entries_last_n_of_a_source(client: Client) -> None:
    every = client.get("/api/jobs/exp/logs").json()
    assert isinstance(every, list) and [e["data"] for e in every] == [f"line {i}" for i in range(6)]
    for entry in every:
        assert_shape(entry, LOG_ENTRY)
    assert every[0]["timestamp"] == T0_MS
    tail = client.get("/api/jobs/exp/logs?tail=2").json()
    assert [e["data"] for e in tail] == ["line 4", "line 5"]
    stdout = client.get("/api/jobs/exp/logs?tail=1&source=stdout").json()
    assert [(e["source"], e["data"]) for e in stdout] == [("stdout", "line 3")]
    build = client.get("/api/jobs/exp/logs?source=build").json()
    assert [e["data"] for e in build] == ["line 2", "line 5"]
    assert client.get("/api/jobs/exp/logs?source=nope").json() == []
    bad = client.get("/api/jobs/exp/logs?tail=x")
    assert bad.code == 400 and bad.json()["error"]


def test_logs_of_an_unknown_job_are_an_empty_list(client: Client) -> None:
    for path in ("/api/jobs/nope/logs", "/api/jobs/%2E%2E/logs", "/api/jobs/a/b/c/logs"):
        page = client.get(path)
        assert page.code == 200 and page.json() == [], path


def test_logs_of_a_hierarchical_id_and_a_job_named_like_the_route(client: Client) -> None:
    for path in ("/api/jobs/exp/worker-0/logs", "/api/jobs/exp%2Fworker-0/logs"):
        assert [e["data"] for e in client.get(path).json()] == ["child says hi"], path
    # "exp/logs" is a job: %2F keeps "logs" part of its id; a plain "/logs" is the logs of "exp".
    assert client.get("/api/jobs/exp%2Flogs").json()["status"] == "failed"
    assert isinstance(client.get("/api/jobs/exp/logs").json(), list)
    assert [e["data"] for e in client.get("/api/jobs/exp%2Flogs/logs").json()] == ["ValueError: boom"]


def test_the_dashboard_json_is_under_v1(client: Client) -> None:
    stats = client.get("/api/v1/stats").json()
    assert stats["jobs"]["total"] == 7
    job = client.get("/api/v1/jobs/exp%2Fworker-0").json()
    assert job["job_id"] == "exp/worker-0" and job["state"] == "SUCCEEDED"
    logs = client.get("/api/v1/jobs/exp%2Fworker-0/logs?tail=5").json()
    assert [line["data"] for line in logs["lines"]] == ["child says hi"]
    assert client.get("/api/v1/jobs/exp%2Flogs").json()["state"] == "FAILED"


def test_pages_of_hierarchical_ids(client: Client) -> None:
    index = client.get("/").text
    assert 'href="/job/exp/worker-0"' in index
    page = client.get("/job/exp/worker-0")
    assert page.code == 200 and "child says hi" in page.text
    assert "/api/v1/jobs/exp%2Fworker-0/logs?" in page.text
    assert 'action="/job/exp/worker-0/kill"' not in page.text  # finished: no kill form
    running = client.get("/job/exp")
    assert 'action="/job/exp/kill"' in running.text
