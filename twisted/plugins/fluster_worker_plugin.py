"""twistd plugin: `twistd fluster-worker`. Kept import-light: no reactor here."""

from twisted.application.service import ServiceMaker

flusterWorker = ServiceMaker(
    "fluster-worker",
    "fluster_worker.main",
    "The Fluster worker: runs Controller jobs in isolated Docker containers.",
    "fluster-worker",
)
