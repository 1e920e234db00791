"""The Docker side of an ImageBuilder, blocking (pool threads): one lazily made
docker client, whether an image exists, and a docker build streamed to its
waiters. Each build's HTTP response is noted (a requests response hook), so
that an abort can shut its connection down from the reactor thread and the
engine then cancels the build."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import docker
import docker.errors
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime

from fluster_worker.images.dockerfile import BuildError, BuildInputs, prepare_context
from fluster_worker.images.gc import one_line
from fluster_worker.images.inflight import InFlight, shut_down
from fluster_worker.images.output import BuildOutput

__all__ = ["BuildEngine"]


class BuildEngine:
    """Builds in ``work_dir`` (a context directory per build) with the client
    of ``client_factory``. ``stopping`` is set at worker shutdown: running builds
    stop at their next output line."""

    def __init__(
        self,
        reactor: IReactorTime,
        client_factory: Callable[[], docker.DockerClient],
        work_dir: Path,
        ca_bundle: Path | None,
        stopping: threading.Event,
    ) -> None:
        self._reactor = reactor
        self._client_factory = client_factory
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        self._work_dir = work_dir
        self._ca_bundle = ca_bundle
        self._stopping = stopping
        # The build a pool thread is running (for the response hook, see client).
        self._local = threading.local()

    def client(self) -> docker.DockerClient:
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

    def image_exists(self, tag: str) -> bool:
        try:
            self.client().api.inspect_image(tag)
        except docker.errors.ImageNotFound:
            return False
        return True

    def build(self, build: InFlight, inputs: BuildInputs, uv: Callable[[], tuple[Path, str]]) -> None:
        """Blocking: writes the context (with the uv binary ``uv()`` names),
        runs the build, streams its lines to the waiters (through the reactor
        thread)."""
        uv_bin, _ = uv()
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
            stream = self.client().api.build(
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
        if not self.image_exists(inputs.tag):
            raise BuildError(f"image build failed: {inputs.tag} missing after the build")
