"""docker-py access for the container runtime: one lazily made client, calls run on the
BlockingPool, and Docker or transport errors turned into a one-line ``ContainerError``.

Shared by ``ContainerRuntime`` (fluster_worker.containers.runtime) and its exit watcher
(fluster_worker.containers.events), whose events thread uses the same client.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import docker
import docker.errors
import requests
from twisted.internet.defer import Deferred

from fluster_worker.common.text import one_line
from fluster_worker.common.threads import BlockingPool

__all__ = ["ContainerError", "Engine", "engine_unreachable", "explain", "image_missing"]

T = TypeVar("T")


class ContainerError(Exception):
    """A Docker operation failed; the message is one line naming the cause."""


def explain(exc: BaseException) -> str:
    """The cause of a docker-py or transport error, on one line."""
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return one_line(str(exc.explanation))
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "Docker engine unreachable: " + one_line(str(exc), 200)
    return one_line(str(exc) or type(exc).__name__)


def engine_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the engine did
    not answer at all: no socket, connection refused or reset."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, requests.exceptions.ConnectionError):
            return True
        if isinstance(current, ContainerError) and "Docker engine unreachable" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def image_missing(exc: BaseException) -> bool:
    """Whether ``exc`` (a ContainerError from a create) says its image does not exist."""
    cause = exc.__cause__ if isinstance(exc, ContainerError) else exc
    return isinstance(cause, docker.errors.ImageNotFound)


class Engine:
    """The docker client of one runtime, and calls on it through the BlockingPool."""

    def __init__(self, pool: BlockingPool, client_factory: Callable[[], docker.DockerClient]) -> None:
        self._pool = pool
        self._client_factory = client_factory
        # The one client (pool threads and the events thread share it), made lazily off
        # the reactor thread (docker.from_env does I/O). It belongs to whoever supplied
        # the factory (which may hand the same client to others): never closed here.
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()

    def api(self) -> Any:
        """The low-level docker APIClient (pool threads and the events thread only)."""
        with self._client_lock:
            if self._client is None:
                self._client = self._client_factory()
            return self._client.api

    def call(self, what: str, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``f(api, *args)`` on the pool; docker and transport errors become
        ContainerError("<what> failed: <cause>")."""

        def run() -> T:
            try:
                return f(self.api(), *args)
            except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
                raise ContainerError(f"{what} failed: {explain(e)}") from e

        return self._pool.run(run)
