"""The reference servers of bench/rpc.py, each run as its own process:

    python bench/rpc_servers.py klein PORT   # a minimal Klein POST route
    python bench/rpc_servers.py wsgi PORT    # uvicorn + Starlette + connect-python WSGI
    python bench/rpc_servers.py asgi PORT    # uvicorn + Starlette + connect-python ASGI

Both answer ``POST /fluster.cluster.WorkerService/HealthCheck`` with a
HealthResponse, as the worker does. ``klein`` is the ceiling of the worker's own
stack (Twisted's HTTP server and Klein's routing, nothing else); ``wsgi`` is the
existing worker's stack (connect-python's WSGI application in Starlette's
WSGIMiddleware under uvicorn); ``asgi`` the same with connect-python's ASGI
application instead, the faster way to run that stack (the ``bench`` extra
installs uvicorn and Starlette).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fluster_worker.web.rpc import cluster_pb2 as pb  # noqa: E402

STARTED = time.monotonic()


def health() -> pb.HealthResponse:
    return pb.HealthResponse(healthy=True, uptime_ms=int((time.monotonic() - STARTED) * 1000), running_jobs=0)


def klein(port: int) -> None:
    from klein import Klein
    from twisted.internet import reactor
    from twisted.web.server import Site

    app = Klein()

    @app.route("/fluster.cluster.WorkerService/HealthCheck", methods=["POST"])
    def check(request):  # type: ignore[no-untyped-def]
        request.setHeader(b"content-type", b"application/proto")
        return health().SerializeToString()

    site = Site(app.resource())
    site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    print("listening", flush=True)
    reactor.run()  # type: ignore[attr-defined]


def asgi(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from tests.stubs.cluster_connect import WorkerService, WorkerServiceASGIApplication

    class Service(WorkerService):
        async def health_check(self, request: pb.Empty, ctx: object) -> pb.HealthResponse:
            return health()

    app = Starlette(routes=[Mount("/", app=WorkerServiceASGIApplication(Service()))])  # type: ignore[arg-type]
    print("listening", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def wsgi(port: int) -> None:
    import warnings

    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    warnings.simplefilter("ignore", DeprecationWarning)
    from starlette.middleware.wsgi import WSGIMiddleware

    from tests.stubs.cluster_connect import WorkerServiceSync, WorkerServiceWSGIApplication

    class Service(WorkerServiceSync):
        def health_check(self, request: pb.Empty, ctx: object) -> pb.HealthResponse:
            return health()

    application = WSGIMiddleware(WorkerServiceWSGIApplication(Service()))  # type: ignore[arg-type]
    app = Starlette(routes=[Mount("/", app=application)])
    print("listening", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    {"klein": klein, "asgi": asgi, "wsgi": wsgi}[sys.argv[1]](int(sys.argv[2]))
