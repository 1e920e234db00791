"""Builds the whole worker from a WorkerConfig: what ``makeService`` returns."""

from __future__ import annotations

from typing import Any

from fluster_worker.app import build_site
from fluster_worker.config import WorkerConfig
from fluster_worker.controller import load_or_create_worker_id
from fluster_worker.worker import Worker


def assemble(config: WorkerConfig, reactor: Any, **overrides: Any) -> Worker:
    # Once, before the reactor runs: a small file read at start-up.
    worker_id = load_or_create_worker_id(config.state_dir, config.worker_id)
    worker = Worker(config, reactor, worker_id=worker_id, **overrides)
    worker.add_web(build_site(worker))
    return worker
