"""The node's conditions: what stops the worker from taking new work, and why
(the Docker engine unreachable, the disk nearly full). Read by the job core
(RunJob refuses), the web layer (health, dashboard, metrics) and the controller
link (heartbeats pause)."""

from fluster_worker.node.conditions import Condition, NodeConditions
from fluster_worker.node.disk import DiskWatch

__all__ = ["Condition", "DiskWatch", "NodeConditions"]
