"""Prometheus metrics of one worker, on a registry of its own (never the global one).

Names (all prefixed ``fluster_worker_``):

- ``jobs{state}``: gauge, retained jobs by state (read from the manager at scrape).
- ``jobs_submitted_total``: counter, jobs (job id + attempt) accepted by this process.
- ``jobs_finished_total{state}``: counter, jobs that reached a terminal state.
- ``image_builds_total``: counter, job images built (not found in the cache).
- ``image_cache_hits_total``: counter, jobs whose image came from the cache.
- ``image_build_seconds``: histogram, time of the builds counted above.
- ``log_lines{source="all"}``: gauge, lines stored in the logs of retained jobs, as far
  as the LogStore knows without reading disk (jobs logged by this process).
- ``log_bytes_read_total``: counter, bytes log queries read from disk.
- ``rpc_duration_seconds{method,code}``: histogram, Connect RPC latency; ``method`` is
  one of the service's methods or ``unknown``, ``code`` is ``ok`` or a Connect code.
- ``uptime_seconds``, ``info{worker_id,version}``, ``controller_connected``.
- ``devices{kind}``, ``devices_in_use{kind}``, ``device_requests_waiting{kind}``:
  gauges, GPUs (``kind="gpu"``) and TPU device nodes (``kind="tpu"``) the worker
  hands out, how many jobs hold now, and the jobs in line for them;
  ``device_in_use{kind,device}``: 1 while a job holds that device.
- ``healthy``: gauge, 1 while the node takes work (no blocking condition).
- ``node_condition{condition,severity,reason}``: gauge, 1 per current condition
  (``engine``: the Docker engine unreachable; ``disk``: low or below the floor);
  the reason without the figures of the moment (those are in ``disk_free_bytes``
  and on the dashboard), so that the series stay put.
- ``disk_free_bytes``: gauge, the least free space under the state and cache dirs.
- ``refused_requests_total{method,code}``: counter, requests refused with an error
  answer (an RPC's Connect error, an access-gate refusal), as the refusal log
  counts them (``refusals.RefusalLog``): ``method`` is one of the service's
  methods, ``page`` (any other HTTP request) or ``other``; ``code`` a Connect code.
- ``connections_refused_total``: counter, connections answered 503 and closed at
  the connection cap; ``connections_evicted_total``: counter, connections aborted
  for holding unsent answers past the cap (``rpc.site.GuardedSite``).

The counters move from ``JobManager.add_listener`` events, counted once per job id and
attempt: a build or cache hit when a job seen without an image tag gets one (so jobs
recovered from disk at restart are not counted again), a finish when a job is first
seen in a terminal state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from fluster_worker import __version__
from fluster_worker.jobs.model import JobRecord, JobState
from fluster_worker.web.job_json import line_count
from fluster_worker.web.refusals import RefusalLog
from fluster_worker.web.rpc_timings import RpcTimings
from fluster_worker.web.views import ManagerView
from fluster_worker.web.worker_json import worker_devices

PREFIX = "fluster_worker_"
BUILD_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass
class _Seen:
    attempt_id: int
    untagged: bool = False  # seen without an image tag
    built: bool = False  # build or cache hit counted
    finished: bool = False


class WorkerMetrics:
    def __init__(
        self,
        manager: ManagerView,
        logs: object,
        clock: Any,
        *,
        worker_id: str,
        rpc_methods: Iterable[str] = (),
        registration: Callable[[], object | None] = lambda: None,
        devices: Callable[[], object | None] = lambda: None,
        conditions: Any = None,
        disk: Any = None,
        refusals: RefusalLog | None = None,
        site: Callable[[], object | None] = lambda: None,
    ) -> None:
        self._manager = manager
        self._refusals = refusals
        self._site = site  # read at scrape: the site is made after the app
        self._conditions = conditions
        self._disk = disk
        self._logs = logs
        self._clock = clock
        self._started = clock.seconds()
        self._registration = registration  # read at scrape: it may be attached after us
        self._devices = devices
        self._seen: dict[str, _Seen] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs_submitted = Counter(
            PREFIX + "jobs_submitted", "Jobs (job id and attempt) accepted by this worker process.", registry=r
        )
        self.jobs_finished = Counter(
            PREFIX + "jobs_finished", "Jobs that reached a terminal state, by state.", ["state"], registry=r
        )
        self.image_builds = Counter(
            PREFIX + "image_builds", "Job images built (not found in the image cache).", registry=r
        )
        self.image_cache_hits = Counter(
            PREFIX + "image_cache_hits", "Jobs whose image was found in the image cache.", registry=r
        )
        self.image_build_seconds = Histogram(
            PREFIX + "image_build_seconds", "Time to build a job image (cache misses).",
            buckets=BUILD_BUCKETS, registry=r,
        )
        self.rpc_duration = RpcTimings(
            PREFIX + "rpc_duration_seconds", "Connect RPC latency by method and result code.", rpc_methods
        )
        r.register(self.rpc_duration)
        for state in JobState:
            if state.terminal:
                self.jobs_finished.labels(state.name.lower())
        r.register(_LiveCollector(self, worker_id))

    # -- inputs -------------------------------------------------------------------

    def watch(self, manager: Any) -> None:
        """Count from ``manager``'s state and phase changes."""
        manager.add_listener(self.job_changed)

    def job_changed(self, record: JobRecord) -> None:
        seen = self._seen.get(record.job_id)
        if seen is None or seen.attempt_id != record.attempt_id:
            seen = self._seen[record.job_id] = _Seen(record.attempt_id)
            if not record.state.terminal:
                self.jobs_submitted.inc()
            if len(self._seen) > 2 * self._manager.job_count() + 100:
                self._forget_gone()
        if not record.build.image_tag:
            seen.untagged = True
        elif seen.untagged and not seen.built:
            seen.built = True
            b = record.build
            if b.from_cache:
                self.image_cache_hits.inc()
            else:
                self.image_builds.inc()
                if b.finished_ms >= b.started_ms > 0:
                    self.image_build_seconds.observe((b.finished_ms - b.started_ms) / 1000.0)
        if record.state.terminal and not seen.finished:
            seen.finished = True
            self.jobs_finished.labels(record.state.name.lower()).inc()

    @property
    def observe_rpc(self) -> Callable[[str, str, float], None]:
        """The ConnectRouter's ``observe`` hook ``(method, code, seconds)``. The
        method comes from the URL: anything not in the service is ``unknown``
        (bounded label values). (The histogram's own method: one call less on
        the path of every RPC.)"""
        return self.rpc_duration.observe

    # -- output -------------------------------------------------------------------

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The metrics as the scraper asked (Prometheus text or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def _device_metrics(self) -> Iterator[Metric]:
        devices = worker_devices(self)
        if not devices:
            return
        total = GaugeMetricFamily(PREFIX + "devices", "GPUs and TPU device nodes jobs may have.", labels=["kind"])
        in_use = GaugeMetricFamily(PREFIX + "devices_in_use", "Devices held by jobs now.", labels=["kind"])
        waiting = GaugeMetricFamily(
            PREFIX + "device_requests_waiting", "Jobs waiting in line for devices.", labels=["kind"]
        )
        each = GaugeMetricFamily(
            PREFIX + "device_in_use", "1 while a job holds the device.", labels=["kind", "device"]
        )
        for kind in ("gpu", "tpu"):
            usage = devices[kind]
            total.add_metric([kind], len(usage["ids"]))
            in_use.add_metric([kind], len(usage["in_use"]))
            waiting.add_metric([kind], usage["waiting"])
            held = set(usage["in_use"])
            for device in sorted(set(usage["ids"]) | held):
                each.add_metric([kind, device], 1 if device in held else 0)
        yield from (total, in_use, waiting, each)

    @property
    def devices(self) -> object | None:
        """The worker's JobDevices (read by ``worker_devices``), when it has them."""
        return self._devices()

    def _forget_gone(self) -> None:
        for job_id in [j for j in self._seen if self._manager.find(j) is None]:
            del self._seen[job_id]

    def live_metrics(self, worker_id: str) -> Iterator[Metric]:
        jobs = self._manager.records()
        by_state = GaugeMetricFamily(PREFIX + "jobs", "Jobs the worker retains, by state.", labels=["state"])
        counts: dict[JobState, int] = {state: 0 for state in JobState if state is not JobState.UNSPECIFIED}
        for record in jobs:
            counts[record.state] = counts.get(record.state, 0) + 1
        for state, count in counts.items():
            by_state.add_metric([state.name.lower()], count)
        yield by_state

        lines = GaugeMetricFamily(
            PREFIX + "log_lines", "Log lines stored for retained jobs (as known to this process).",
            labels=["source"],
        )
        lines.add_metric(["all"], sum(line_count(self._logs, r.job_id) or 0 for r in jobs))
        yield lines

        read = getattr(self._logs, "bytes_read", None)
        if isinstance(read, int):
            yield CounterMetricFamily(PREFIX + "log_bytes_read", "Bytes read from disk by log queries.", read)

        yield GaugeMetricFamily(
            PREFIX + "uptime_seconds", "Seconds since the worker started.", self._clock.seconds() - self._started
        )
        info = GaugeMetricFamily(PREFIX + "info", "The worker's identity.", labels=["worker_id", "version"])
        info.add_metric([worker_id, __version__], 1)
        yield info
        yield from self._device_metrics()
        healthy = self._conditions is None or self._conditions.healthy
        yield GaugeMetricFamily(
            PREFIX + "healthy", "1 while the node takes new work (no blocking node condition).", 1 if healthy else 0
        )
        conditions = GaugeMetricFamily(
            PREFIX + "node_condition",
            "1 per current node condition (engine unreachable, low disk), with its reason.",
            labels=["condition", "severity", "reason"],
        )
        for condition in self._conditions.current() if self._conditions is not None else []:
            conditions.add_metric([condition.name, condition.severity, condition.label[:200]], 1)
        yield conditions
        free = getattr(self._disk, "free_bytes", None)
        if isinstance(free, int):
            yield GaugeMetricFamily(
                PREFIX + "disk_free_bytes", "Least free space under the state and cache directories.", free
            )
        registration = self._registration()
        if registration is not None:
            yield GaugeMetricFamily(
                PREFIX + "controller_connected",
                "1 while the controller accepts our registration heartbeats.",
                1 if getattr(registration, "connected", False) else 0,
            )
        yield from self._refusal_metrics()
        self._forget_gone()

    def _refusal_metrics(self) -> Iterator[Metric]:
        if self._refusals is not None:
            refused = CounterMetricFamily(
                PREFIX + "refused_requests",
                "Requests refused with an error answer, by method (an RPC, page or other) and code.",
                labels=["method", "code"],
            )
            for (method, code), count in sorted(self._refusals.counts.items()):
                refused.add_metric([method, code], count)
            yield refused
        site = self._site()
        for attribute, name, text in (
            ("refused_connections", "connections_refused", "Connections answered 503 and closed at the cap."),
            ("evicted_connections", "connections_evicted",
             "Connections aborted for holding unsent answers past the cap."),
        ):
            connections = getattr(site, attribute, None)
            if isinstance(connections, int):
                yield CounterMetricFamily(PREFIX + name, text, connections)


class _LiveCollector(Collector):
    """What is read from the worker at scrape time rather than counted."""

    def __init__(self, metrics: WorkerMetrics, worker_id: str) -> None:
        self._metrics = metrics
        self._worker_id = worker_id

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics.live_metrics(self._worker_id))
