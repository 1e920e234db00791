"""Joining the Controller: RegisterWorker at start until accepted, then as the heartbeat.

State machine of `Registration` (one timer or one call at a time, never both):

    stopped --start--> calling --accepted--> waiting(heartbeat interval) --> calling
                       calling --failed/rejected--> waiting(backoff) --> calling
    any --stop--> stopped (timer cancelled, in-flight call cancelled)
    any --pause--> paused (as stopped, until resume: the node cannot take work, so
                   the controller must stop sending it) --resume--> calling

A failure is any error of the call, an answer with ``accepted=False``, or a request
that cannot be built (e.g. the listening port is not known yet). Failures retry with
exponential backoff and jitter; the heartbeat cadence resumes once accepted. A streak
of failures is logged once when it starts and once when it ends.
"""

from __future__ import annotations

import random as _random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fluster_worker.accelerators import Accelerators
from fluster_worker.common.backoff import Backoff
from fluster_worker.controller._types import BlockingRunner
from fluster_worker.controller.address import parse_controller_address
from fluster_worker.controller.advert import resource_spec, worker_metadata
from fluster_worker.controller.client import ControllerCaller
from fluster_worker.host import (
    MachineFacts,
    advertise_address,
    probe_machine,
    validate_memory_option,
)
from fluster_worker.web.rpc import cluster_pb2 as pb

log = Logger()

DEFAULT_HEARTBEAT_INTERVAL_S = 10.0
REGISTRATION_BACKOFF = Backoff(initial_s=0.5, max_s=8.0, factor=2.0, jitter=0.5)


class RegistrationRejected(Exception):
    """The controller answered RegisterWorker with accepted=False."""


class _BuildFailed(Exception):
    """The RegisterWorkerRequest could not be built."""


class RequestSource(Protocol):
    """Builds the RegisterWorkerRequest; `RegistrationAdvert` in production."""

    def build(self) -> Awaitable[pb.RegisterWorkerRequest]: ...

    def invalidate(self) -> None:
        """Forget cached machine facts (called when the controller is lost, so the
        next attempt re-probes, e.g. a changed local address)."""


class RegistrationAdvert:
    """What the worker advertises: ``worker_id``; ``address`` = advertise host and the
    real listening port (``listening_port()`` is asked at every attempt, so a worker
    listening on port 0 passes its bound port); resources and metadata from local
    facts, probed once on ``pool`` and cached until `invalidate`.

    ``cpu``/``memory``/``advertise_host`` override the detected values; they are
    validated here (ValueError, one line). ``accelerators()`` is what the worker
    hands out (GPUs, TPU), advertised as such once known."""

    def __init__(
        self,
        worker_id: str,
        controller_address: str,
        listening_port: Callable[[], int],
        pool: BlockingRunner,
        *,
        advertise_host: str | None = None,
        cpu: int | None = None,
        memory: str | None = None,
        probe: Callable[[str | None, int, str | None], MachineFacts] = probe_machine,
        accelerators: Callable[[], Accelerators | None] = lambda: None,
    ) -> None:
        controller = parse_controller_address(controller_address)
        if cpu is not None and cpu < 1:
            raise ValueError(f"cpu {cpu} must be at least 1")
        self._memory = validate_memory_option(memory) if memory else None
        if advertise_host is not None and advertise_host.strip():
            advertise_address(advertise_host, 1)  # refuses 0.0.0.0 / ::
        self._worker_id = worker_id
        self._controller_host = controller.host
        self._controller_port = controller.effective_port
        self._listening_port = listening_port
        self._pool = pool
        self._advertise_host = advertise_host
        self._cpu = cpu
        self._probe = probe
        self._accelerators = accelerators
        self._facts: MachineFacts | None = None

    @property
    def facts(self) -> MachineFacts | None:
        return self._facts

    def invalidate(self) -> None:
        self._facts = None

    async def build(self) -> pb.RegisterWorkerRequest:
        port = self._listening_port()
        if self._facts is None:
            self._facts = await self._pool.run(
                self._probe, self._controller_host, self._controller_port, self._advertise_host
            )
        facts = self._facts
        accelerators = self._accelerators()
        return pb.RegisterWorkerRequest(
            worker_id=self._worker_id,
            address=advertise_address(facts.address_host, port),
            resources=resource_spec(facts, self._cpu, self._memory, accelerators),
            metadata=worker_metadata(facts, accelerators),
        )


@dataclass(frozen=True)
class RegistrationStatus:
    """A snapshot for the dashboard."""

    controller_url: str
    connected: bool
    last_heartbeat_ms: int | None
    advertised_address: str | None
    last_error: str | None
    consecutive_failures: int


class Registration(Service):
    """RegisterWorker at start, retried with backoff until accepted, then re-sent every
    ``heartbeat_interval_s`` (measured from the start of the previous accepted call)."""

    def __init__(
        self,
        client: ControllerCaller,
        clock: IReactorTime,
        advert: RequestSource,
        *,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        backoff: Backoff = REGISTRATION_BACKOFF,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if heartbeat_interval_s <= 0:
            raise ValueError("heartbeat interval must be > 0")
        self.setName("controller-registration")
        self._client = client
        self._clock = clock
        self._advert = advert
        self._interval = heartbeat_interval_s
        self._backoff = backoff
        self._random = random
        self._generation = 0
        self._timer: IDelayedCall | None = None
        self._inflight: Deferred[pb.RegisterWorkerResponse] | None = None
        self._connected = False
        self._ever_connected = False
        self._failures = 0
        self._streak_started: float | None = None
        self._last_heartbeat_ms: int | None = None
        self._last_error: str | None = None
        self._address: str | None = None
        self._paused: str | None = None

    # -- state for the dashboard ---------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the last RegisterWorker was accepted."""
        return self._connected

    @property
    def last_heartbeat_ms(self) -> int | None:
        """When (clock time, epoch ms on the real reactor) the last accepted
        RegisterWorker was answered; None before the first."""
        return self._last_heartbeat_ms

    @property
    def controller_url(self) -> str:
        return self._client.base_url

    @property
    def paused(self) -> str | None:
        """Why heartbeats are paused (None while they are not)."""
        return self._paused

    def status(self) -> RegistrationStatus:
        return RegistrationStatus(
            controller_url=self.controller_url,
            connected=self._connected,
            last_heartbeat_ms=self._last_heartbeat_ms,
            advertised_address=self._address,
            last_error=self._last_error,
            consecutive_failures=self._failures,
        )

    # -- lifecycle -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._generation += 1
        self._failures = 0
        self._streak_started = None
        if self._paused is None:
            self._attempt()

    def stopService(self) -> None:
        super().stopService()
        self._halt()

    def pause(self, reason: str) -> None:
        """Stop heartbeating while the node cannot take work (the engine is down,
        the disk is full): the controller then stops sending it work."""
        if self._paused is not None:
            self._paused = reason
            return
        self._paused = reason
        log.warn("pausing RegisterWorker heartbeats: {reason}", reason=reason)
        self._halt()

    def resume(self) -> None:
        if self._paused is None:
            return
        self._paused = None
        log.info("resuming RegisterWorker heartbeats")
        if self.running:
            self._generation += 1
            self._failures = 0
            self._streak_started = None
            self._attempt()

    def _halt(self) -> None:
        self._generation += 1  # callbacks of the old generation do nothing
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.cancel()
        self._connected = False

    # -- the loop --------------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        self._timer = self._clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._attempt()

    def _attempt(self) -> None:
        generation = self._generation
        started = self._clock.seconds()
        d = Deferred.fromCoroutine(self._register_once())
        self._inflight = d
        d.addCallbacks(
            self._succeeded,
            self._failed,
            callbackArgs=(generation, started),
            errbackArgs=(generation,),
        )

    async def _register_once(self) -> pb.RegisterWorkerResponse:
        try:
            request = await self._advert.build()
        except Exception as e:
            raise _BuildFailed(f"cannot build RegisterWorkerRequest: {e}") from e
        self._address = request.address
        response = await self._client.call("RegisterWorker", request, pb.RegisterWorkerResponse)
        if not response.accepted:
            raise RegistrationRejected("controller did not accept the registration")
        return response

    def _succeeded(self, response: pb.RegisterWorkerResponse, generation: int, started: float) -> None:
        if generation != self._generation:
            return
        self._inflight = None
        now = self._clock.seconds()
        self._last_heartbeat_ms = int(now * 1000)
        if not self._ever_connected:
            log.info(
                "registered with controller {url} as {address}",
                url=self.controller_url,
                address=self._address,
            )
        elif self._failures:
            log.info(
                "controller {url} is back: registered again after {outage_s:.1f} s",
                url=self.controller_url,
                outage_s=now - (self._streak_started or now),
            )
        self._connected = True
        self._ever_connected = True
        self._failures = 0
        self._streak_started = None
        self._last_error = None
        self._schedule(max(0.0, self._interval - (now - started)))

    def _failed(self, failure: Failure, generation: int) -> None:
        if generation != self._generation:
            return  # cancelled by stopService, or stale
        self._inflight = None
        error = failure.getErrorMessage() or repr(failure.value)
        self._last_error = error
        if self._failures == 0:
            self._streak_started = self._clock.seconds()
            if failure.check(_BuildFailed):
                log.error("{error}; retrying with backoff", error=error)
            elif self._connected:
                log.warn(
                    "lost controller {url}: {error}; retrying with backoff",
                    url=self.controller_url,
                    error=error,
                )
            else:
                log.warn(
                    "cannot register with controller {url}: {error}; retrying with backoff",
                    url=self.controller_url,
                    error=error,
                )
            if self._connected:
                self._advert.invalidate()
        self._connected = False
        delay = self._backoff.delay(self._failures, self._random)
        self._failures += 1
        self._schedule(delay)
