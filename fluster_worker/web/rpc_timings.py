"""RpcTimings: the latency histogram of the Connect RPCs, by method and code.

Every RPC adds one observation, so this is on the path of the cheapest call
(HealthCheck). prometheus_client's Histogram takes a lock per bucket and per
sum; these counts are only ever touched on the reactor thread (observations
from the router, reads from the /metrics handler), so they are plain lists,
and the scrape turns them into the usual ``_bucket``/``_count``/``_sum`` series.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

#: Upper bounds of the buckets, in seconds (+Inf is added).
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNKNOWN = "unknown"
_BOUNDS = (*map(floatToGoString, RPC_BUCKETS), "+Inf")


class RpcTimings(Collector):
    """Counts per (method, code): one list of bucket counts and a sum.

    ``method`` is one of ``methods`` or ``unknown`` and ``code`` is cut to 40
    characters: the label values a caller can make are bounded."""

    def __init__(self, name: str, documentation: str, methods: Iterable[str]) -> None:
        self._name = name
        self._documentation = documentation
        self._methods = frozenset(methods)
        self._counts: dict[tuple[str, str], list[int]] = {}
        self._sums: dict[tuple[str, str], float] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        counts = self._counts.get(key)
        if counts is None:
            key = (method if method in self._methods else UNKNOWN, code[:40])
            counts = self._counts.get(key)
            if counts is None:
                counts = self._counts[key] = [0] * (len(RPC_BUCKETS) + 1)
                self._sums[key] = 0.0
        # bisect_left: a time equal to a bound falls in that bound's bucket (le).
        counts[bisect_left(RPC_BUCKETS, seconds)] += 1
        self._sums[key] += max(0.0, seconds)

    def count(self, method: str, code: str) -> int:
        """How many calls of ``method`` ended with ``code`` (0 when none)."""
        return sum(self._counts.get((method, code), ()))

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=["method", "code"])
        for (method, code), counts in sorted(self._counts.items()):
            cumulative: list[tuple[str, float]] = []
            total = 0
            for bound, count in zip(_BOUNDS, counts, strict=True):
                total += count
                cumulative.append((bound, total))
            family.add_metric([method, code], cumulative, self._sums[(method, code)])
        yield family
