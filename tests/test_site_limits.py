"""What a connection may cost before a handler runs, over real sockets: paths that
are not UTF-8, the connection cap, the read deadline (slowloris), and what they
must leave alone (keep-alive, a slow answer)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
import pytest_twisted
from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.server import Request

from fluster_worker.web.rpc.site import GuardedSite, bounded_site

READ_TIMEOUT_S = 0.5
SLOW_ANSWER_S = 1.5
BIG = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than loopback sockets buffer
MAX_UNSENT = 20 * 2**20


class Raw(Protocol):
    """A client that writes what it is told and keeps every byte it gets."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for marker, d in list(self._waiting):
            if self.received.count(marker) and not d.called:
                self._waiting.remove((marker, d))
                d.callback(self.received)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        for _, d in self._waiting:
            if not d.called:
                d.callback(self.received)
        self.closed.callback(self.received)

    def until(self, marker: bytes) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        if marker in self.received:
            d.callback(self.received)
        else:
            self._waiting.append((marker, d))
        return d

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


async def connect(port: int) -> Raw:
    proto = Raw()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    return proto


def with_deadline(d: Deferred[Any], seconds: float = 10.0) -> Deferred[Any]:
    return d.addTimeout(seconds, reactor)


@pytest.fixture
def log_failures() -> Iterator[list[LogEvent]]:
    seen: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.async_yield_fixture
async def site() -> AsyncIterator[tuple[int, GuardedSite]]:
    app = Klein()

    @app.route("/", methods=["GET", "POST"])
    def hello(request: Request) -> bytes:
        return b"hello"

    @app.route("/slow")
    def slow(request: Request) -> Deferred[bytes]:
        return deferLater(reactor, SLOW_ANSWER_S, lambda: b"done")

    @app.route("/big")
    def big(request: Request) -> bytes:
        return BIG

    @app.route("/<string:name>")
    def named(request: Request, name: str) -> bytes:
        return name.encode()

    s = bounded_site(
        app.resource(),
        1024,
        max_connections=3,
        read_timeout_s=READ_TIMEOUT_S,
        idle_timeout_s=30,
        max_unsent_bytes=MAX_UNSENT,
    )
    port = reactor.listenTCP(0, s, interface="127.0.0.1")
    yield port.getHost().port, s
    await port.stopListening()


def get(path: bytes, close: bool = True) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n"


@pytest.mark.parametrize(
    "path",
    [b"/%ff", b"/job/%c0%80/kill", b"/fluster.cluster.WorkerService/%ff", b"/a/%ff%fe/logs", b"/%ff?x=1"],
)
@pytest_twisted.ensureDeferred
async def test_a_path_that_is_not_utf8_is_a_plain_400_without_a_traceback(
    site: tuple[int, GuardedSite], log_failures: list[LogEvent], path: bytes
) -> None:
    client = await connect(site[0])
    client.send(get(path))
    answer = await with_deadline(client.closed)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"text/plain" in head
    assert body == b"request path is not UTF-8 once percent-decoded\n"
    assert log_failures == []


@pytest_twisted.ensureDeferred
async def test_raw_non_ascii_bytes_in_the_request_line_are_a_400(
    site: tuple[int, GuardedSite], log_failures: list[LogEvent]
) -> None:
    client = await connect(site[0])
    client.send(get(b"/\xff\xfe"))
    answer = await with_deadline(client.closed)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert log_failures == []


@pytest_twisted.ensureDeferred
async def test_a_host_that_is_not_utf8_is_a_plain_400(
    site: tuple[int, GuardedSite], log_failures: list[LogEvent]
) -> None:
    client = await connect(site[0])
    client.send(b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\nConnection: close\r\n\r\n")
    answer = await with_deadline(client.closed)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert log_failures == []


@pytest_twisted.ensureDeferred
async def test_utf8_paths_are_routed(site: tuple[int, GuardedSite]) -> None:
    client = await connect(site[0])
    client.send(get(b"/%C3%A9t%C3%A9"))
    answer = await with_deadline(client.closed)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert "été".encode() in answer


@pytest_twisted.ensureDeferred
async def test_connections_past_the_cap_are_answered_503_until_one_closes(site: tuple[int, GuardedSite]) -> None:
    port, s = site
    held = [await connect(port) for _ in range(3)]
    # The server counts a connection once it accepted it: an answered request says so.
    for client in held:
        client.send(get(b"/", close=False))
        await with_deadline(client.until(b"hello"))
    assert s.open_connections == 3
    extra = await connect(port)
    refused = await with_deadline(extra.closed)
    assert refused.startswith(b"HTTP/1.1 503 "), refused
    assert s.refused_connections == 1
    # The held connections still work (keep-alive), and one closing makes room.
    held[0].send(get(b"/again", close=True))
    assert b"again" in (await with_deadline(held[0].closed))
    deadline = reactor.seconds() + 10
    while s.open_connections != 2:
        assert reactor.seconds() < deadline, s.open_connections
        await deferLater(reactor, 0.01, lambda: None)
    late = await connect(port)
    late.send(get(b"/late"))
    assert b"late" in (await with_deadline(late.closed))
    for client in held[1:]:
        assert client.transport is not None
        client.transport.loseConnection()
        await with_deadline(client.closed)


@pytest_twisted.ensureDeferred
async def test_a_client_sending_slowly_is_answered_408_and_dropped(site: tuple[int, GuardedSite]) -> None:
    client = await connect(site[0])
    client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    # One header byte every 50 ms: the idle timeout never fires, the read deadline must.
    drip = LoopingCall(client.send, b"X")
    drip.start(0.05)
    started = reactor.seconds()
    try:
        answer = await with_deadline(client.closed)
    finally:
        if drip.running:
            drip.stop()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert reactor.seconds() - started >= READ_TIMEOUT_S * 0.9


@pytest_twisted.ensureDeferred
async def test_a_slow_body_is_dropped_too(site: tuple[int, GuardedSite]) -> None:
    client = await connect(site[0])
    client.send(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n")
    drip = LoopingCall(client.send, b"x")
    drip.start(0.05)
    try:
        answer = await with_deadline(client.closed)
    finally:
        if drip.running:
            drip.stop()
    assert answer.startswith(b"HTTP/1.1 408 "), answer


@pytest_twisted.ensureDeferred
async def test_an_answer_that_takes_longer_than_the_read_deadline_is_not_cut(site: tuple[int, GuardedSite]) -> None:
    """A KillJob waiting out its grace: the server computing, not the client reading."""
    client = await connect(site[0])
    client.send(get(b"/slow", close=False))
    first = await with_deadline(client.until(b"done"))
    assert first.startswith(b"HTTP/1.1 200 ")
    # Keep-alive: the same connection, idle for longer than the read deadline, serves again.
    await deferLater(reactor, READ_TIMEOUT_S * 2, lambda: None)
    client.send(get(b"/second"))
    answer = await with_deadline(client.closed)
    assert b"second" in answer
    assert answer.count(b"HTTP/1.1 200 ") == 2


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_behind_a_slow_answer_are_served(site: tuple[int, GuardedSite]) -> None:
    client = await connect(site[0])
    client.send(get(b"/slow", close=False) + get(b"/next"))
    answer = await with_deadline(client.closed)
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer
    assert b"next" in answer


def dechunk(answer: bytes) -> bytes:
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head, head
    body = b""
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return body
        body += rest[:size]
        rest = rest[size + 2 :]


@pytest_twisted.ensureDeferred
async def test_a_large_answer_arrives_whole_a_slice_at_a_time(site: tuple[int, GuardedSite]) -> None:
    client = await connect(site[0])
    client.send(get(b"/big"))
    answer = await with_deadline(client.closed, 60)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert dechunk(answer) == BIG
    assert site[1].unsent_bytes == 0


@pytest_twisted.ensureDeferred
async def test_clients_that_do_not_read_their_answers_are_dropped_past_the_unsent_cap(
    site: tuple[int, GuardedSite]
) -> None:
    port, s = site
    first = await connect(port)
    assert first.transport is not None
    first.transport.pauseProducing()  # never reads
    first.send(get(b"/big"))
    deadline = reactor.seconds() + 10
    while s.unsent_bytes == 0:  # the answer is made and waits for the reader
        assert reactor.seconds() < deadline
        await deferLater(reactor, 0.01, lambda: None)
    assert s.unsent_bytes <= len(BIG)
    second = await connect(port)
    assert second.transport is not None
    second.transport.pauseProducing()
    second.send(get(b"/big"))
    # Two unread answers would pass the cap: the older one's connection is aborted.
    first.transport.resumeProducing()
    cut = await with_deadline(first.closed, 30)
    assert len(cut) < len(BIG)
    assert s.evicted_connections == 1
    assert s.unsent_bytes <= MAX_UNSENT
    # The newer one reads its answer whole.
    second.transport.resumeProducing()
    answer = await with_deadline(second.closed, 60)
    assert dechunk(answer) == BIG
    assert s.unsent_bytes == 0


FIXED = {b"content-security-policy": b"default-src 'self'", b"x-content-type-options": b"nosniff"}


@pytest_twisted.async_yield_fixture
async def headed() -> AsyncIterator[int]:
    app = Klein()

    @app.route("/")
    def hello(request: Request) -> bytes:
        return b"hello"

    @app.route("/own")
    def own(request: Request) -> bytes:
        request.setHeader(b"content-security-policy", b"sandbox")
        return b"own"

    port = reactor.listenTCP(0, bounded_site(app.resource(), fixed_headers=FIXED), interface="127.0.0.1")
    yield port.getHost().port
    await port.stopListening()


def header_lines(answer: bytes) -> list[tuple[str, str]]:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return [(name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in head)]


@pytest_twisted.ensureDeferred
async def test_every_answer_carries_the_fixed_headers_and_a_date_once_and_no_server_header(headed: int) -> None:
    client = await connect(headed)
    client.send(get(b"/"))
    answer = await with_deadline(client.closed)
    assert answer.startswith(b"HTTP/1.1 200 ")
    lines = header_lines(answer)
    names = [name for name, _ in lines]
    assert dict(lines)["content-security-policy"] == "default-src 'self'"
    assert dict(lines)["x-content-type-options"] == "nosniff"
    assert names.count("content-security-policy") == names.count("x-content-type-options") == names.count("date") == 1
    sent = parsedate_to_datetime(dict(lines)["date"])
    assert abs(sent.timestamp() - time.time()) < 60
    assert "server" not in names  # Twisted's version is nobody's business
    assert b"hello" in answer.partition(b"\r\n\r\n")[2]


@pytest_twisted.ensureDeferred
async def test_an_answer_that_sets_a_fixed_header_itself_keeps_its_own(headed: int) -> None:
    client = await connect(headed)
    client.send(get(b"/own"))
    answer = await with_deadline(client.closed)
    lines = header_lines(answer)
    assert [v for n, v in lines if n == "content-security-policy"] == ["sandbox"]
    assert [v for n, v in lines if n == "x-content-type-options"] == ["nosniff"]


@pytest_twisted.ensureDeferred
async def test_the_plain_400_carries_the_fixed_headers_once(headed: int) -> None:
    client = await connect(headed)
    client.send(get(b"/%ff"))
    answer = await with_deadline(client.closed)
    assert answer.startswith(b"HTTP/1.1 400 ")
    names = [name for name, _ in header_lines(answer)]
    assert names.count("x-content-type-options") == names.count("content-security-policy") == 1
    assert names.count("date") == 1


@pytest_twisted.ensureDeferred
async def test_a_site_without_fixed_headers_still_dates_its_answers(site: tuple[int, GuardedSite]) -> None:
    client = await connect(site[0])
    client.send(get(b"/"))
    answer = await with_deadline(client.closed)
    names = [name for name, _ in header_lines(answer)]
    assert names.count("date") == 1 and "server" not in names
