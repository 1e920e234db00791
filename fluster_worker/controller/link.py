"""The worker's link to its controller: RegisterWorker and its heartbeat (which
pause while a node condition blocks work: the controller sends none to a worker
it does not hear from), and the durable ReportJobState queue."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import TimeoutError
from twisted.logger import Logger

from fluster_worker.accelerators import Accelerators
from fluster_worker.common.threads import BlockingPool
from fluster_worker.config import WorkerConfig
from fluster_worker.controller.client import ControllerClient
from fluster_worker.controller.registration import Registration, RegistrationAdvert
from fluster_worker.controller.reports import ReportQueue
from fluster_worker.node import NodeConditions

__all__ = ["REPORT_FLUSH_SECONDS", "ControllerLink"]

#: How long a stopping worker waits for its reports to reach the controller.
REPORT_FLUSH_SECONDS = 1.0


class ControllerLink:
    """The client, registration and report queue of one worker. The worker
    starts the registration once it knows its address, and makes the queue a
    child service of its own."""

    log = Logger()

    def __init__(
        self,
        controller: str,
        reactor: Any,
        file_pool: BlockingPool,
        config: WorkerConfig,
        worker_id: str,
        conditions: NodeConditions,
        *,
        listening_port: Callable[[], int],
        accelerators: Callable[[], Accelerators | None],
    ) -> None:
        self._reactor = reactor
        self._conditions = conditions
        self.client = ControllerClient.create(controller, reactor)
        advert = RegistrationAdvert(
            worker_id,
            controller,
            listening_port,
            file_pool,
            advertise_host=config.advertise_host,
            cpu=config.advertise_cpu,
            memory=config.advertise_memory,
            accelerators=accelerators,
        )
        self.registration = Registration(self.client, reactor, advert, heartbeat_interval_s=config.heartbeat_seconds)
        self.reports = ReportQueue(self.client, reactor, file_pool, config.state_dir, worker_id)
        conditions.add_listener(self._health_changed)

    def _health_changed(self, healthy: bool) -> None:
        """Heartbeats only while the node can take work: the controller sends
        none to a worker it does not hear from."""
        if healthy:
            self.registration.resume()
        else:
            self.registration.pause(self._conditions.summary())

    async def flush_reports(self) -> None:
        """Give the last reports a bounded moment to reach the controller (they
        stay on disk for the next start if they do not)."""
        idle = self.reports.wait_idle()
        idle.addTimeout(REPORT_FLUSH_SECONDS, self._reactor)
        try:
            await idle
        except TimeoutError:
            self.log.info("{count} job state reports left for the next start", count=self.reports.pending)
