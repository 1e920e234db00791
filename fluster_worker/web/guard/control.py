"""Whether the caller of a page may change state (kill a job), as the gate decided.

The access gate (``gate.AccessGate``) decides every request; for a page it
also asks its own address rules whether the same caller could change state,
and records the answer on the request (``record``). The pages read it
(``control_of``) to show the Kill button only to callers whose kill would pass,
and a short note to the others. The answer is a hint for the page: the kill
itself is a POST, which the gate decides again.

A request the gate never saw (an app served without one) may do anything: no
POST of it is refused either.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.web.server import Request

from fluster_worker.web.guard.callers import Rule

#: The request attribute the gate records its answer in.
ATTRIBUTE = "fluster_worker_control"


@dataclass(frozen=True)
class Control:
    """``allowed``: the caller's state changes would pass the gate; otherwise
    ``note`` says so in one line (never the token)."""

    allowed: bool
    note: str = ""


ALLOWED = Control(True)


def record(request: Request, control: Control) -> None:
    setattr(request, ATTRIBUTE, control)


def control_of(request: Request) -> Control:
    """What the gate recorded for the request; allowed when no gate ran."""
    control = getattr(request, ATTRIBUTE, None)
    return control if isinstance(control, Control) else ALLOWED


def refused(rule: Rule, caller: str, container_reason: str | None = None) -> Control:
    """The note for a caller the rules refuse state changes: who may, and why not this one."""
    if container_reason is not None:
        return Control(False, f"read-only: {container_reason}")
    return Control(
        False, f"read-only: kills are allowed from {rule.describe()} (see --allow-control-from), not from {caller}"
    )
