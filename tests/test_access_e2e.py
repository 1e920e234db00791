"""On the real engine: a job cannot drive its own worker (issue 12). The worker
listens on 0.0.0.0 and lets anyone control it, with any Host; a job that calls
it through ``host.docker.internal`` may read, but its RunJob and KillJob are
refused with permission_denied.

And a real ``twistd`` worker on an ``ssl:`` endpoint with a token, called over
TLS by the official Connect client (and by try_job's WorkerRpc)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cloudpickle
import pyqwest
import pytest
import pytest_twisted
from cluster_connect import WorkerServiceClientSync
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from fluster_worker.client.rpc import WorkerRpc
from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import Harness, entrypoint, make_bundle, start_worker, worker_config
from tests.workerproc import WorkerProcess

pytestmark = pytest.mark.docker


def call_own_worker(port: int) -> dict[str, Any]:
    import json
    import urllib.error
    import urllib.request

    seen: dict[str, Any] = {}
    for method, body in (
        ("ListJobs", {}),
        ("RunJob", {"jobId": "from-inside", "bundleGcsPath": "file:///etc/passwd"}),
        ("KillJob", {"jobId": "from-inside"}),
    ):
        request = urllib.request.Request(
            f"http://host.docker.internal:{port}/fluster.cluster.WorkerService/{method}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                seen[method] = (response.status, json.loads(response.read()))
        except urllib.error.HTTPError as e:
            seen[method] = (e.code, json.loads(e.read()))
    return seen


@pytest_twisted.async_yield_fixture
async def open_worker(tmp_path: Path) -> AsyncIterator[Harness]:
    config = worker_config(
        tmp_path, listen="tcp:0:interface=0.0.0.0", allowed_hosts=("*",), allow_control_from="*"
    )
    h = await start_worker(config)
    yield h
    await h.worker.stopService()


@pytest_twisted.ensureDeferred
async def test_a_job_calling_its_worker_changes_nothing(open_worker: Harness, tmp_path: Path) -> None:
    assert open_worker.worker.web is not None
    port = open_worker.worker.web.listening_port
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    status = await open_worker.run(
        pb.RunJobRequest(
            job_id=job_id,
            serialized_entrypoint=entrypoint(call_own_worker, port),
            bundle_gcs_path=f"file://{make_bundle(tmp_path / 'b')}",
        ),
        timeout=240,
    )
    assert status.state == pb.JOB_STATE_SUCCEEDED, status.error
    seen = cloudpickle.loads(status.serialized_result)
    # The path is open (a read gets through), so the refusals below are the rule's.
    assert seen["ListJobs"][0] == 200
    assert job_id in {job["jobId"] for job in seen["ListJobs"][1]["jobs"]}
    networks = open_worker.worker.engine_networks
    assert networks.known
    for method in ("RunJob", "KillJob"):
        code, body = seen[method]
        assert code == 403 and body["code"] == "permission_denied", seen
        assert body["message"].startswith("calls from container network "), body
        assert body["message"].endswith(" may not change state")
        assert body["message"].split()[4] in networks.cidrs
    assert open_worker.worker.manager.find("from-inside") is None


# -- TLS and the token, on a real twistd worker ----------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate for localhost and 127.0.0.1 it signed:
    (key, certificate, CA certificate)."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "key.pem", "req.csr", "cert.pem"))
    ext = directory / "ext.cnf"
    ext.write_text("basicConstraints=critical,CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
                   "extendedKeyUsage=serverAuth\n")
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", ca_key, "-out", ca,
         "-subj", "/CN=fluster test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
         "-out", cert, "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return key, cert, ca


@pytest_twisted.ensureDeferred
async def test_tls_and_token_with_the_official_client(tmp_path: Path, docker_client: Any) -> None:
    key, cert, ca = self_signed(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("tls-test-token-0123456789\n")
    token_file.chmod(0o600)
    worker = WorkerProcess(
        tmp_path / "w",
        "--listen", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        "--auth-token-file", str(token_file),
    )
    try:
        await worker.start()
        url = worker.url.replace("http://", "https://").replace("127.0.0.1", "localhost")
        tls = pyqwest.SyncClient(pyqwest.SyncHTTPTransport(tls_ca_cert=ca.read_bytes()))
        bearer = {"authorization": "Bearer tls-test-token-0123456789"}
        for proto_json in (False, True):
            with WorkerServiceClientSync(url, proto_json=proto_json, timeout_ms=10_000, http_client=tls) as client:
                health = client.health_check(pb.Empty(), headers=bearer)
                assert health.healthy
                with pytest.raises(ConnectError) as refused:
                    client.health_check(pb.Empty())
                assert refused.value.code == Code.PERMISSION_DENIED
                assert "missing or wrong token" in refused.value.message
        # try_job's client sends the token and trusts the given certificate.
        rpc = WorkerRpc(url, 10_000, token="tls-test-token-0123456789", ca_pem=ca.read_bytes())
        try:
            with pytest.raises(ConnectError) as missing:
                rpc.status("no-such-job")
            assert missing.value.code == Code.NOT_FOUND
        finally:
            rpc.close()
        # Plain HTTP to the TLS port gets nothing served.
        with WorkerServiceClientSync(worker.url, timeout_ms=5_000) as plain:
            with pytest.raises(ConnectError) as no_tls:
                plain.health_check(pb.Empty(), headers=bearer)
            assert no_tls.value.code != Code.PERMISSION_DENIED
    finally:
        worker.close(docker_client)


# -- the options, through the real worker's wiring --------------------------------------


async def _post(url: str, method: str, host: str) -> tuple[int, dict[str, Any]]:
    import json

    import treq

    response = await treq.post(
        f"{url}/fluster.cluster.WorkerService/{method}",
        data=json.dumps({"jobId": "no-such-job"}).encode(),
        headers={"Content-Type": ["application/json"], "Host": [host]},
        persistent=False,
    )
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_the_options_reach_the_gate(tmp_path: Path) -> None:
    # Control only from the controller, whose name (looked up through the
    # reactor's resolver) is this machine.
    config = worker_config(
        tmp_path / "a",
        controller="http://localhost:9",
        allow_control_from="controller",
        allowed_hosts=("worker-7.example",),
    )
    h = await start_worker(config)
    try:
        port = h.worker.web.listening_port  # type: ignore[union-attr]
        code, body = await _post(h.url, "ListJobs", "evil.example")
        assert (code, body["code"]) == (403, "permission_denied")
        assert (await _post(h.url, "ListJobs", "Worker-7.example:80"))[0] == 200
        code, body = await _post(h.url, "KillJob", f"127.0.0.1:{port}")
        assert (code, body["code"]) == (404, "not_found"), body  # through the gate, to the job core
    finally:
        await h.worker.stopService()

    h = await start_worker(worker_config(tmp_path / "b", allow_control_from="10.0.0.0/8"))
    try:
        code, body = await _post(h.url, "KillJob", "localhost")
        assert (code, body["message"]) == (403, "KillJob from 127.0.0.1 is not allowed (see --allow-control-from)")
        assert (await _post(h.url, "GetJobStatus", "localhost"))[0] == 404
    finally:
        await h.worker.stopService()
