"""No per-connection noise in the worker's log: the controller link's persistent
pool neither logs "Starting factory"/"Stopping factory" nor opens a connection
per call, and the site does not log "Timing out client" for idle keep-alive
connections. On the real reactor, against real sockets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource

from fluster_worker.controller.client import ControllerClient
from fluster_worker.testing.controller import FakeController, poll_until
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.rpc.site import bounded_site

NOISE = ("Starting factory", "Stopping factory", "Timing out client")


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def noise(lines: list[str], mark: str) -> list[str]:
    """The noise lines about our own connections: ``mark`` is the port that
    appears in them (other tests' lingering connections may log meanwhile)."""
    return [line for line in lines if line.startswith(NOISE) and mark in line]


@pytest_twisted.ensureDeferred
async def test_heartbeats_reuse_one_quiet_connection(log_lines: list[str]) -> None:
    fake = FakeController(reactor)
    await fake.start()
    client = ControllerClient.create(fake.url, reactor, timeout_s=5)
    try:
        for i in range(5):
            answer = await client.call(
                "RegisterWorker", pb.RegisterWorkerRequest(worker_id=f"w{i}"), pb.RegisterWorkerResponse
            )
            assert answer.accepted
        assert fake.connections == 1  # persistent: one connection for every call
    finally:
        await client.close()
        await fake.stop()
    assert len(fake.register_calls) == 5
    # A pool's factory names its endpoint, the controller's port, when it logs.
    assert noise(log_lines, f":{fake.port}") == []


class _Idle(protocol.Protocol):
    """A keep-alive client: one request, then silence until the server hangs up."""

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()
        self.received = b""
        self.local_port: int | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.local_port = self.transport.getHost().port
        self.transport.write(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: keep-alive\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello"


@pytest_twisted.ensureDeferred
async def test_the_site_times_out_idle_clients_without_a_log_line(log_lines: list[str]) -> None:
    site = bounded_site(_Hello())
    site.timeOut = 0.2
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    idle = _Idle()
    try:
        await protocol.ClientCreator(reactor, lambda: idle).connectTCP("127.0.0.1", port.getHost().port)
        await poll_until(lambda: b"hello" in idle.received, reactor, timeout_s=10, what="the answer")
        await idle.closed  # the server's idle timeout closed the kept-alive connection
        assert idle.local_port is not None
    finally:
        await port.stopListening()
    # "Timing out client: <peer>" names the client's address: our client's port.
    assert noise(log_lines, f"port={idle.local_port})") == []
