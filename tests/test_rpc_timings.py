"""RpcTimings: the RPC latency histogram, counted without locks on the reactor."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from fluster_worker.web.rpc_timings import RPC_BUCKETS, RpcTimings


def timings() -> tuple[RpcTimings, CollectorRegistry]:
    t = RpcTimings("fluster_worker_rpc_duration_seconds", "RPC latency.", ["HealthCheck", "RunJob"])
    registry = CollectorRegistry()
    registry.register(t)
    return t, registry


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in registry.collect():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def bucket(registry: CollectorRegistry, le: str, method: str = "HealthCheck", code: str = "ok") -> float:
    key = ("fluster_worker_rpc_duration_seconds_bucket", (("code", code), ("le", le), ("method", method)))
    return samples(registry)[key]


def test_a_time_on_a_bound_counts_in_that_bound_and_buckets_are_cumulative() -> None:
    t, registry = timings()
    t.observe("HealthCheck", "ok", RPC_BUCKETS[0])  # exactly 1 ms: le="0.001"
    t.observe("HealthCheck", "ok", 0.003)
    t.observe("HealthCheck", "ok", 100.0)  # past the last bound: only +Inf
    assert bucket(registry, "0.001") == 1
    assert bucket(registry, "0.0025") == 1
    assert bucket(registry, "0.005") == 2
    assert bucket(registry, "30.0") == 2
    assert bucket(registry, "+Inf") == 3
    s = samples(registry)
    assert s[("fluster_worker_rpc_duration_seconds_count", (("code", "ok"), ("method", "HealthCheck")))] == 3
    total = s[("fluster_worker_rpc_duration_seconds_sum", (("code", "ok"), ("method", "HealthCheck")))]
    assert abs(total - (0.001 + 0.003 + 100.0)) < 1e-9
    assert t.count("HealthCheck", "ok") == 3


def test_names_a_caller_makes_up_share_one_label_value() -> None:
    t, registry = timings()
    for i in range(1000):
        t.observe(f"Made{i}", "unimplemented", 0.0001)
        t.observe("RunJob", "x" * (100 + i % 7), 0.0001)
    series = {labels for name, labels in samples(registry) if name.endswith("_count")}
    assert series == {(("code", "unimplemented"), ("method", "unknown")), (("code", "x" * 40), ("method", "RunJob"))}
    assert t.count("unknown", "unimplemented") == 1000


def test_the_exposition_is_a_prometheus_histogram() -> None:
    t, registry = timings()
    t.observe("RunJob", "ok", 0.2)
    text = generate_latest(registry).decode()
    assert "# TYPE fluster_worker_rpc_duration_seconds histogram" in text
    assert 'fluster_worker_rpc_duration_seconds_bucket{code="ok",le="0.25",method="RunJob"} 1.0' in text
    assert 'fluster_worker_rpc_duration_seconds_bucket{code="ok",le="0.1",method="RunJob"} 0.0' in text
