"""Helpers for end-to-end tests: bundles, entry points as the clients pickle
them, and an in-process worker on the real reactor and the real engine."""

from __future__ import annotations

import dataclasses
import sys
import time
import types
import uuid
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import cloudpickle
from twisted.internet import reactor
from twisted.internet.task import deferLater

from fluster_worker.config import WorkerConfig
from fluster_worker.testing.client import WorkerClient
from fluster_worker.web.rpc import cluster_pb2 as pb
from fluster_worker.worker import Worker, assemble

CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_KILLED, pb.JOB_STATE_WORKER_FAILED}


def _install_client_types() -> type:
    """The clients' ``fluster.cluster.types.Entrypoint``, as a module of its own, so
    that cloudpickle pickles it by reference exactly as the real clients do."""
    if "fluster.cluster.types" in sys.modules:
        return sys.modules["fluster.cluster.types"].Entrypoint  # type: ignore[no-any-return]
    fluster = types.ModuleType("fluster")
    cluster = types.ModuleType("fluster.cluster")
    mod = types.ModuleType("fluster.cluster.types")

    @dataclasses.dataclass
    class Entrypoint:
        callable: Any
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    Entrypoint.__module__ = "fluster.cluster.types"
    Entrypoint.__qualname__ = "Entrypoint"
    mod.Entrypoint = Entrypoint  # type: ignore[attr-defined]
    fluster.cluster = cluster  # type: ignore[attr-defined]
    cluster.types = mod  # type: ignore[attr-defined]
    sys.modules.update({"fluster": fluster, "fluster.cluster": cluster, "fluster.cluster.types": mod})
    return Entrypoint


Entrypoint = _install_client_types()


def entrypoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bytes:
    """``cloudpickle.dumps(Entrypoint(callable, args, kwargs))``, as the clients send it.
    Test functions are pickled by value: their module does not exist in the image."""
    cloudpickle.register_pickle_by_value(sys.modules[fn.__module__])
    return cloudpickle.dumps(Entrypoint(fn, args, kwargs))  # type: ignore[no-any-return]


def make_bundle(
    directory: Path,
    dependencies: tuple[str, ...] = (),
    files: dict[str, str] | None = None,
    nonce: str = "",
) -> Path:
    """A zip of a tiny Python project; ``nonce`` makes its dependency files unique."""
    directory.mkdir(parents=True, exist_ok=True)
    deps = ", ".join(f'"{d}"' for d in dependencies)
    pyproject = (
        f"# {nonce}\n" if nonce else ""
    ) + f'[project]\nname = "demo"\nversion = "0.1.0"\nrequires-python = ">=3.10"\ndependencies = [{deps}]\n'
    path = directory / f"bundle-{uuid.uuid4().hex[:8]}.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pyproject.toml", pyproject)
        z.writestr("data.txt", "hello from the bundle\n")
        for name, text in (files or {}).items():
            z.writestr(name, text)
    return path


class Harness:
    def __init__(self, worker: Worker, url: str) -> None:
        self.worker = worker
        self.url = url
        self.client = WorkerClient(url)

    async def wait_state(
        self, job_id: str, states: set[int] | None = None, timeout: float = 300
    ) -> pb.JobStatus:
        """Poll GetJobStatus with a deadline until the job is in one of ``states``."""
        wanted = states or TERMINAL
        deadline = time.monotonic() + timeout
        while True:
            status = await self.client.status(job_id, include_result=True)
            if status.state in wanted:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {pb.JobState.Name(status.state)}: {status}")
            await deferLater(reactor, 0.05, lambda: None)

    async def run(self, request: pb.RunJobRequest, timeout: float = 300) -> pb.JobStatus:
        await self.client.run_job(request)
        return await self.wait_state(request.job_id, timeout=timeout)


def worker_config(tmp_path: Path, **overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = dict(
        listen="tcp:0:interface=127.0.0.1",
        cache_dir=tmp_path / "cache",
        state_dir=tmp_path / "state",
        worker_id=f"t{uuid.uuid4().hex[:8]}",
        ca_bundle=CA_BUNDLE,
        max_concurrent_jobs=4,
        # A test worker that stops takes its jobs with it (no container outlives
        # the test); the tests of re-adoption ask for the default.
        stop_jobs_on_exit=True,
    )
    values.update(overrides)
    return WorkerConfig(**values)


async def start_worker(config: WorkerConfig) -> Harness:
    worker = assemble(config, reactor)
    worker.startService()
    assert worker.web is not None
    port = await worker.web.when_listening()
    return Harness(worker, f"http://127.0.0.1:{port}")


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)
