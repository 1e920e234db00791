"""The Worker: one MultiService holding a Service per long-lived resource.

Start order is the order below (stop is the reverse): thread pools, the
container runtime, the disk watch, the controller link, the job manager, then
the web site, so a stopping worker first stops taking calls, then lets go of
its jobs (they keep running; with ``stop_jobs_on_exit`` they are stopped),
flushes its reports to the controller for a moment, then stops its runtime,
and joins its threads last.

The node conditions (``conditions``) gather the engine's reachability (from the
runtime's events stream) and the disk's free space: while one blocks, RunJob
refuses, HealthCheck says unhealthy and the registration heartbeats pause.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from fluster_worker.bundles.cache import BundleCache
from fluster_worker.bundles.hosts import bundle_http_client
from fluster_worker.common.files import make_private_dir
from fluster_worker.common.threads import BlockingPool
from fluster_worker.config import WorkerConfig
from fluster_worker.containers.networks import EngineNetworks
from fluster_worker.containers.ports import PortAllocator
from fluster_worker.containers.runtime import ContainerRuntime
from fluster_worker.controller import (
    Registration,
    ReportQueue,
    load_or_create_worker_id,
)
from fluster_worker.controller.address import container_controller_url
from fluster_worker.controller.link import ControllerLink
from fluster_worker.controller.reporter import JobReporter
from fluster_worker.images.builder import ImageBuilder
from fluster_worker.jobs.devices import JobDevices
from fluster_worker.jobs.env import ContainerEnv
from fluster_worker.jobs.execution import Toolkit
from fluster_worker.jobs.manager import JobManager
from fluster_worker.jobs.sandbox import JobUser, Sandbox
from fluster_worker.jobs.store import JobStore
from fluster_worker.jobs.validation import RequestLimits
from fluster_worker.logs import LogFollower, LogStore, Page
from fluster_worker.logs.docker_cli import death_signal_prefix
from fluster_worker.node import DiskWatch, NodeConditions
from fluster_worker.node.conditions import UNAVAILABLE
from fluster_worker.web.listener import WebService

DockerClientFactory = Callable[[], Any]


def default_docker_client() -> Any:
    import docker

    return docker.from_env(timeout=300)


class Worker(MultiService):
    log = Logger()

    def __init__(
        self,
        config: WorkerConfig,
        reactor: Any,
        *,
        worker_id: str,
        docker_client: DockerClientFactory = default_docker_client,
        http_client: Any = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.worker_id = worker_id
        jobs = config.max_concurrent_jobs
        self.docker_pool = BlockingPool(reactor, "fluster-docker", max_threads=2 * jobs + 8)
        self.file_pool = BlockingPool(reactor, "fluster-files", max_threads=8)
        # Parsing large request bodies and encoding large answers: off the reactor.
        self.cpu_pool = BlockingPool(reactor, "fluster-cpu", max_threads=2)
        for pool in (self.docker_pool, self.file_pool, self.cpu_pool):
            pool.setServiceParent(self)
        client = _shared(docker_client)
        self.conditions = NodeConditions(reactor)
        self.runtime = ContainerRuntime(reactor, self.docker_pool, client, worker_id)
        self.runtime.setServiceParent(self)
        self.runtime.health.add_listener(self._engine_changed)
        # Where job containers call from: no state change is accepted from there.
        self.engine_networks = EngineNetworks(reactor, self.docker_pool, client, self.runtime.health)
        self.engine_networks.setServiceParent(self)
        self.logs = LogStore(
            config.state_dir / "logs",
            self.file_pool,
            reactor,
            max_stream_bytes=config.log_max_stream_bytes,
            page=Page(config.log_page_lines, config.log_page_bytes),
        )
        job_user = JobUser(*config.job_user) if config.job_user is not None else JobUser.default()
        self.store = JobStore(
            config.state_dir / "jobs", self.file_pool, clock=reactor, owner=(job_user.uid, job_user.gid)
        )
        self.disk = DiskWatch(
            reactor,
            self.file_pool,
            self.conditions,
            [config.state_dir, config.cache_dir],
            floor_bytes=config.min_free_disk_bytes,
            low_bytes=config.low_free_disk_bytes,
            problems=[lambda: self.store.save_error],
        )
        self.disk.setServiceParent(self)
        # Bundle downloads: a pool of our own, quiet (no log line per connection),
        # connecting only to the addresses the config allows (bundles/hosts.py).
        self._http_pool: HTTPConnectionPool | None = None
        if http_client is None:
            http_client, self._http_pool = bundle_http_client(
                reactor, config.allow_private_bundle_hosts, max_per_host=4, idle_timeout_s=30
            )
        self.bundles = BundleCache(
            reactor, self.file_pool, config.cache_dir, http_client, max_cache_bytes=config.bundle_cache_bytes,
            bundle_roots=config.bundle_roots,
        )
        self.builder = ImageBuilder(
            reactor,
            self.docker_pool,
            client,
            config.base_image,
            config.cache_dir / "build",
            ca_bundle=config.ca_bundle,
            index_url=config.index_url,
            extra_index_urls=config.extra_index_urls,
            max_images=config.max_images,
            max_image_bytes=config.max_image_bytes,
        )
        docker_path = shutil.which(config.docker_path) or config.docker_path
        # GPUs and TPUs, found when the worker starts (``JobDevices.discover``).
        self.devices = JobDevices(
            None, shm_size_bytes=config.accelerator_shm_bytes, tpu_memlock_unlimited=config.tpu_memlock_unlimited
        )
        # No `docker logs` outlives the worker, even one killed with SIGKILL.
        tail_prefix = death_signal_prefix()
        kit = Toolkit(
            reactor=reactor,
            store=self.store,
            bundles=self.bundles,
            builder=self.builder,
            runtime=self.runtime,
            open_log=self.logs.open,
            make_follower=lambda job_log, cid, resume: LogFollower(
                reactor,
                reactor.spawnProcess,
                docker_path,
                job_log,
                cid,
                lambda: self.runtime.is_running(cid),
                resume=resume,
                last_entries=lambda n: self.runtime.last_log_entries(cid, n),
                engine_ready=self.runtime.health.ready,
                command_prefix=tail_prefix,
                stall_s=10.0,  # the engine's log rotates (capped): Docker 20.10 may lose its place
            ),
            slots=DeferredSemaphore(jobs),
            container_env=ContainerEnv(container_controller_url(config.controller)).of,
            changed=lambda record: None,
            labels=dict(config.extra_labels),
            devices=self.devices,
            engine_ready=self.runtime.health.ready,
            engine_up=lambda: self.runtime.health.up,
            sandbox=Sandbox(job_user, config.keep_workdir, config.log_max_stream_bytes),
        )
        self.ports = PortAllocator(*config.port_range)
        self.manager = JobManager(
            reactor,
            kit,
            self.logs,
            self.ports,
            worker_id,
            cpu_count=config.cpu_count,
            retention_count=config.retention_count,
            retention_seconds=config.retention_seconds,
            max_kill_grace_seconds=config.max_kill_grace,
            stop_jobs_on_exit=config.stop_jobs_on_exit,
            conditions=self.conditions,
            engine=self.runtime.health,
            limits=RequestLimits(config.max_env_vars, config.max_env_bytes, config.max_job_disk_bytes),
            max_pending_jobs=config.max_pending_jobs,
        )
        self.registration: Registration | None = None
        self.reports: ReportQueue | None = None
        self._link: ControllerLink | None = None
        if config.controller:
            self._link_controller(config.controller)
        self.manager.setServiceParent(self)
        self.web: WebService | None = None
        self._advertised = ""

    def _link_controller(self, controller: str) -> None:
        """RegisterWorker + heartbeat, and the durable ReportJobState queue. Added
        before the manager so that, stopping in reverse, the manager's last
        reports are queued before the queue stops."""
        link = ControllerLink(
            controller,
            self.reactor,
            self.file_pool,
            self.config,
            self.worker_id,
            self.conditions,
            listening_port=lambda: self.web.listening_port if self.web is not None else 0,
            accelerators=lambda: self.devices.accelerators,
        )
        self._link = link
        self.controller_client = link.client
        self.registration = link.registration
        self.reports = link.reports
        self.reports.setServiceParent(self)
        self.manager.add_listener(JobReporter(self.reports))

    def _engine_changed(self, up: bool, reason: str) -> None:
        if up:
            self.conditions.clear("engine")
        else:
            self.conditions.set("engine", UNAVAILABLE, reason, cause="Docker engine unreachable")

    def startService(self) -> None:
        # Every child but the web site now; the site once the manager has
        # loaded its records, so no call ever sees a half-recovered worker.
        Service.startService(self)
        for service in self:
            if service is not self.web:
                service.startService()
        self.devices.discover(self.file_pool, self.config.gpus, self.config.tpu_devices)
        if self.web is not None:
            web = self.web
            web.when_listening().addCallback(self._listening).addErrback(
                lambda f: self.log.failure("finding the address to advertise failed", f)
            )
            # Once the devices are known too: no RunJob is refused for want of them.
            gatherResults([self.manager.ready(), self.devices.ready()]).addCallback(
                lambda _: web.startService() if self.running else None
            ).addErrback(lambda f: self.log.failure("starting the web site failed", f))

    def _listening(self, port: int) -> Deferred[None]:
        from fluster_worker.host import advertise_address, advertise_host

        controller_host = None
        if self.config.controller:
            from fluster_worker.controller import parse_controller_address

            controller_host = parse_controller_address(self.config.controller).host
        bound = self.web.port.getHost().host if self.web is not None and self.web.port is not None else ""  # type: ignore[attr-defined]
        if not self.config.advertise_host and bound not in ("", "0.0.0.0", "::"):
            # Listening on one address only: that is the one callers can reach.
            d: Deferred[str] = succeed(bound)
        else:
            d = self.file_pool.run(advertise_host, self.config.advertise_host, controller_host)

        def known(host: str) -> None:
            self._advertised = advertise_address(host, port)
            # Registration needs the real port: start it only now.
            if self.registration is not None and self.running:
                self.registration.startService()

        return d.addCallback(known)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """Stop children one at a time in reverse order (MultiService would stop
        them all at once, and the thread pools must outlive everyone else)."""
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        if self.registration is not None and self.registration.running:
            await maybeDeferred(self.registration.stopService)
        pools = [self.file_pool, self.docker_pool, self.cpu_pool]
        for service in [s for s in reversed(list(self)) if s not in pools]:
            if service is self.reports and self._link is not None:
                await self._link.flush_reports()
            await self._stop_one(service)
        # After the manager: a drained job ends WORKER_FAILED ("worker shut down"),
        # not FAILED by a build aborted under it; the builds then give up.
        self.builder.abort_builds()
        try:
            await self.logs.close_all()
        except Exception:
            self.log.failure("closing the logs failed")
        if self.registration is not None:
            await self.controller_client.close()
        if self._http_pool is not None:
            await self._http_pool.closeCachedConnections()
        for pool in pools:
            await self._stop_one(pool)

    async def _stop_one(self, service: Service) -> None:
        try:
            await maybeDeferred(service.stopService)  # type: ignore[call-overload]
        except Exception:
            self.log.failure("stopping {service} failed", service=service)

    def add_web(self, site: Site) -> WebService:
        self.web = WebService(
            self.reactor,
            self.config.listen,
            site,
            max_connections=self.config.max_connections,
            read_timeout_s=self.config.request_read_timeout,
        )
        self.web.setServiceParent(self)
        return self.web

    def advertised_address(self) -> str:
        return self._advertised

    def set_advertised_address(self, address: str) -> None:
        self._advertised = address

def _shared(factory: DockerClientFactory) -> DockerClientFactory:
    """One docker client for the whole worker, made on first use (in a thread)."""
    holder: list[Any] = []

    def get() -> Any:
        if not holder:
            holder.append(factory())
        return holder[0]

    return get


def assemble(config: WorkerConfig, reactor: Any, **overrides: Any) -> Worker:
    """The whole worker from a WorkerConfig: what ``makeService`` returns."""
    from fluster_worker.web.app import build_site

    # Once, before the reactor runs: small file work at start-up. Both
    # directories hold what no other local user may read (job secrets, the
    # jobs' own files): 0700.
    make_private_dir(config.state_dir)
    make_private_dir(config.cache_dir)
    worker_id = load_or_create_worker_id(config.state_dir, config.worker_id)
    worker = Worker(config, reactor, worker_id=worker_id, **overrides)
    worker.add_web(build_site(worker))
    return worker
