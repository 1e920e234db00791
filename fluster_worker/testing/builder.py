"""A fake ImageBuilder for tests of its callers (the JobManager): the same
interface, no Docker, builds finished by the test or at once."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from fluster_worker.images.builder import BuildError, BuildResult, InvalidBuildInput, validate


@dataclass
class FakeBuild:
    """One call of `FakeImageBuilder.build`; finish or fail it from the test."""

    project_dir: Path
    extras: list[str]
    pip_packages: list[str]
    log: Callable[[str], None]
    tag: str
    started_ms: int
    clock: Clock
    deferred: Deferred[BuildResult] = field(init=False)
    cancelled: bool = False

    def __post_init__(self) -> None:
        def cancel(d: Deferred[BuildResult]) -> None:
            self.cancelled = True

        self.deferred = Deferred(canceller=cancel)

    @property
    def done(self) -> bool:
        return self.deferred.called

    def finish(self, from_cache: bool = False) -> None:
        finished = int(self.clock.seconds() * 1000)
        self.deferred.callback(BuildResult(self.tag, from_cache, self.started_ms, finished))

    def fail(self, message: str = "image build failed: uv sync: No solution found") -> None:
        self.deferred.errback(BuildError(message))


class FakeImageBuilder:
    """``auto_finish=True``: every build succeeds at once (``from_cache`` as
    set); otherwise the test calls ``builds[i].finish()`` or ``.fail()``.
    ``fail_next`` makes the next build fail with that message."""

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        auto_finish: bool = True,
        from_cache: bool = False,
        log_lines: Sequence[str] = ("Step 1/1 : FROM fake-base",),
    ) -> None:
        self.clock = clock or Clock()
        self.auto_finish = auto_finish
        self.from_cache = from_cache
        self.log_lines = list(log_lines)
        self.fail_next: str | None = None
        self.builds: list[FakeBuild] = []
        self.leases: Counter[str] = Counter()
        self.forgotten: list[str] = []
        self.gc_calls = 0

    def build(
        self,
        project_dir: Path,
        extras: Sequence[str],
        pip_packages: Sequence[str],
        log: Callable[[str], None],
    ) -> Deferred[BuildResult]:
        try:
            clean_extras, clean_packages = validate(extras, pip_packages)
        except InvalidBuildInput as e:
            return fail(e)
        key = json.dumps([clean_extras, clean_packages]).encode()
        build = FakeBuild(
            project_dir,
            clean_extras,
            clean_packages,
            log,
            "fluster-job:" + hashlib.sha256(key).hexdigest()[:16],
            int(self.clock.seconds() * 1000),
            self.clock,
        )
        self.builds.append(build)
        for line in self.log_lines:
            log(line)
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            build.fail(message)
        elif self.auto_finish:
            build.finish(self.from_cache)
        return build.deferred

    def forget(self, tag: str) -> None:
        """The image turned out to be gone (see ImageBuilder.forget)."""
        self.forgotten.append(tag)

    def lease(self, tag: str) -> Callable[[], None]:
        self.leases[tag] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.leases[tag] -= 1
                if not self.leases[tag]:
                    del self.leases[tag]

        return release

    def gc(self) -> Deferred[list[str]]:
        self.gc_calls += 1
        return succeed([])


__all__ = ["FakeBuild", "FakeImageBuilder"]
