"""Who may call the worker (issue 13, and issue 12's refusal of calls from
containers): the Host allowlist, the address rules, the container networks,
the bearer token and its cookie, over real sockets on 127.0.0.1.

The real-engine test (a job calling its worker through host.docker.internal)
and the TLS test (twistd on an ``ssl:`` endpoint, the official client) are at
the end."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage
from twisted.web.server import Site

from fluster_worker.jobs.model import JobState
from fluster_worker.main import Options
from fluster_worker.testing.dashboard import FakeWorker, make_record
from fluster_worker.web.app import build_resource
from fluster_worker.web.guard.callers import ControllerAddresses, Rule, controller_host, parse_ip
from fluster_worker.web.guard.gate import AccessPolicy, classify
from fluster_worker.web.guard.hosts import HostAllowlist, host_name
from fluster_worker.web.guard.token import BearerToken, TokenError, load_token
from fluster_worker.web.refusals import RPC_METHODS, RefusalLog
from fluster_worker.web.rpc import cluster_pb2 as pb

reactor: Any = _reactor
SERVICE = "fluster.cluster.WorkerService"
TOKEN = b"s3cret-token-0123456789"


# -- the pieces, without sockets ----------------------------------------------------


def test_host_header_forms() -> None:
    assert host_name("LocalHost:8080") == "localhost"
    assert host_name("[::1]:8080") == "::1"
    assert host_name("[0:0:0:0:0:0:0:1]") == "::1"
    assert host_name("worker-1.example.") == "worker-1.example"
    assert host_name("10.0.0.5") == "10.0.0.5"
    for bad in ("", "a b", "evil.example:80:80", "[::1", "x/y", "é.example", "::1:8080"):
        assert host_name(bad) is None, bad


def test_host_allowlist_names() -> None:
    hosts = HostAllowlist(["Worker-7.Example:8080", "[fd00::7]"], dynamic=lambda: ["10.1.2.3:8080"])
    for allowed in (b"localhost", b"127.0.0.1:1", b"127.9.9.9", b"[::1]:80", b"worker-7.example", b"WORKER-7.example.",
                    b"[fd00::7]:8080", b"10.1.2.3", b"10.1.2.3:9999"):
        assert hosts.refusal(allowed, "192.0.2.9") is None, allowed
    reason = hosts.refusal(b"evil.example:8080", "192.0.2.9")
    assert reason == "Host 'evil.example' is not a name of this worker (see --allowed-hosts)"
    assert hosts.refusal(b"localhost.evil.example", None) is not None
    assert hosts.refusal(b"worker-7.example.evil", None) is not None
    assert hosts.refusal(b"bad host", None) == "malformed Host header 'bad host'"
    # The address the connection arrived on is the worker's own (the listening address).
    assert hosts.refusal(b"192.0.2.9:8080", "192.0.2.9") is None
    assert hosts.refusal(b"192.0.2.10:8080", "192.0.2.9") is not None
    assert hosts.refusal(b"[::ffff:192.0.2.9]", "192.0.2.9") is None
    assert hosts.refusal(None, None) is None  # no Host: no browser
    assert HostAllowlist(["*"]).refusal(b"evil.example", None) is None


def test_host_verdicts_asked_again_agree_and_a_moved_advertised_address_is_seen() -> None:
    advertised = ["10.1.2.3:8080"]
    hosts = HostAllowlist(["worker.lan"], dynamic=lambda: advertised)
    for _ in range(3):  # the fixed names' verdicts are remembered by the raw header
        assert hosts.refusal(b"worker.lan:8080", None) is None
        assert hosts.refusal(b"10.1.2.3", None) is None
        assert hosts.refusal(b"evil.example", None) is not None
    advertised[:] = ["10.9.9.9:8080"]  # the advertised address moved: not remembered
    assert hosts.refusal(b"10.1.2.3", None) is not None
    assert hosts.refusal(b"10.9.9.9", None) is None
    assert hosts.refusal(b"worker.lan:8080", None) is None


def test_address_rules() -> None:
    rule = Rule.parse("loopback, 10.0.0.0/8,fd00::/8, controller")
    ctl = [parse_ip("192.0.2.7")]
    assert rule.matches(parse_ip("127.0.0.1"), ctl)  # type: ignore[arg-type]
    assert rule.matches(parse_ip("::ffff:127.0.0.1"), ctl)  # type: ignore[arg-type]
    assert rule.matches(parse_ip("10.9.9.9"), ctl)  # type: ignore[arg-type]
    assert rule.matches(parse_ip("fd00::1"), ctl)  # type: ignore[arg-type]
    assert rule.matches(parse_ip("192.0.2.7"), ctl)  # type: ignore[arg-type]
    assert not rule.matches(parse_ip("192.0.2.8"), ctl)  # type: ignore[arg-type]
    assert Rule.parse("*").matches(parse_ip("203.0.113.1"))  # type: ignore[arg-type]
    assert not Rule.parse("10.0.0.1").matches(parse_ip("10.0.0.2"))  # type: ignore[arg-type]
    for bad, why in (("", "empty"), ("*,10.0.0.0/8", "anyone"), ("10.0.0.0/33", "not a CIDR"), ("me", "not a CIDR")):
        with pytest.raises(ValueError, match=why):
            Rule.parse(bad)


def test_what_a_request_is() -> None:
    assert classify(b"POST", f"/{SERVICE}/RunJob".encode()).changes_state
    assert classify(b"POST", f"/{SERVICE}/KillJob".encode()).changes_state
    for read in ("GetJobStatus", "ListJobs", "FetchLogs", "HealthCheck"):
        call = classify(b"POST", f"/{SERVICE}/{read}".encode())
        assert not call.changes_state and call.rpc and call.what == read
    assert classify(b"POST", b"/job/a/b/kill").changes_state
    assert classify(b"POST", f"/{SERVICE}/%52unJob".encode()).changes_state  # unknown spellings: control
    assert classify(b"POST", b"/other.Service/Thing").changes_state
    assert classify(b"PUT", b"/").changes_state
    assert not classify(b"GET", b"/job/x").changes_state


def test_controller_host_of_the_option() -> None:
    assert controller_host("ctl.example:9000") == "ctl.example"
    assert controller_host("https://[fd00::1]:443/p") == "fd00::1"
    assert controller_host(None) is None


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(TOKEN + b"\n")
    assert load_token(path) == TOKEN
    for content, why in ((b"short", "shorter than 16"), (b"has a space in it ok", "printable ASCII"),
                         (b"x" * 5000, "more than")):
        path.write_bytes(content)
        with pytest.raises(TokenError, match=why):
            load_token(path)
    with pytest.raises(TokenError, match="cannot read"):
        load_token(tmp_path / "missing")


def test_options_parse_and_refuse(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--allowed-hosts", "a.example, b.example", "--allow-control-from", "loopback,10.0.0.0/8"])
    assert options.config.allowed_hosts == ("a.example", "b.example")
    assert options.config.allow_control_from == "loopback,10.0.0.0/8"
    assert options.config.allow_read_from == "*"
    with pytest.raises(usage.UsageError, match="--allow-control-from: 'nope' is not a CIDR"):
        Options().parseOptions(["--allow-control-from", "nope"])
    with pytest.raises(usage.UsageError, match="--auth-token-file: cannot read"):
        Options().parseOptions(["--auth-token-file", str(tmp_path / "missing")])


def test_controller_lookup_again_on_a_miss_at_most_every_interval() -> None:
    clock = Clock()
    answers = [["10.0.0.1"], ["10.0.0.2"], ["10.0.0.3"]]
    asked: list[str] = []

    def resolve(host: str) -> Deferred[Sequence[str]]:
        asked.append(host)
        return succeed(answers[len(asked) - 1])

    controller = ControllerAddresses("ctl.example", resolve, clock, min_interval_s=30)
    controller.start()
    assert controller.addresses == {parse_ip("10.0.0.1")}
    controller.refresh()  # too soon: no lookup
    assert len(asked) == 1
    clock.advance(31)
    controller.refresh()
    assert controller.addresses == {parse_ip("10.0.0.2")} and asked == ["ctl.example"] * 2
    # A literal address is never looked up.
    literal = ControllerAddresses("192.0.2.1", resolve, clock)
    literal.start()
    assert literal.addresses == {parse_ip("192.0.2.1")} and len(asked) == 2


def test_controller_lookup_is_bounded_in_time() -> None:
    clock = Clock()
    controller = ControllerAddresses("ctl.example", lambda host: Deferred(), clock, timeout_s=3)
    done = controller.start()
    assert not done.called
    clock.advance(3)
    assert done.called and controller.addresses == frozenset()


# -- over a real socket --------------------------------------------------------------


@dataclass
class StubService:
    """The RPC methods, recording what reached them."""

    calls: list[str] = field(default_factory=list)

    def RunJob(self, request: pb.RunJobRequest) -> pb.RunJobResponse:
        self.calls.append("RunJob")
        return pb.RunJobResponse(job_id=request.job_id, state=pb.JOB_STATE_PENDING)

    def KillJob(self, request: pb.KillJobRequest) -> pb.Empty:
        self.calls.append("KillJob")
        return pb.Empty()

    def ListJobs(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        self.calls.append("ListJobs")
        return pb.ListJobsResponse()

    def HealthCheck(self, request: pb.Empty) -> pb.HealthResponse:
        self.calls.append("HealthCheck")
        return pb.HealthResponse(healthy=True)


@dataclass
class Served:
    url: str
    port: int
    worker: FakeWorker
    service: StubService
    refusals: RefusalLog

    async def rpc(self, method: str, message: Any = None, host: str | None = None, **headers: str) -> tuple[int, Any]:
        all_headers = {"Content-Type": "application/json", "Host": host or f"127.0.0.1:{self.port}", **headers}
        response = await treq.post(
            f"{self.url}/{SERVICE}/{method}",
            data=json.dumps(message or {}).encode(),
            headers={k: [v] for k, v in all_headers.items()},
            persistent=False,
        )
        body = await response.content()
        return response.code, json.loads(body) if body.startswith(b"{") else body

    async def get(self, path: str, host: str | None = None, **headers: str) -> Any:
        all_headers = {"Host": host or f"127.0.0.1:{self.port}", **headers}
        response = await treq.get(
            f"{self.url}{path}", headers={k: [v] for k, v in all_headers.items()}, allow_redirects=False,
            persistent=False,
        )
        response.body = await response.content()
        return response


Serve = Callable[..., Deferred[Served]]


@pytest_twisted.async_yield_fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    ports: list[Any] = []

    async def start(**policy: Any) -> Served:
        worker = FakeWorker()
        worker.manager.add(make_record("job-1", JobState.RUNNING))
        service = StubService()
        refusals = RefusalLog(worker.reactor)
        hosts = policy.pop("hosts", HostAllowlist([], dynamic=lambda: [worker.advertised_address()]))
        access = AccessPolicy(hosts=hosts, **policy)
        resource = build_resource(worker, access=access, service=service, refusals=refusals)
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        ports.append(port)
        number = port.getHost().port
        return Served(f"http://127.0.0.1:{number}", number, worker, service, refusals)

    yield start
    for port in ports:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_foreign_host_reaches_no_handler(serve: Any) -> None:
    served: Served = await serve()
    with capturedLogs() as events:
        code, body = await served.rpc("RunJob", {"jobId": "x"}, host="evil.example:8080")
    [line] = [formatEvent(e) for e in events if str(e.get("log_format", "")).startswith("refused ")]
    assert re.fullmatch(
        r"refused RunJob from 127\.0\.0\.1:\d+: permission_denied: Host 'evil\.example' is not a name of "
        r"this worker \(see --allowed-hosts\)",
        line,
    ), line
    for method in ("RunJob", "ListJobs", "HealthCheck"):
        code, body = await served.rpc(method, {"jobId": "x"}, host="evil.example:8080", Origin="http://evil.example")
        assert code == 403
        assert body["code"] == "permission_denied"
        assert body["message"] == "Host 'evil.example' is not a name of this worker (see --allowed-hosts)"
    for path in ("/", "/job/job-1", "/api/stats", "/api/v1/jobs", "/metrics"):
        page = await served.get(path, host="evil.example:8080")
        assert page.code == 403, path
        assert page.body.startswith(b"permission denied: Host 'evil.example'"), page.body
        assert page.headers.getRawHeaders(b"x-frame-options") == [b"DENY"]  # still behind SecureHeaders
    assert served.service.calls == []
    assert served.refusals.total == 9


@pytest_twisted.ensureDeferred
async def test_the_workers_own_names_pass(serve: Any) -> None:
    served: Served = await serve(hosts=HostAllowlist(["dash.example"], dynamic=lambda: ["10.1.2.3:8080"]))
    for host in (f"127.0.0.1:{served.port}", "LOCALHOST", f"localhost:{served.port}", "[::1]:1",
                 "dash.example", "10.1.2.3:8080", "127.0.0.1"):
        code, body = await served.rpc("HealthCheck", host=host)
        assert code == 200, (host, body)
        page = await served.get("/", host=host)
        assert page.code == 200, host
    assert served.refusals.total == 0


@pytest_twisted.ensureDeferred
async def test_control_needs_an_allowed_address(serve: Any) -> None:
    served: Served = await serve(control=Rule.parse("10.0.0.0/8"))
    for method in ("RunJob", "KillJob"):
        code, body = await served.rpc(method, {"jobId": "job-1"})
        assert code == 403
        assert body == {
            "code": "permission_denied",
            "message": f"{method} from 127.0.0.1 is not allowed (see --allow-control-from)",
        }
    # Reads stay open by default.
    assert (await served.rpc("ListJobs"))[0] == 200
    assert (await served.get("/job/job-1")).code == 200
    # The dashboard's kill is a state change too (the gate refuses it before the
    # form's token is even looked at).
    response = await treq.post(
        f"{served.url}/job/job-1/kill",
        data={"token": "0" * 32, "confirmed": "yes"},
        headers={"Host": [f"127.0.0.1:{served.port}"]},
        persistent=False,
    )
    assert response.code == 403
    assert b"is not allowed (see --allow-control-from)" in await response.content()
    assert served.worker.manager.kills == []
    assert served.service.calls == ["ListJobs"]


@pytest_twisted.ensureDeferred
async def test_reads_can_be_limited(serve: Any) -> None:
    served: Served = await serve(control=Rule.parse("10.0.0.0/8"), read=Rule.parse("192.0.2.0/24"))
    code, body = await served.rpc("HealthCheck")
    assert (code, body["message"]) == (403, "reads from 127.0.0.1 are not allowed (see --allow-read-from)")
    for path in ("/", "/api/stats", "/metrics"):
        assert (await served.get(path)).code == 403
    # A caller that may change state may read.
    served = await serve(control=Rule.parse("loopback"), read=Rule.parse("192.0.2.0/24"))
    assert (await served.rpc("HealthCheck"))[0] == 200
    assert (await served.get("/metrics")).code == 200


@pytest_twisted.ensureDeferred
async def test_container_networks_change_nothing_even_when_allowed(serve: Any) -> None:
    # 127.0.0.0/8 stands in for a bridge subnet: the only source a socket test has.
    served: Served = await serve(
        control=Rule.parse("*"), container_networks=lambda: ("172.17.0.0/16", "127.0.0.0/8")
    )
    for method in ("RunJob", "KillJob"):
        code, body = await served.rpc(method, {"jobId": "job-1"})
        assert (code, body["code"]) == (403, "permission_denied")
        assert body["message"] == "calls from container network 127.0.0.0/8 may not change state"
    assert (await served.rpc("ListJobs"))[0] == 200
    assert served.service.calls == ["ListJobs"]


@pytest_twisted.ensureDeferred
async def test_the_controllers_address_may_change(serve: Any) -> None:
    clock = Clock()
    answers = iter([["10.0.0.1"], ["127.0.0.1"]])

    def resolve(host: str) -> Deferred[Sequence[str]]:
        return succeed(next(answers))

    controller = ControllerAddresses("ctl.example", resolve, clock, min_interval_s=30)
    controller.start()
    served: Served = await serve(control=Rule.parse("controller"), controller=controller)
    clock.advance(31)
    # The controller moved to 127.0.0.1: the miss looks it up again, and the call passes.
    code, body = await served.rpc("RunJob", {"jobId": "a"})
    assert code == 200, body
    assert served.service.calls == ["RunJob"]


@pytest_twisted.ensureDeferred
async def test_the_token_on_calls(serve: Any) -> None:
    served: Served = await serve(token=BearerToken(TOKEN))
    code, body = await served.rpc("HealthCheck")
    assert (code, body["code"]) == (403, "permission_denied")
    assert body["message"] == "missing or wrong token (send Authorization: Bearer <token>)"
    assert (await served.rpc("HealthCheck", Authorization="Bearer wrong-token-0123456789"))[0] == 403
    assert (await served.rpc("HealthCheck", Authorization="Basic " + TOKEN.decode()))[0] == 403
    code, _ = await served.rpc("HealthCheck", Authorization="Bearer " + TOKEN.decode())
    assert code == 200
    assert (await served.get("/metrics")).code == 403
    assert (await served.get("/metrics", Authorization="Bearer " + TOKEN.decode())).code == 200
    assert served.service.calls == ["HealthCheck"]


@pytest_twisted.ensureDeferred
async def test_pages_take_the_token_once_and_keep_a_cookie(serve: Any) -> None:
    served: Served = await serve(token=BearerToken(TOKEN))
    page = await served.get("/job/job-1")
    assert page.code == 403
    assert b'<form method="post" action="/login">' in page.body
    assert b'name="next" value="/job/job-1"' in page.body
    assert (await served.get("/job/job-1?token=wrong-token-0123456789")).code == 403

    response = await served.get(f"/job/job-1?token={TOKEN.decode()}&tail=5")
    assert response.code == 303
    assert response.headers.getRawHeaders(b"location") == [b"/job/job-1?tail=5"]
    [cookie] = response.headers.getRawHeaders(b"set-cookie")
    assert TOKEN not in cookie
    for attribute in (b"HttpOnly", b"Secure", b"SameSite=strict", b"Path=/"):
        assert attribute.lower() in cookie.lower(), cookie
    value = cookie.split(b";", 1)[0].decode()
    assert (await served.get("/job/job-1", Cookie=value)).code == 200
    assert (await served.get("/job/job-1", Cookie=value[:-1] + "0")).code == 403

    # The form: a POST to /login sets the same cookie and goes on to a local page only.
    for target, expected in (("/job/job-1", b"/job/job-1"), ("//evil.example/x", b"/"), ("http://evil.example", b"/")):
        response = await treq.post(
            f"{served.url}/login",
            data={"token": TOKEN.decode(), "next": target},
            headers={"Host": [f"127.0.0.1:{served.port}"]},
            allow_redirects=False,
            persistent=False,
        )
        assert response.code == 303
        assert response.headers.getRawHeaders(b"location") == [expected]
        assert response.headers.getRawHeaders(b"set-cookie")[0].split(b";", 1)[0].decode() == value
    response = await treq.post(
        f"{served.url}/login", data={"token": "nope"}, headers={"Host": [f"127.0.0.1:{served.port}"]},
        persistent=False,
    )
    assert response.code == 403 and response.headers.getRawHeaders(b"set-cookie") is None
    # Static files need no token (the login page's look).
    assert (await served.get("/static/style.css")).code != 403


@pytest_twisted.ensureDeferred
async def test_a_cookie_over_plain_http_on_a_lan_name_is_not_secure(serve: Any) -> None:
    served: Served = await serve(token=BearerToken(TOKEN), hosts=HostAllowlist(["worker.lan"]))
    response = await served.get(f"/?token={TOKEN.decode()}", host="worker.lan:8080")
    [cookie] = response.headers.getRawHeaders(b"set-cookie")
    assert b"secure" not in cookie.lower() and b"httponly" in cookie.lower()


# -- the Kill button, shown only to callers the gate lets kill ---------------------


def kill_form(body: bytes) -> bool:
    return b'<form class="kill"' in body and b'action="/job/job-1/kill"' in body


async def post_kill(served: Served, token: str, **headers: str) -> Any:
    response = await treq.post(
        f"{served.url}/job/job-1/kill",
        data={"token": token, "confirmed": "yes"},
        headers={"Host": [f"127.0.0.1:{served.port}"], **{k: [v] for k, v in headers.items()}},
        allow_redirects=False,
        persistent=False,
    )
    response.body = await response.content()
    return response


@pytest_twisted.ensureDeferred
async def test_a_caller_who_may_kill_sees_the_button_and_kills(serve: Any) -> None:
    served: Served = await serve(control=Rule.parse("loopback"))
    page = await served.get("/job/job-1")
    assert page.code == 200 and kill_form(page.body)
    assert b"read-only" not in page.body
    token = re.search(rb'name="token" value="([0-9a-f]+)"', page.body)
    assert token is not None
    response = await post_kill(served, token.group(1).decode())
    assert response.code == 303, response.body
    assert served.worker.manager.kills == [("job-1", 5000)]


@pytest_twisted.ensureDeferred
async def test_a_caller_who_may_not_kill_sees_who_may_instead(serve: Any) -> None:
    served: Served = await serve(control=Rule.parse("controller,10.0.0.0/8"))
    page = await served.get("/job/job-1")
    assert page.code == 200 and not kill_form(page.body)
    assert b'name="token"' not in page.body  # no kill form token handed out either
    assert (
        b"read-only: kills are allowed from the controller, 10.0.0.0/8 (see --allow-control-from), "
        b"not from 127.0.0.1" in page.body
    ), page.body
    # The POST is refused as before.
    response = await post_kill(served, "0" * 32)
    assert response.code == 403 and b"is not allowed (see --allow-control-from)" in response.body
    assert served.worker.manager.kills == []


@pytest_twisted.ensureDeferred
async def test_a_job_calling_from_its_network_sees_no_kill_button(serve: Any) -> None:
    # 127.0.0.0/8 stands in for a bridge subnet, as above: allowed by the rule, refused as a container.
    served: Served = await serve(control=Rule.parse("*"), container_networks=lambda: ("127.0.0.0/8",))
    page = await served.get("/job/job-1")
    assert page.code == 200 and not kill_form(page.body)
    assert b"read-only: calls from container network 127.0.0.0/8 may not change state" in page.body
    assert (await post_kill(served, "0" * 32)).code == 403


@pytest_twisted.ensureDeferred
async def test_with_a_token_the_button_shows_and_the_note_never_names_the_token(serve: Any) -> None:
    bearer = {"Authorization": "Bearer " + TOKEN.decode()}
    served: Served = await serve(token=BearerToken(TOKEN))
    page = await served.get("/job/job-1", **bearer)
    assert page.code == 200 and kill_form(page.body) and TOKEN not in page.body
    served = await serve(token=BearerToken(TOKEN), control=Rule.parse("10.0.0.0/8"))
    page = await served.get("/job/job-1", **bearer)
    assert page.code == 200 and not kill_form(page.body)
    assert b"read-only: kills are allowed from 10.0.0.0/8" in page.body and TOKEN not in page.body


# -- refusals on /metrics ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_refusals_are_counted_on_metrics_with_labels_no_caller_can_invent(serve: Any) -> None:
    served: Served = await serve(control=Rule.parse("10.0.0.0/8"))
    for _ in range(2):
        assert (await served.rpc("RunJob", {"jobId": "x"}))[0] == 403
    assert (await served.rpc("KillJob", {"jobId": "x"}))[0] == 403
    # Refused by the RPC layer, not the gate: the same count (StubService has no GetJobStatus).
    assert (await served.rpc("GetJobStatus", {"jobId": "x"}))[0] == 501
    for i in range(20):  # made-up methods, services and paths
        assert (await served.rpc(f"Made{i}"))[0] == 403
        response = await treq.post(
            f"{served.url}/made.Service{i}/M", data=b"{}",
            headers={"Host": [f"127.0.0.1:{served.port}"], "Content-Type": ["application/json"]}, persistent=False,
        )
        assert response.code == 403
        await response.content()
        assert (await served.get(f"/made/{i}", host="evil.example")).code == 403
    page = await served.get("/metrics")
    assert page.code == 200
    families = text_string_to_metric_families(page.body.decode())
    [family] = [f for f in families if f.name == "fluster_worker_refused_requests"]
    counted = {(s.labels["method"], s.labels["code"]): s.value for s in family.samples if s.name.endswith("_total")}
    assert counted == {
        ("RunJob", "permission_denied"): 2,
        ("KillJob", "permission_denied"): 1,
        ("GetJobStatus", "unimplemented"): 1,
        ("other", "permission_denied"): 40,
        ("page", "permission_denied"): 20,
    }
    assert {method for method, _ in counted} <= RPC_METHODS | {"page", "other"}
    assert served.refusals.total == 64
