"""ImageBuilder: builds (or finds) the Docker image holding a job's Python
environment, and garbage-collects those images.

An image is content-addressed: its tag `fluster-job:<16 hex>` hashes the base
image id, pyproject.toml and uv.lock (or their absence), extras, pip packages,
the runner's source, the uv version, the index options and the CA bundle (see
`fluster_worker.images.dockerfile`). Jobs with the same dependencies share one image.

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

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import docker
import docker.errors
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger

from fluster_worker.common.threads import BlockingPool
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
    file_sha256,
    prepare_context,
    read_project_file,
    runner_command,
    runner_version,
    validate,
    validate_index_url,
    validate_repository,
)
from fluster_worker.images.gc import ImageGC, one_line
from fluster_worker.images.inflight import InFlight, shut_down
from fluster_worker.images.output import BuildOutput

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

# How long a looked-up base image id is trusted before asking the engine again.
_BASE_ID_TTL_S = 10.0


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
        self._client_factory = docker_client_factory
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        self._uv_lock = threading.Lock()
        self._base_image = base_image
        self._work_dir = work_dir
        self._ca_bundle = ca_bundle
        self._index_url = None if index_url is None else validate_index_url(index_url)
        self._extra_index_urls = tuple(validate_index_url(u) for u in extra_index_urls)
        self._uv_bin = uv_bin
        self._repository = validate_repository(repository)
        self._uv_version: str | None = None
        self._inflight: dict[str, InFlight] = {}
        # Tags known to exist on the engine (see the module doc). Reactor thread only.
        self._present: set[str] = set()
        # Per-job inputs that rarely change, kept briefly (filled on pool threads).
        self._memo_lock = threading.Lock()
        self._base_id_memo: tuple[float, str] | None = None
        self._ca_memo: tuple[tuple[int, int, int], str] | None = None
        # Set at shutdown: running builds stop at their next output line, so a
        # stopping worker does not wait for a long dependency install to finish.
        self._stopping = threading.Event()
        # The build a pool thread is running (for the response hook, see _docker).
        self._local = threading.local()
        self._images = ImageGC(
            reactor,
            pool,
            self._docker,
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
            inputs = await self._pool.run(self._collect_inputs, project_dir, extras, pip_packages)
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
            if tag in self._present or await self._pool.run(self._image_exists, tag):
                build.emit([f"using cached image {tag}"])
                result = True
            elif build.aborted.is_set():
                raise BuildError("image build aborted: no job waits for it")
            else:
                build.emit([f"building image {tag}"])
                start = self._reactor.seconds()
                await self._pool.run(self._docker_build, build, inputs)
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

    def _collect_inputs(self, project_dir: Path, extras: list[str], pip_packages: list[str]) -> BuildInputs:
        """Blocking: reads the project files and asks the engine for the base id."""
        pyproject = read_project_file(project_dir / "pyproject.toml")
        uv_lock = read_project_file(project_dir / "uv.lock") if pyproject is not None else None
        try:
            base_id = self._base_image_id()
        except docker.errors.ImageNotFound as e:
            raise BuildError(f"image build failed: base image {self._base_image} not found locally") from e
        except docker.errors.DockerException as e:
            raise BuildError(f"image build failed: docker engine: {one_line(e)}") from e
        try:
            ca_sha256 = None if self._ca_bundle is None else self._ca_sha256(self._ca_bundle)
        except OSError as e:
            raise BuildError(
                f"image build failed: cannot read the CA bundle {self._ca_bundle}: {e.strerror}"
            ) from e
        inputs = BuildInputs(
            base_image_id=base_id,
            pyproject=pyproject,
            uv_lock=uv_lock,
            extras=tuple(extras),
            pip_packages=tuple(pip_packages),
            runner_sha256=runner_version(),
            uv_version=self._uv()[1],
            index_url=self._index_url,
            extra_index_urls=self._extra_index_urls,
            ca_sha256=ca_sha256,
            repository=self._repository,
        )
        # Parses pyproject.toml (may raise InvalidBundle) here, off the reactor.
        if extras and inputs.dependency_mode == "none":
            raise BuildError("extras requested but the bundle's pyproject.toml has no [project] table")
        inputs.key  # noqa: B018 -- computed once, here
        return inputs

    def _base_image_id(self) -> str:
        """Blocking: the base image's id, asked of the engine at most every
        ``_BASE_ID_TTL_S`` (every job needs it; a re-tagged base is seen soon after)."""
        now = time.monotonic()
        with self._memo_lock:
            cached = self._base_id_memo
        if cached is not None and now - cached[0] < _BASE_ID_TTL_S:
            return cached[1]
        base_id = str(self._docker().api.inspect_image(self._base_image)["Id"])
        with self._memo_lock:
            self._base_id_memo = (now, base_id)
        return base_id

    def _ca_sha256(self, path: Path) -> str:
        """Blocking: the CA bundle's hash, computed again only when the file changes."""
        st = path.stat()
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._memo_lock:
            cached = self._ca_memo
        if cached is not None and cached[0] == key:
            return cached[1]
        digest = file_sha256(path)
        with self._memo_lock:
            self._ca_memo = (key, digest)
        return digest

    def _image_exists(self, tag: str) -> bool:
        try:
            self._docker().api.inspect_image(tag)
        except docker.errors.ImageNotFound:
            return False
        return True

    def _docker_build(self, build: InFlight, inputs: BuildInputs) -> None:
        """Blocking: writes the context, runs the build, streams its lines to
        the waiters (through the reactor thread)."""
        uv_bin, _ = self._uv()
        context = prepare_context(self._work_dir, inputs, uv_bin, self._ca_bundle)
        output = BuildOutput()

        def emit(lines: list[str]) -> None:
            if lines:
                cast(IReactorFromThreads, self._reactor).callFromThread(build.emit, lines)

        def stopped() -> BuildError | None:
            if self._stopping.is_set():
                return BuildError("image build aborted: the worker is shutting down")
            if build.aborted.is_set():
                return BuildError("image build aborted: no job waits for it")
            return None

        self._local.build = build
        try:
            if (error := stopped()) is not None:
                raise error
            stream = self._docker().api.build(
                path=str(context),
                tag=inputs.tag,
                rm=True,
                forcerm=True,
                decode=True,
                pull=False,
                labels=inputs.labels(),
            )
            if build.aborted.is_set():
                shut_down(build.response)  # aborted while the request was being sent
            for chunk in stream:
                if (error := stopped()) is not None:
                    # Dropping the stream closes the connection; the engine then
                    # cancels the build.
                    stream.close()
                    raise error
                if "stream" in chunk:
                    emit(output.feed(str(chunk["stream"])))
                elif "error" in chunk or "errorDetail" in chunk:
                    emit(output.flush())
                    detail = chunk.get("errorDetail") or {}
                    message = str(detail.get("message") or chunk.get("error") or "")
                    raise BuildError(output.failure(message))
                elif "status" in chunk:
                    emit([str(chunk["status"])])
            emit(output.flush())
            if (error := stopped()) is not None:
                raise error  # the connection was shut down under the stream
        except BuildError:
            raise
        except Exception as e:  # docker-py and requests errors alike
            if (error := stopped()) is not None:
                raise error from e
            raise BuildError(f"image build failed: docker engine: {one_line(e)}") from e
        finally:
            self._local.build = None
            build.response = None
            shutil.rmtree(context, ignore_errors=True)
        if not self._image_exists(inputs.tag):
            raise BuildError(f"image build failed: {inputs.tag} missing after the build")

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

    def _docker(self) -> docker.DockerClient:
        with self._client_lock:
            if self._client is None:
                self._client = self._client_factory()
                # The client is a requests Session: a response hook hands each
                # docker build its own HTTP response, so that an abort can shut
                # its connection down from the reactor thread.
                hooks = getattr(self._client.api, "hooks", None)
                if isinstance(hooks, dict):
                    hooks.setdefault("response", []).append(self._note_response)
            return self._client

    def _note_response(self, response: Any, *args: Any, **kwargs: Any) -> None:
        build = getattr(self._local, "build", None)
        if build is not None and "/build" in str(getattr(response, "url", "")):
            build.response = response
            if build.aborted.is_set():
                shut_down(response)

    def _uv(self) -> tuple[Path, str]:
        """Blocking, cached: the uv binary copied into images and its version."""
        with self._uv_lock:
            if self._uv_bin is None:
                import uv

                self._uv_bin = Path(uv.find_uv_bin())
            if self._uv_version is None:
                out = subprocess.run(
                    [str(self._uv_bin), "--version"],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=60,
                    env={"PATH": "/usr/bin:/bin"},
                )
                self._uv_version = out.stdout.strip()
            return self._uv_bin, self._uv_version

    def _now_ms(self) -> int:
        return int(self._reactor.seconds() * 1000)

