"""When a LogFollower stops reading its tail's pipes for a while (the output
waits in the pipe, and in the engine's log, meanwhile):

* ``disk``: more than ``max_pending`` appended bytes wait for the disk (the
  writer is behind), so memory stays bounded and Docker waits;
* ``budget``: the followers' shared budget of reactor time is spent
  (ingest.py), so that a log flood cannot starve the RPC;
* ``batch``: the docker CLI writes each log message with its own write();
  after a read that drained a pipe, reading pauses for ``read_delay_s`` so that
  the next reads find full pipes (the reactor wakes up per 8 KiB, not per line).
"""

from __future__ import annotations

from typing import Any

from fluster_worker.logs.docker_cli import TailProtocol
from fluster_worker.logs.ingest import IngestBudget
from fluster_worker.logs.joblog import JobLog

__all__ = ["pace_reads"]

_FULL_READ = 8192  # what Twisted's process reader asks for at a time


def pace_reads(
    reactor: Any,
    protocol: TailProtocol,
    data: bytes,
    budget: IngestBudget,
    job_log: JobLog,
    max_pending: int,
    read_delay: float,
) -> None:
    """After ``data`` was read and stored: pause the pipes for whichever reasons
    now hold (each pause ends by itself)."""
    if "budget" not in protocol.pauses and budget.exhausted:
        # The followers have parsed their share of the reactor's time: the
        # output waits in the pipe (and the engine's log) meanwhile.
        protocol.pause("budget")
        budget.wait().addCallback(lambda _: protocol.unpause("budget"))
    if "disk" not in protocol.pauses and job_log.pending_bytes > max_pending:
        protocol.pause("disk")
        job_log.flush(sync=False).addBoth(lambda _: protocol.unpause("disk"))
    if len(data) < _FULL_READ and read_delay > 0 and "batch" not in protocol.pauses:
        # The pipe is drained: let it fill for a moment rather than waking up
        # for every few lines docker writes (see the module doc).
        protocol.pause("batch")
        reactor.callLater(read_delay, protocol.unpause, "batch")
