"""AccessGate: who may call the worker, decided before any handler runs.

Wraps the whole app (RPC, pages, JSON API, /metrics). In order:

1. The ``Host`` header names this worker (``hosts.HostAllowlist``).
2. The caller's address may do what the request does (``callers.Rule``):
   state changes (RunJob, KillJob, the dashboard's kill, and any POST that is
   not a known read) need ``--allow-control-from`` and never come from a
   container network (the engine's bridges, ``host.docker.internal``); reads
   need ``--allow-read-from`` (or the control rule).
3. With ``--auth-token-file``, the request carries the token (``token``).

A refusal is ``permission_denied`` (HTTP 403) with a one-line reason: a Connect
error body on RPC paths, a login form on pages when only the token is missing,
text elsewhere; each is logged through the RefusalLog.

A page the gate lets through also learns whether the same caller could change
state (``control.control_of``), from the same decision as a POST would get: the
dashboard shows the Kill button only then.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from fluster_worker.web.guard import control, login
from fluster_worker.web.guard.callers import Address, ControllerAddresses, Network, Rule, parse_ip
from fluster_worker.web.guard.hosts import HostAllowlist
from fluster_worker.web.guard.token import BearerToken
from fluster_worker.web.refusals import RefusalLog
from fluster_worker.web.rpc import codec
from fluster_worker.web.rpc.errors import Code

SERVICE = "fluster.cluster.WorkerService"
#: The RPCs that change nothing.
READ_METHODS = frozenset({"GetJobStatus", "ListJobs", "FetchLogs", "HealthCheck"})
LOGIN_PATH = b"/login"
STATIC_PREFIX = b"/static/"


@dataclass
class AccessPolicy:
    """Everything the gate decides with. ``container_networks`` gives the
    engine's bridge subnets and gateways (CIDR strings) at call time."""

    hosts: HostAllowlist
    control: Rule = field(default_factory=lambda: Rule(loopback=True, controller=True))
    read: Rule = field(default_factory=lambda: Rule(anyone=True))
    controller: ControllerAddresses | None = None
    container_networks: Callable[[], Sequence[str]] = lambda: ()
    token: BearerToken | None = None
    _parsed: tuple[Sequence[str], tuple[Network, ...]] = ((), ())

    def containers(self) -> tuple[Network, ...]:
        cidrs = self.container_networks()
        if cidrs is not self._parsed[0]:
            networks = []
            for cidr in cidrs:
                try:
                    networks.append(ipaddress.ip_network(cidr, strict=False))
                except ValueError:
                    continue
            self._parsed = (cidrs, tuple(networks))
        return self._parsed[1]

    def from_container(self, ip: Address) -> Network | None:
        for network in self.containers():
            if ip.version == network.version and ip in network:
                return network
        return None

    def matches(self, rule: Rule, ip: Address) -> bool:
        return rule.matches(ip, self.controller.addresses if self.controller is not None else ())


@dataclass(frozen=True)
class Call:
    """What a request is, for the rules: its name in logs, whether it changes state."""

    what: str
    changes_state: bool
    rpc: bool
    page: bool


#: A state change as a page asks about it: may this caller kill?
KILL = Call("kill", changes_state=True, rpc=False, page=True)


@functools.lru_cache(maxsize=1024)
def classify(method: bytes, path: bytes) -> Call:
    verb = method.decode("latin-1")[:10]
    text = path.decode("latin-1")
    shown = f"{verb} {text[:80]}"
    if verb in ("GET", "HEAD", "OPTIONS"):
        page = not text.startswith(("/api/", "/metrics", "/static/"))
        return Call(shown, changes_state=False, rpc=False, page=page)
    parts = text.split("/")
    if verb == "POST" and len(parts) == 3 and parts[0] == "" and "." in parts[1]:
        name = parts[2][:80]
        read = parts[1] == SERVICE and name in READ_METHODS
        return Call(name if parts[1] == SERVICE else f"{parts[1][:80]}/{name}", not read, rpc=True, page=False)
    if path == LOGIN_PATH:
        return Call(shown, changes_state=False, rpc=False, page=True)
    # The dashboard's kill, and anything else that is not a known read.
    return Call(shown, changes_state=True, rpc=False, page=True)


class AccessGate(Resource):
    """Wraps a leaf resource (the Klein app); refuses what the policy refuses."""

    isLeaf = True
    log = Logger()

    def __init__(self, wrapped: Resource, policy: AccessPolicy, refusals: RefusalLog) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._policy = policy
        self._refusals = refusals

    def render(self, request: Request) -> Any:
        call = classify(request.method or b"", request.path or b"")
        local = _address_host(request.getHost())
        reason = self._policy.hosts.refusal(request.getHeader(b"host"), local)
        if reason is not None:
            return self._refuse(request, call, reason)
        peer = _peer_ip(request)
        verdict = self._address_verdict(call, peer)
        if isinstance(verdict, str):
            return self._refuse(request, call, verdict)
        if verdict is True:
            return self._authenticated(request, call)
        # The controller may have moved: look it up again (bounded), then decide.
        d = self._recheck(call, peer)

        def decided(reason: str | None) -> None:
            if request.finished or getattr(request, "_disconnected", False):
                return
            body = self._refuse(request, call, reason) if reason else self._authenticated(request, call)
            if body is not NOT_DONE_YET:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            self.log.failure("access check failed", failure)
            decided("access check failed")

        d.addCallback(decided).addErrback(failed)
        return NOT_DONE_YET

    # -- the decisions ------------------------------------------------------------

    def _address_verdict(self, call: Call, peer: Address | None) -> bool | str | None:
        """True: allowed; a string: refused, why; None: ask the controller's name again."""
        policy = self._policy
        if peer is None:  # a UNIX socket: only this machine reaches it
            return True if _local_allowed(policy, call) else _not_allowed(call, "a local socket")
        if call.changes_state:
            network = policy.from_container(peer)
            if network is not None:
                return f"calls from container network {network} may not change state"
            if policy.matches(policy.control, peer):
                return True
        elif policy.matches(policy.read, peer) or policy.matches(policy.control, peer):
            return True
        if self._controller_may_match(call):
            return None
        return _not_allowed(call, str(peer))

    def _control(self, request: Request) -> control.Control:
        """Whether this caller's state changes would pass, by the same decision
        (without asking the controller's name again: a page only shows it)."""
        peer = _peer_ip(request)
        verdict = self._address_verdict(KILL, peer)
        if verdict is True:
            return control.ALLOWED
        network = self._policy.from_container(peer) if peer is not None else None
        if network is not None and isinstance(verdict, str):
            return control.refused(self._policy.control, str(peer), verdict)
        return control.refused(self._policy.control, str(peer) if peer is not None else "a local socket")

    def _controller_may_match(self, call: Call) -> bool:
        policy = self._policy
        if policy.controller is None:
            return False
        return policy.control.controller or (not call.changes_state and policy.read.controller)

    def _recheck(self, call: Call, peer: Address | None) -> Deferred[str | None]:
        controller = self._policy.controller
        assert controller is not None and peer is not None

        def again(_: object) -> str | None:
            policy = self._policy
            if policy.matches(policy.control, peer):
                return None
            if not call.changes_state and policy.matches(policy.read, peer):
                return None
            return _not_allowed(call, str(peer))

        d: Deferred[Any] = controller.refresh()
        return d.addCallback(again)

    def _authenticated(self, request: Request, call: Call) -> Any:
        token = self._policy.token
        if token is None or token.carried_by(request) or (request.path or b"").startswith(STATIC_PREFIX):
            if request.path == LOGIN_PATH:
                return self._login(request)
            if call.page and not call.changes_state:
                control.record(request, self._control(request))
            return self._wrapped.render(request)
        if call.page and request.method in (b"GET", b"HEAD") and request.args and b"token" in request.args:
            given = request.args[b"token"][0]
            if token.matches(given):
                # Keep it in a cookie; drop it from the address bar and the history.
                token.set_cookie(request, login.cookie_secure(request))
                return login.redirect(request, login.without_token(request))
        if request.path == LOGIN_PATH:
            return self._login(request)
        reason = "missing or wrong token (send Authorization: Bearer <token>)"
        if call.page and request.method in (b"GET", b"HEAD"):
            self._log_refusal(request, call, reason)
            return login.login_page(request, request.uri.decode("latin-1") if request.uri else "/", reason)
        return self._refuse(request, call, reason)

    def _login(self, request: Request) -> bytes:
        token = self._policy.token
        target = login.local_path(login.form_arg(request, b"next") or "/")
        if token is None:
            return login.redirect(request, target)
        if request.method != b"POST":
            return login.login_page(request, target, "")
        given = (login.form_arg(request, b"token") or "").encode("utf-8")
        if not token.matches(given):
            call = Call("POST /login", changes_state=False, rpc=False, page=True)
            self._log_refusal(request, call, "wrong token")
            return login.login_page(request, target, "wrong token")
        token.set_cookie(request, login.cookie_secure(request))
        return login.redirect(request, target)

    # -- answers ------------------------------------------------------------------

    def _refuse(self, request: Request, call: Call, reason: str) -> bytes:
        self._log_refusal(request, call, reason)
        code = Code.PERMISSION_DENIED
        request.setResponseCode(code.http_status)
        request.setHeader(b"cache-control", b"no-store")
        if call.rpc:
            request.setHeader(b"content-type", codec.JSON.encode())
            return codec.error_body(code, reason)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"permission denied: {reason}\n".encode()

    def _log_refusal(self, request: Request, call: Call, reason: str) -> None:
        peer = request.getClientAddress()
        host = getattr(peer, "host", None)
        port = getattr(peer, "port", None)
        shown = f"{host}:{port}" if host is not None and port is not None else str(host or "local")
        self._refusals.refused(call.what, Code.PERMISSION_DENIED.wire_name, reason, shown)


def _not_allowed(call: Call, who: str) -> str:
    if call.changes_state:
        return f"{call.what[:60]} from {who} is not allowed (see --allow-control-from)"
    return f"reads from {who} are not allowed (see --allow-read-from)"


def _local_allowed(policy: AccessPolicy, call: Call) -> bool:
    rules = [policy.control] if call.changes_state else [policy.read, policy.control]
    return any(rule.anyone or rule.loopback for rule in rules)


def _address_host(address: object) -> str | None:
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else None


def _peer_ip(request: Request) -> Address | None:
    host = _address_host(request.getClientAddress())
    if host is None:
        return None
    ip = parse_ip(host)
    # An address we cannot read is nobody we know: a documentation address
    # matches no rule but ``*``.
    return ip if ip is not None else ipaddress.ip_address("192.0.2.0")
