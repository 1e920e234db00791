"""Fakes around the bundle cache.

- `FakeBundleCache`: the interface of `BundleCache` for tests of its callers (the
  JobManager): no files fetched, each acquire finished or failed by the test; pins
  recorded.
- `RecordingPool`: a real `BlockingPool` that counts calls per function and can hold
  the next call of one until the test releases it (tests of `BundleCache` itself).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads

from fluster_worker.bundles.cache import Bundle, BundleError, BundleLease
from fluster_worker.common.threads import BlockingPool

T = TypeVar("T")


@dataclass
class FakeAcquire:
    """One call of `FakeBundleCache.acquire`; finish or fail it from the test."""

    url: str
    log: Callable[[str], None] | None
    deferred: Deferred[BundleLease] = field(init=False)
    cancelled: bool = False
    leased: bool = False
    released: bool = False

    def __post_init__(self) -> None:
        def cancel(d: Deferred[BundleLease]) -> None:
            self.cancelled = True

        self.deferred = Deferred(canceller=cancel)

    def finish(self, path: Path, digest: str = "0" * 64) -> BundleLease:
        def release() -> None:
            self.released = True

        self.leased = True
        lease = BundleLease(Bundle(digest, path), release)
        if self.log is not None:
            self.log(f"bundle cached (sha256 {digest[:12]})")
        self.deferred.callback(lease)
        return lease

    def fail(self, message: str = "bundle not found: /bundles/missing.zip") -> None:
        self.deferred.errback(BundleError(message))


@dataclass
class FakePin:
    """One call of `FakeBundleCache.pin`."""

    digest: str
    released: bool = False


class FakeBundleCache:
    """`BundleCache.acquire` and ``pin`` that record calls; ``auto`` finishes
    acquires at once (with ``auto_digest``)."""

    def __init__(self, auto: Path | None = None, auto_digest: str = "0" * 64) -> None:
        self.auto = auto
        self.auto_digest = auto_digest
        self.acquires: list[FakeAcquire] = []
        self.pins: list[FakePin] = []

    def pin(self, digest: str) -> BundleLease:
        if len(digest) != 64:
            raise ValueError(f"not a bundle digest: {digest!r}")
        pin = FakePin(digest)
        self.pins.append(pin)
        return BundleLease(Bundle(digest, Path("/fake-bundles") / digest), lambda: setattr(pin, "released", True))

    @property
    def pinned(self) -> list[str]:
        """The digests pinned and not released yet."""
        return [p.digest for p in self.pins if not p.released]

    def acquire(self, url: str, log: Callable[[str], None] | None = None) -> Deferred[BundleLease]:
        call = FakeAcquire(url, log)
        self.acquires.append(call)
        if self.auto is not None:
            call.finish(self.auto, self.auto_digest)
        return call.deferred

    @property
    def leases_held(self) -> int:
        """Leases handed out and not released yet."""
        return sum(1 for a in self.acquires if a.leased and not a.released)


@dataclass
class Hold:
    """The next call of one function on a `RecordingPool`, held back."""

    reached: Deferred[None] = field(default_factory=Deferred)  # the call arrived
    _go: Deferred[None] = field(default_factory=Deferred)

    def release(self) -> None:
        self._go.callback(None)


class RecordingPool(BlockingPool):
    """A BlockingPool that counts ``run`` calls per function (``calls[f]``)."""

    def __init__(self, reactor: IReactorThreads, name: str = "recording-pool",
                 max_threads: int = 4) -> None:
        super().__init__(reactor, name, max_threads)
        self.calls: Counter[Callable[..., Any]] = Counter()
        self._holds: dict[Callable[..., Any], Hold] = {}

    def hold(self, f: Callable[..., Any]) -> Hold:
        """Hold back the next call of ``f`` until ``release()``."""
        hold = self._holds[f] = Hold()
        return hold

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        self.calls[f] += 1
        hold = self._holds.pop(f, None)
        if hold is None:
            return super().run(f, *args, **kwargs)
        result: Deferred[T] = Deferred()

        def go(_: None) -> None:
            super(RecordingPool, self).run(f, *args, **kwargs).chainDeferred(result)

        hold._go.addCallback(go)
        hold.reached.callback(None)
        return result
