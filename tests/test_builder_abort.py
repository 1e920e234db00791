"""ImageBuilder aborts a build that no job waits for any more: against a fake
docker client whose build streams from a socket, on real pool threads (no engine).
The abort shuts the socket down, so the pool thread returns at once even while
the build prints nothing (a long, silent dependency download)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater

from fluster_worker.common.threads import BlockingPool
from fluster_worker.images.builder import BuildError, ImageBuilder


class _Raw:
    """What the builder's abort reaches through: ``response.raw._connection.sock``."""

    def __init__(self, sock: socket.socket) -> None:
        self._connection = type("Connection", (), {"sock": sock})()


class _Response:
    def __init__(self, sock: socket.socket) -> None:
        self.url = "http+docker://localhost/v1.41/build?t=fluster-job%3Ax"
        self.raw = _Raw(sock)


class FakeBuildApi:
    """``build()`` answers like docker-py: a response (seen by the session's
    hooks), then chunks read from a socket the test writes to."""

    def __init__(self) -> None:
        self.hooks: dict[str, list[Any]] = {"response": []}
        self.builds = 0
        self.started = threading.Event()
        self.ended = threading.Event()  # the stream of the last build finished
        self.feeds: list[socket.socket] = []
        self.built: set[str] = set()

    def inspect_image(self, name: str) -> dict[str, Any]:
        if name == "base:1":
            return {"Id": "sha256:" + "b" * 64}
        if name in self.built:
            return {"Id": "sha256:" + "c" * 64}
        raise docker.errors.ImageNotFound(f"no such image: {name}")

    def build(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        self.builds += 1
        reader, writer = socket.socketpair()
        self.feeds.append(writer)
        self.ended.clear()
        response = _Response(reader)
        for hook in self.hooks["response"]:
            hook(response)
        tag = kwargs["tag"]

        def stream() -> Iterator[dict[str, Any]]:
            try:
                self.started.set()
                yield {"stream": "Step 1/2 : FROM base\n"}
                buffer = b""
                while True:
                    data = reader.recv(4096)  # blocks: the build prints nothing for now
                    if not data:
                        return  # the connection went away: the engine cancels the build
                    buffer += data
                    if b"done" in buffer:
                        self.built.add(tag)
                        yield {"stream": "Successfully tagged " + tag + "\n"}
                        return
            finally:
                reader.close()
                self.ended.set()

        return stream()


class FakeClient:
    def __init__(self) -> None:
        self.api = FakeBuildApi()


async def until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "p"\nversion = "0.1"\ndependencies = []\n')
    return root


@pytest.fixture
def builder(tmp_path: Path) -> Iterator[tuple[ImageBuilder, FakeBuildApi, BlockingPool]]:
    pool = BlockingPool(reactor, "abort-test", max_threads=4)  # type: ignore[arg-type]
    pool.startService()
    client = FakeClient()
    built = ImageBuilder(reactor, pool, lambda: client, "base:1", tmp_path / "work")  # type: ignore[arg-type]
    yield built, client.api, pool
    built.abort_builds()
    pool.pool.stop()


@pytest_twisted.ensureDeferred
async def test_a_build_nobody_waits_for_is_aborted_and_frees_its_thread(
    builder: tuple[ImageBuilder, FakeBuildApi, BlockingPool], project: Path
) -> None:
    build, api, pool = builder
    lines: list[str] = []
    waiting = build.build(project, [], [], lines.append)
    await until(lambda: any(line.startswith("Step 1/2") for line in lines), "the build to start")
    waiting.cancel()
    with pytest.raises(CancelledError):
        await waiting
    # No output comes, yet the thread returns: its connection was shut down.
    await until(api.ended.is_set, "the docker build to end")
    await until(lambda: not pool.pool.working, "the pool thread to be free")
    assert not any("Successfully" in line for line in lines)

    again = build.build(project, [], [], lambda line: None)  # a later job builds afresh
    await until(lambda: api.builds == 2 and api.started.is_set(), "a second build")
    api.feeds[-1].sendall(b"done")
    result = await again
    assert not result.from_cache


@pytest_twisted.ensureDeferred
async def test_a_build_someone_still_waits_for_goes_on(
    builder: tuple[ImageBuilder, FakeBuildApi, BlockingPool], project: Path
) -> None:
    build, api, _pool = builder
    first = build.build(project, [], [], lambda line: None)
    second = build.build(project, [], [], lambda line: None)
    await until(api.started.is_set, "the build to start")
    first.cancel()
    with pytest.raises(CancelledError):
        await first
    assert not api.ended.is_set()
    api.feeds[-1].sendall(b"done")
    result = await second
    assert api.builds == 1 and result.tag in api.built


@pytest_twisted.ensureDeferred
async def test_shutdown_aborts_running_builds_at_once(
    builder: tuple[ImageBuilder, FakeBuildApi, BlockingPool], project: Path
) -> None:
    build, api, _pool = builder
    waiting = build.build(project, [], [], lambda line: None)
    await until(api.started.is_set, "the build to start")
    build.abort_builds()
    with pytest.raises(BuildError, match="shutting down"):
        await waiting
    assert api.ended.is_set()
