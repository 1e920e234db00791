"""RefusalLog: one log line per refused call, rate-limited.

Every RPC the worker refuses (a Connect error answer, an access-control
refusal) is logged once with the method, the code and the reason, so an
operator can see why a controller or client is unhappy. A flood of refusals
(a misconfigured client in a loop, a scanner) must not fill the log: at most
``burst`` lines per ``interval_s`` window are written; the rest are counted,
and one summary line per window says how many were suppressed and of which
kinds.

Every refusal is also counted by method and code (``counts``, read by the
metrics), with labels from fixed sets only, whatever the caller sent: a method
of the WorkerService, ``page`` for any other HTTP request (the pages, the JSON
API, /metrics, the dashboard's kill), or ``other`` (unknown services and
methods); a Connect code, or ``unknown``.

Usage (any refusing layer)::

    refusals = RefusalLog(reactor)
    refusals.refused("RunJob", "invalid_argument", "invalid job_id ...", peer="10.0.0.5")
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from fluster_worker.common.text import one_line
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.web.rpc.errors import Code

#: Bounds of what one line shows of caller-chosen text (method names, reasons).
MAX_METHOD_CHARS = 80
MAX_REASON_CHARS = 300
MAX_PEER_CHARS = 100
#: Distinct (method, code) kinds named in a summary line; the rest are "others".
MAX_SUMMARY_KINDS = 5
#: The RPC methods a refusal may be counted under by name.
RPC_METHODS = frozenset(m.name for m in pb.DESCRIPTOR.services_by_name["WorkerService"].methods)
CODES = frozenset(code.wire_name for code in Code)
#: What the access gate names a request that is not an RPC: ``GET /job/x``.
_HTTP_REQUEST = re.compile(r"[A-Z]{1,10} /")


class RefusalLog:
    """Logs refused calls, at most ``burst`` lines per ``interval_s``."""

    log = Logger(namespace="fluster_worker.refusals")

    def __init__(
        self,
        clock: IReactorTime,
        *,
        burst: int = 20,
        interval_s: float = 60.0,
        methods: Iterable[str] = RPC_METHODS,
    ) -> None:
        if burst < 1 or interval_s <= 0:
            raise ValueError("RefusalLog needs burst >= 1 and interval_s > 0")
        self._clock = clock
        self._burst = burst
        self._interval_s = interval_s
        self._window_start = clock.seconds()
        self._logged = 0
        self._suppressed: Counter[tuple[str, str]] = Counter()
        self._summary: IDelayedCall | None = None
        self._methods = frozenset(methods)
        #: Every refusal seen (logged or not), for tests and metrics.
        self.total = 0
        #: Refusals by (method label, code label): bounded (``label``).
        self.counts: Counter[tuple[str, str]] = Counter()

    def refused(self, method: str, code: str, reason: str, peer: str = "") -> None:
        """Record one refused call: logged now, or counted into the window's summary."""
        self.total += 1
        self.counts[self.labels(method, code)] += 1
        now = self._clock.seconds()
        if now - self._window_start >= self._interval_s:
            self._flush()
            self._window_start = now
            self._logged = 0
        method = one_line(method, MAX_METHOD_CHARS) or "?"
        code = one_line(code, 40)
        if self._logged < self._burst:
            self._logged += 1
            self.log.info(
                "refused {method} from {peer}: {code}: {reason}",
                method=method,
                code=code,
                reason=one_line(reason, MAX_REASON_CHARS),
                peer=one_line(peer, MAX_PEER_CHARS) or "unknown peer",
            )
            return
        self._suppressed[(method, code)] += 1
        if self._summary is None:
            # Say how many were dropped when the window closes, even if the flood stops.
            delay = max(0.0, self._window_start + self._interval_s - now)
            self._summary = self._clock.callLater(delay, self._window_closed)

    def labels(self, method: str, code: str) -> tuple[str, str]:
        """The (method, code) a refusal is counted under: from fixed sets only."""
        if method in self._methods:
            shown = method
        elif _HTTP_REQUEST.match(method):
            shown = "page"
        else:
            shown = "other"
        return shown, code if code in CODES else "unknown"

    def stop(self) -> None:
        """Write the pending summary now and cancel its timer (service shutdown)."""
        if self._summary is not None and self._summary.active():
            self._summary.cancel()
        self._summary = None
        self._flush()

    def _window_closed(self) -> None:
        self._summary = None
        self._flush()
        self._window_start = self._clock.seconds()
        self._logged = 0

    def _flush(self) -> None:
        if self._summary is not None and self._summary.active():
            self._summary.cancel()
        self._summary = None
        if not self._suppressed:
            return
        count = sum(self._suppressed.values())
        common = self._suppressed.most_common(MAX_SUMMARY_KINDS)
        kinds = ", ".join(f"{method} {code} x{n}" for (method, code), n in common)
        others = count - sum(n for _, n in common)
        if others:
            kinds += f", others x{others}"
        self._suppressed.clear()
        self.log.warn(
            "suppressed {count} more refused calls in the last {seconds:g} s ({kinds})",
            count=count,
            seconds=self._interval_s,
            kinds=kinds,
        )
