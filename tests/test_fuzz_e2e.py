"""Fuzzing a real worker over a real socket (issue 13): thousands of mutated
requests (methods, paths, headers, proto / JSON / gzip bodies, Connect-Timeout-Ms)
in a few tens of seconds. No answer is a 500, every request is answered, the
worker stays healthy, logs no traceback, and its RSS stays bounded.

Jobs a mutated RunJob gets accepted are cheap (a bundle that does not exist:
they fail before any container) and bounded (``--max-concurrent-jobs 1
--max-pending-jobs 2``: the rest are refused with resource_exhausted); whatever
is still running at the end is killed, and no container of the worker is left.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred

from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.bigworker import Caller, raw_request, rss_bytes, write_big_log
from tests.workerproc import WorkerProcess

pytestmark = [pytest.mark.docker, pytest.mark.slow]

EXAMPLES = 2500
SERVICE = "/fluster.cluster.WorkerService/"
REQUEST_TYPES: dict[str, type[Message]] = {
    "RunJob": pb.RunJobRequest,
    "GetJobStatus": pb.GetJobStatusRequest,
    "ListJobs": pb.ListJobsRequest,
    "FetchLogs": pb.FetchLogsRequest,
    "KillJob": pb.KillJobRequest,
    "HealthCheck": pb.Empty,
}
#: HTTP statuses a worker may answer (Connect codes, the site's own refusals); never 500.
ALLOWED = {200, 204, 302, 303, 400, 401, 403, 404, 405, 408, 409, 411, 412, 413, 415, 429, 499, 501, 503, 504}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, docker_client: Any) -> Iterator[WorkerProcess]:
    root = tmp_path_factory.mktemp("fuzzworker")
    proc = WorkerProcess(root, "--max-concurrent-jobs", "1", "--max-pending-jobs", "2", "--max-kill-grace", "1")
    write_big_log(root / "state", "logged", proc.worker_id, 20_000)
    pytest_twisted.blockon(Deferred.fromCoroutine(proc.start()))
    yield proc
    proc.close(docker_client)


# -- what a request is made of ---------------------------------------------------------------

job_ids = st.one_of(
    st.sampled_from(["logged", "", "nope", "fz-1", "fz-2", "a/b", "../etc", "x" * 300, "é", "\x00", " "]),
    st.text(max_size=40),
)
ints = st.one_of(
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 100_000, 100_001]),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
regexes = st.one_of(
    st.sampled_from(["", "\\C", "(a+)+$", "[", "(?P<x", "line", "\\C*\\C*\\C*x", "a{1000}{1000}", "x" * 2000]),
    st.text(max_size=30),
)


@st.composite
def messages(draw: st.DrawFn, method: str) -> Message:
    if method == "RunJob":
        return pb.RunJobRequest(
            job_id=draw(st.sampled_from(["fz-1", "fz-2", "fz-3"]) | job_ids),
            serialized_entrypoint=draw(st.binary(max_size=64)),
            bundle_gcs_path=draw(st.sampled_from(["file:///nonexistent/fuzz.zip", "ftp://x/y.zip", "", "gs://"])),
            timeout_seconds=draw(ints),
            ports=draw(st.lists(st.sampled_from(["http", "a", "", "1x", "http"]), max_size=3)),
            attempt_id=draw(ints),
            environment=pb.EnvironmentConfig(
                env_vars=draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
            ),
        )
    if method == "FetchLogs":
        return pb.FetchLogsRequest(
            job_id=draw(job_ids),
            filter=pb.FetchLogsFilter(
                regex=draw(regexes),
                start_line=draw(ints),
                start_ms=draw(st.integers(min_value=-(2**63), max_value=2**63 - 1)),
                end_ms=draw(st.integers(min_value=-(2**63), max_value=2**63 - 1)),
                max_lines=draw(ints),
            ),
        )
    if method == "KillJob":
        return pb.KillJobRequest(job_id=draw(job_ids), term_timeout_ms=draw(ints))
    if method == "GetJobStatus":
        return pb.GetJobStatusRequest(job_id=draw(job_ids), include_result=draw(st.booleans()))
    return REQUEST_TYPES.get(method, pb.Empty)()


def mutate(draw: st.DrawFn, body: bytes) -> bytes:
    how = draw(st.sampled_from(["keep", "keep", "truncate", "flip", "append", "random"]))
    if how == "truncate" and body:
        return body[: draw(st.integers(0, len(body) - 1))]
    if how == "flip" and body:
        i = draw(st.integers(0, len(body) - 1))
        return body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1 :]
    if how == "append":
        return body + draw(st.binary(min_size=1, max_size=32))
    if how == "random":
        return draw(st.binary(max_size=256))
    return body


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([*REQUEST_TYPES, "Nope", ""]))
    path = draw(
        st.sampled_from([SERVICE + method] * 8 + [
            "/", "/metrics", "/api/stats", "/api/jobs", "/api/jobs/logged", "/api/jobs/logged/logs?tail=2147483647",
            "/api/v1/jobs/logged/logs?tail=5000&regex=%5CC", "/api/v1/jobs/logged/logs?after_seq=-5",
            "/job/logged", "/job/logged/kill", "/static/x", "/other.Service/Method", "/%ff", "/%c0%80/x",
            "/api/v1/jobs/%2e%2e%2F/logs", "*", "//", SERVICE,
        ])
    )
    if draw(st.integers(0, 9)) == 0:  # a mangled path
        extra = draw(st.binary(max_size=12))
        path = path + "".join(f"%{b:02x}" if draw(st.booleans()) else chr(33 + b % 90) for b in extra)
        path = path.replace(" ", "%20")
    verb = draw(st.sampled_from(["POST"] * 8 + ["GET", "GET", "PUT", "HEAD", "OPTIONS", "DELETE", "BREW", "P\x00ST"]))
    content_type = draw(st.sampled_from([
        "application/proto", "application/json", "application/json; charset=utf-8", "application/proto; x=y",
        "text/plain", "", "application/grpc", "APPLICATION/JSON",
    ]))
    message = draw(messages(method))
    if "json" in content_type.lower():
        from google.protobuf import json_format

        body = json_format.MessageToJson(message).encode()
        if draw(st.integers(0, 5)) == 0:
            junk = draw(st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=10)))
            body = json.dumps(junk).encode()
    else:
        body = message.SerializeToString()
    body = mutate(draw, body)
    headers = [b"Host: 127.0.0.1"]
    if content_type:
        headers.append(b"Content-Type: " + content_type.encode())
    encoding = draw(st.sampled_from([None, None, "gzip", "gzip", "identity", "br", "gzip, gzip", "GZIP"]))
    if encoding is not None:
        headers.append(b"Content-Encoding: " + encoding.encode())
        if encoding.lower() == "gzip":
            body = gzip.compress(body)
            if draw(st.integers(0, 4)) == 0:
                body = mutate(draw, body)
    timeout = draw(
        st.sampled_from([None, None, None, "0", "1", "10000", "-1", "²", "１２", "99999999999", "abc", "", "3e3"])
    )
    if timeout is not None:
        headers.append(b"Connect-Timeout-Ms: " + timeout.encode("utf-8"))
    version = draw(st.sampled_from([None, "1", "1", "2", "x"]))
    if version is not None:
        headers.append(b"Connect-Protocol-Version: " + version.encode())
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from([b"X-Fuzz", b"Origin", b"Cookie", b"Authorization", b"Host", b"Transfer-Encoding"]))
        value = draw(st.binary(max_size=24)).replace(b"\r", b"").replace(b"\n", b"")
        headers.append(name + b": " + value)
    framing = draw(st.sampled_from(["length", "length", "length", "chunked", "wrong-length"]))
    if framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        payload = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    elif framing == "wrong-length":
        headers.append(b"Content-Length: %d" % max(len(body) - draw(st.integers(1, 8)), 0))
        payload = body
    else:
        headers.append(b"Content-Length: %d" % len(body))
        payload = body
    headers.append(b"Connection: close")
    head = verb.encode("latin-1") + b" " + path.encode("latin-1", "replace") + b" HTTP/1.1\r\n"
    return head + b"\r\n".join(headers) + b"\r\n\r\n" + payload


STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3}) ")
LIVE = ("JOB_STATE_PENDING", "JOB_STATE_BUILDING", "JOB_STATE_RUNNING")


def test_thousands_of_mutated_requests_never_get_a_500_nor_hurt_the_worker(worker: WorkerProcess) -> None:
    assert worker.proc is not None
    statuses: dict[int, int] = {}
    count = [0]
    started = time.monotonic()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests())
    def one(request: bytes) -> None:
        answer = raw_request(worker.url, request, timeout=15)
        match = STATUS.match(answer)
        assert match is not None, (request[:300], answer[:200])
        status = int(match.group(1))
        statuses[status] = statuses.get(status, 0) + 1
        assert status != 500 and status in ALLOWED, (request[:300], answer[:300])
        count[0] += 1
        if count[0] % 250 == 0:
            health = Caller(worker.url, timeout=5)
            try:
                answer_ = health.rpc("HealthCheck", b"{}")
            finally:
                health.close()
            assert answer_.status == 200 and answer_.seconds < 1.0

    one()
    elapsed = time.monotonic() - started
    rss, peak = rss_bytes(worker.proc.pid)
    print(f"\n{count[0]} requests in {elapsed:.1f} s; statuses {dict(sorted(statuses.items()))}; "
          f"RSS {rss >> 20} MiB, peak {peak >> 20} MiB")
    assert count[0] >= EXAMPLES * 0.9

    caller = Caller(worker.url)
    try:
        health = caller.rpc("HealthCheck", b"{}")
        assert health.status == 200 and json.loads(health.body)["healthy"] is True
        # Kill whatever the fuzz got accepted and is still going; none may linger.
        jobs = json.loads(caller.rpc("ListJobs", b"{}").body).get("jobs", [])
        for job in jobs:
            if job.get("state") in LIVE:
                caller.rpc("KillJob", json.dumps({"jobId": job["jobId"], "termTimeoutMs": 100}).encode())
        deadline = time.monotonic() + 60
        while True:
            jobs = json.loads(caller.rpc("ListJobs", b"{}").body).get("jobs", [])
            live = [j for j in jobs if j.get("state") in LIVE]
            if not live:
                break
            assert time.monotonic() < deadline, live
            time.sleep(0.1)
    finally:
        caller.close()
    assert peak < 1 << 30, peak
    assert rss < 600 << 20, rss
    log = worker.log_text()
    assert "Traceback" not in log and "Unhandled" not in log, log[-5000:]
