"""The worker's side of the Controller: joining it (RegisterWorker + heartbeat),
reporting job states to it (ReportJobState), and the facts both need.

Modules: `client` (Connect unary calls over treq), `link` (the worker's
registration and report queue), `registration`, `reports` (with `report_files`),
`machine` (local facts and the advertised address), `identity` (worker id),
`address` (the controller option; the address job containers use), `backoff`.
"""

from fluster_worker.common.backoff import Backoff
from fluster_worker.controller.address import (
    container_controller_address,
    normalize_controller_url,
    parse_controller_address,
)
from fluster_worker.controller.client import (
    ControllerCaller,
    ControllerClient,
    ControllerError,
    ControllerUnavailable,
)
from fluster_worker.controller.identity import load_or_create_worker_id
from fluster_worker.controller.registration import (
    Registration,
    RegistrationAdvert,
    RegistrationStatus,
)
from fluster_worker.controller.reports import ReportQueue

__all__ = [
    "Backoff",
    "ControllerCaller",
    "ControllerClient",
    "ControllerError",
    "ControllerUnavailable",
    "Registration",
    "RegistrationAdvert",
    "RegistrationStatus",
    "ReportQueue",
    "container_controller_address",
    "load_or_create_worker_id",
    "normalize_controller_url",
    "parse_controller_address",
]
