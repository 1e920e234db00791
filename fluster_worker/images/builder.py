"""ImageBuilder: builds (or finds) the Docker image holding a job's Python
environment, and garbage-collects those images.

An image is content-addressed: its tag `fluster-job:<16 hex>` hashes the base
image id, pyproject.toml and uv.lock (or their absence), extras, pip packages,
the runner's source, the uv version, the index options and the CA bundle (see
`fluster_worker.images.dockerfile`; read by `inputs.py`). Jobs with the same
dependencies share one image. The blocking Docker side is `docker_build.py`.

States of one tag, all on the reactor thread:
- no entry: `build()` computes the inputs in the pool, then starts a build;
- in flight (`_inflight[tag]`): the engine is asked whether the tag exists
  (from_cache), else builds it; every caller meanwhile gets its own Deferred and
  receives the remaining log lines. When the build ends, every attached waiter
  gets the result and the entry goes away.
- being removed by gc (`ImageGC.removal`): a build of that tag first waits for
  the removal, then rebuilds.

A tag found or built is remembered as present (`_present`), so the next job of
the same image asks the engine nothing: no inspect per job. It is forgotten
when the gc starts removing it, or when a caller finds it gone (`forget`: a
container create that says the image is missing, e.g. after a manual
`docker rmi`); the next build of it then asks the engine again.

Cancelling the Deferred of `build()` (a job killed while building) detaches that
caller only: it gets CancelledError and no more log lines. When no caller is left,
the build is aborted: the entry goes (a later caller starts afresh), the build
stops before its docker build starts, or its docker build's connection is shut
down (the engine then cancels the build) and its pool thread returns. The same
happens to every build at worker shutdown (`abort_builds`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fluster_worker.common.threads import BlockingPool
from fluster_worker.images.docker_build import BuildEngine
from fluster_worker.images.dockerfile import (
    CONTAINER_APP_DIR,
    CONTAINER_ENTRYPOINT_PATH,
    CONTAINER_IO_DIR,
    CONTAINER_OUT_DIR,
    CONTAINER_PYTHON,
    CONTAINER_RESULT_PATH,
    CONTAINER_RUNNER_PATH,
    RUNNER_PATH,
    TAG_REPOSITORY,
    BuildError,
    BuildInputs,
    InvalidBuildInput,
    runner_command,
    runner_version,
    validate,
    validate_index_url,
    validate_repository,
)
from fluster_worker.images.gc import ImageGC, one_line
from fluster_worker.images.inflight import InFlight
from fluster_worker.images.inputs import InputCollector

__all__ = [
    "CONTAINER_APP_DIR",
    "CONTAINER_ENTRYPOINT_PATH",
    "CONTAINER_IO_DIR",
    "CONTAINER_OUT_DIR",
    "CONTAINER_PYTHON",
    "CONTAINER_RESULT_PATH",
    "CONTAINER_RUNNER_PATH",
    "RUNNER_PATH",
    "BuildError",
    "BuildResult",
    "ImageBuilder",
    "InvalidBuildInput",
    "runner_command",
    "runner_version",
    "validate",
]


@dataclass(frozen=True)
class BuildResult:
    tag: str
    from_cache: bool
    started_ms: int
    finished_ms: int


_log = Logger()


class ImageBuilder:
    """Builds and garbage-collects job images on one Docker engine.

    ``uv_bin`` (default: the ``uv`` package's binary) is copied into images.
    ``repository`` names the images (default ``fluster-job``); gc only ever
    considers images of this repository that carry the fluster label, and the
    dangling leftovers of this repository's failed builds once older than
    ``dangling_max_age`` seconds (younger ones may be the parent of a step that
    is about to start)."""

    log = _log

    def __init__(
        self,
        reactor: IReactorTime,
        pool: BlockingPool,
        docker_client_factory: Callable[[], docker.DockerClient],
        base_image: str,
        work_dir: Path,
        *,
        ca_bundle: Path | None = None,
        index_url: str | None = None,
        extra_index_urls: Sequence[str] = (),
        max_images: int = 50,
        max_image_bytes: int = 50 * 2**30,
        uv_bin: Path | None = None,
        repository: str = TAG_REPOSITORY,
        dangling_max_age: float = 3600.0,
    ) -> None:
        self._reactor = reactor
        self._pool = pool
        index = None if index_url is None else validate_index_url(index_url)
        extra_indexes = tuple(validate_index_url(u) for u in extra_index_urls)
        self._repository = validate_repository(repository)
        self._inflight: dict[str, InFlight] = {}
        # Tags known to exist on the engine (see the module doc). Reactor thread only.
        self._present: set[str] = set()
        # Set at shutdown: running builds stop at their next output line, so a
        # stopping worker does not wait for a long dependency install to finish.
        self._stopping = threading.Event()
        self._engine = BuildEngine(reactor, docker_client_factory, work_dir, ca_bundle, self._stopping)
        self._inputs = InputCollector(
            self._engine.client,
            base_image,
            ca_bundle=ca_bundle,
            index_url=index,
            extra_index_urls=extra_indexes,
            uv_bin=uv_bin,
            repository=self._repository,
        )
        self._images = ImageGC(
            reactor,
            pool,
            self._engine.client,
            base_image,
            self._repository,
            building=self._inflight.__contains__,
            max_images=max_images,
            max_image_bytes=max_image_bytes,
            dangling_max_age=dangling_max_age,
            removing=self._present.discard,
        )

    # --- build ---------------------------------------------------------------

    def build(
        self,
        project_dir: Path,
        extras: Sequence[str],
        pip_packages: Sequence[str],
        log: Callable[[str], None],
    ) -> Deferred[BuildResult]:
        """The image for this project: built, or found (from_cache). Fails with
        BuildError (InvalidBuildInput for bad extras or packages)."""
        started_ms = self._now_ms()
        try:
            clean_extras, clean_packages = validate(extras, pip_packages)
        except InvalidBuildInput as e:
            return fail(e)
        return Deferred.fromCoroutine(self._build(project_dir, clean_extras, clean_packages, log, started_ms))

    async def _build(
        self,
        project_dir: Path,
        extras: list[str],
        pip_packages: list[str],
        log: Callable[[str], None],
        started_ms: int,
    ) -> BuildResult:
        try:
            inputs = await self._pool.run(self._inputs.collect, project_dir, extras, pip_packages)
        except (BuildError, CancelledError):  # a cancel is the caller's (a kill), not a failed build
            raise
        except Exception as e:  # the engine unreachable, uv missing, ...
            self.log.failure("collecting the image inputs failed")
            raise BuildError(f"image build failed: {one_line(e)}") from e
        tag = inputs.tag
        build = self._inflight.get(tag)
        if build is None:
            build = self._inflight[tag] = InFlight(tag, abandoned=self._abandoned)
            waiter = build.attach(log)
            Deferred.fromCoroutine(self._run_build(build, inputs))
        else:
            log(f"waiting for the build of {tag} already in progress")
            waiter = build.attach(log)
        from_cache = await waiter
        return BuildResult(tag, from_cache, started_ms, self._now_ms())

    async def _run_build(self, build: InFlight, inputs: BuildInputs) -> None:
        tag = build.tag
        result: bool | BaseException
        try:
            await self._images.removal(tag)
            if tag in self._present or await self._pool.run(self._engine.image_exists, tag):
                build.emit([f"using cached image {tag}"])
                result = True
            elif build.aborted.is_set():
                raise BuildError("image build aborted: no job waits for it")
            else:
                build.emit([f"building image {tag}"])
                start = self._reactor.seconds()
                await self._pool.run(self._engine.build, build, inputs, self._inputs.uv)
                self.log.info(
                    "built image {tag} in {ms} ms",
                    tag=tag,
                    ms=int((self._reactor.seconds() - start) * 1000),
                )
                result = False
            self._images.touch(tag)
            self._present.add(tag)
        except BuildError as e:
            self.log.info("image build of {tag} failed: {error}", tag=tag, error=str(e))
            result = e
        except Exception as e:
            self.log.failure("image build of {tag} crashed", tag=tag)
            result = BuildError(f"image build failed: {one_line(e)}")
        if self._inflight.get(tag) is build:
            del self._inflight[tag]
        build.finish(result)

    def _abandoned(self, build: InFlight) -> None:
        """No caller waits for the build any more: abort it, and let a later
        caller of the same tag start a build of its own."""
        if self._inflight.get(build.tag) is build:
            del self._inflight[build.tag]
        self.log.info("aborting the image build of {tag}: no job waits for it", tag=build.tag)
        build.abort()

    # --- leases and gc (fluster_worker.images.gc) ------------------------------

    def forget(self, tag: str) -> None:
        """``tag`` turned out to be gone from the engine: the next build of it
        asks the engine again (and builds it if need be)."""
        self._present.discard(tag)

    def lease(self, tag: str) -> Callable[[], None]:
        """Mark tag in use (gc keeps it); call the returned function, once or
        more, to release it."""
        return self._images.lease(tag)

    def abort_builds(self) -> None:
        """Worker shutdown: make running builds give up now (their connections are
        shut down) or at their next step."""
        self._stopping.set()
        for build in list(self._inflight.values()):
            build.abort()

    def gc(self) -> Deferred[list[str]]:
        """Remove job images, oldest-unused first, until at most max_images and
        max_image_bytes remain; never a leased or building one. Fires with the
        removed tags. See `ImageGC.gc`."""
        return self._images.gc()

    # --- helpers --------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._reactor.seconds() * 1000)

