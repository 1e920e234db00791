"""The HTTP face of a Worker: Connect RPC, the dashboard, its JSON API and
/metrics, on one Klein app (one port).

Route map (werkzeug picks the most specific rule, so the order below only
matters for readability):

- ``POST /fluster.cluster.WorkerService/<Method>``: the RPC (``rpc.connect``).
- ``GET /``, ``GET /job/<id>``, ``POST /job/<id>/kill``, ``GET /static/<name>``:
  the pages (``dashboard``).
- ``GET /api/v1/...``: the dashboard's JSON (``api``).
- ``GET /api/stats``, ``/api/jobs[/<id>[/logs]]``: the existing worker's JSON
  API in its shapes (``compat_api``).
- ``GET /metrics``: Prometheus text (``metrics``).
- ``POST /<service>/<method>``: Connect ``unimplemented`` for any other service.

Every request first passes the access gate (``guard.gate``: Host allowlist,
address rules, container networks, the optional token). Every response carries
``Content-Security-Policy: default-src 'self'`` and ``X-Content-Type-Options:
nosniff`` (``SECURITY_HEADERS``: written by the worker's site on every answer,
``rpc.channel.FixedHeaders``; ``SecureHeaders`` for the app under another site).
"""

from __future__ import annotations

import socket
from typing import Any, cast

from klein import Klein
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from fluster_worker.common.resolve import reactor_resolver
from fluster_worker.web.api import JobsApi
from fluster_worker.web.compat_api import CompatApi
from fluster_worker.web.dashboard import Dashboard
from fluster_worker.web.guard.callers import (
    DEFAULT_CONTAINER_NETWORKS,
    ControllerAddresses,
    Rule,
    controller_host,
)
from fluster_worker.web.guard.gate import AccessGate, AccessPolicy
from fluster_worker.web.guard.hosts import HostAllowlist
from fluster_worker.web.guard.token import BearerToken, load_token
from fluster_worker.web.metrics import WorkerMetrics
from fluster_worker.web.refusals import RefusalLog
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.rpc.connect import CallObserver, ConnectRouter, mount_unknown_services
from fluster_worker.web.rpc.site import bounded_site
from fluster_worker.web.service import WorkerService
from fluster_worker.web.views import Facts, WorkerView

SECURITY_HEADERS: dict[bytes, bytes] = {
    b"content-security-policy": b"default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"same-origin",
}


class SecureHeaders(Resource):
    """Wraps a leaf resource (the Klein app) and adds the security headers to
    every response it renders, error pages included: for the app served by a
    Site other than the worker's own (tests through ``StubTreq``). The worker's
    site writes the same headers itself, encoded once (``build_site``)."""

    isLeaf = True

    def __init__(self, wrapped: Resource) -> None:
        super().__init__()
        self._wrapped = wrapped

    def render(self, request: Request) -> Any:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return self._wrapped.render(request)


def _memory_total_bytes() -> int:
    from fluster_worker.host import memory_total_bytes

    return memory_total_bytes()


def build_app(
    worker: WorkerView,
    observe: CallObserver | None = None,
    *,
    metrics: WorkerMetrics | None = None,
    facts: Facts | None = None,
    service: Any = None,
    refusals: RefusalLog | None = None,
) -> Klein:
    """The whole HTTP app. ``observe`` sees every RPC besides the metrics;
    ``metrics``, ``facts``, ``service`` and ``refusals`` are for tests (made here
    by default)."""
    app = Klein()
    if refusals is None:
        refusals = RefusalLog(worker.reactor)
    if facts is None:
        facts = Facts(started_s=worker.reactor.seconds(), memory_total_bytes=_memory_total_bytes())
    descriptor = pb.DESCRIPTOR.services_by_name["WorkerService"]
    if metrics is None:
        metrics = WorkerMetrics(
            worker.manager,
            worker.logs,
            worker.reactor,
            worker_id=worker.worker_id,
            rpc_methods=[m.name for m in descriptor.methods],
            registration=lambda: getattr(worker, "registration", None),
            devices=lambda: getattr(worker, "devices", None),
            conditions=getattr(worker, "conditions", None),
            disk=getattr(worker, "disk", None),
            refusals=refusals,
            site=lambda: getattr(getattr(worker, "web", None), "site", None),
        )
        metrics.watch(worker.manager)
    if service is None:
        service = WorkerService(
            worker.manager,  # type: ignore[arg-type]
            worker.logs,  # type: ignore[arg-type]
            worker.reactor,
            worker.advertised_address,
            conditions=getattr(worker, "conditions", None),
        )
    ConnectRouter(
        descriptor,
        service,
        worker.reactor,
        pool=worker.cpu_pool,
        max_body_bytes=worker.config.max_body_bytes,
        observe=_both(metrics.observe_rpc, observe),
        refusals=refusals,
    ).mount(app)
    dashboard = Dashboard(worker, facts)
    dashboard.mount(app)
    JobsApi(worker, facts).mount(app)
    CompatApi(worker).mount(app)
    _mount_metrics(app, metrics)
    mount_unknown_services(app, refusals)
    dashboard.mount_errors(app)
    return app


def build_resource(
    worker: WorkerView, *, access: AccessPolicy | None = None, secure_headers: bool = True, **kwargs: Any
) -> Resource:
    """The app as a resource, behind the access gate when ``access`` is given,
    with the security headers unless the site adds them (``secure_headers=False``)."""
    if access is None:
        resource: Resource = build_app(worker, **kwargs).resource()
    else:
        refusals = kwargs.pop("refusals", None) or RefusalLog(worker.reactor)
        app = build_app(worker, refusals=refusals, **kwargs)
        resource = AccessGate(app.resource(), access, refusals)
    return SecureHeaders(resource) if secure_headers else resource


def access_policy(worker: WorkerView) -> AccessPolicy:
    """The access rules of the worker's options (README, "Who may call the worker").

    Reads the token file: call it at start-up, before the reactor runs."""
    config = worker.config
    names = [*config.allowed_hosts, socket.gethostname()]
    if config.advertise_host:
        names.append(config.advertise_host)
    hosts = HostAllowlist(names, dynamic=lambda: [worker.advertised_address()])
    controller = None
    host = controller_host(config.controller)
    if host is not None:
        controller = ControllerAddresses(host, reactor_resolver(worker.reactor), worker.reactor)
        worker.reactor.callWhenRunning(controller.start)
    networks = getattr(worker, "engine_networks", None)
    return AccessPolicy(
        hosts=hosts,
        control=Rule.parse(config.allow_control_from),
        read=Rule.parse(config.allow_read_from),
        controller=controller,
        container_networks=(lambda: networks.cidrs) if networks is not None else (lambda: DEFAULT_CONTAINER_NETWORKS),
        token=BearerToken(load_token(config.auth_token_file)) if config.auth_token_file is not None else None,
    )


def build_site(worker: WorkerView) -> Site:
    resource = build_resource(worker, access=access_policy(worker), secure_headers=False)
    site = bounded_site(cast(IResource, resource), worker.config.max_body_bytes, fixed_headers=SECURITY_HEADERS)
    # No access log: the dashboard's live follow polls twice a second per open page,
    # and Site writes a line per request to the twistd log (``noisy`` does not stop it).
    site.log = _no_access_log  # type: ignore[method-assign]
    return site


def _no_access_log(request: object) -> None:
    return None


def _mount_metrics(app: Klein, metrics: WorkerMetrics) -> None:
    def scrape(request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        body, content_type = metrics.exposition(accept.decode("latin-1") if accept else None)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body

    app.route("/metrics", methods=["GET"], endpoint="metrics")(scrape)


def _both(first: CallObserver, second: CallObserver | None) -> CallObserver:
    if second is None:
        return first

    def observe(method: str, code: str, seconds: float) -> None:
        first(method, code, seconds)
        second(method, code, seconds)

    return observe
