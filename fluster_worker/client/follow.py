"""Following a submitted job: its log lines as they come (FetchLogs polling), its
end state, and its result, printed for a person at a terminal."""

from __future__ import annotations

import io
import pickle
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from fluster_worker.web.rpc import cluster_pb2 as pb

TERMINAL = frozenset({
    pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_KILLED, pb.JOB_STATE_WORKER_FAILED,
    pb.JOB_STATE_UNSCHEDULABLE,
})
PAGE_LINES = 1000
#: Standard types a result may be made of and still be shown; anything else
#: would mean running code of the pickle's choosing here.
_SAFE_GLOBALS = {("builtins", name) for name in ("set", "frozenset", "complex", "bytearray", "range", "slice")}


class Rpc(Protocol):
    def status(self, job_id: str, include_result: bool = False) -> pb.JobStatus: ...

    def fetch_logs(self, job_id: str, log_filter: pb.FetchLogsFilter) -> list[pb.LogEntry]: ...


class LogCursor:
    """Where the next FetchLogs starts: after the last ``seq`` seen when the worker
    numbers its lines (exact), else after the last timestamp (the contract's way)."""

    def __init__(self) -> None:
        self.after_seq: int | None = None
        self.last_ms = 0
        self.numbered = False

    def next_filter(self) -> pb.FetchLogsFilter:
        if self.numbered and self.after_seq is not None:
            return pb.FetchLogsFilter(after_seq=self.after_seq, max_lines=PAGE_LINES)
        return pb.FetchLogsFilter(start_ms=self.last_ms, max_lines=PAGE_LINES)

    def saw(self, entries: list[pb.LogEntry]) -> None:
        if not entries:
            return
        self.numbered = self.numbered or any(e.seq > 0 for e in entries)
        self.after_seq = entries[-1].seq
        self.last_ms = max(self.last_ms, max(e.timestamp_ms for e in entries))


class Follower:
    def __init__(
        self,
        rpc: Rpc,
        job_id: str,
        out: IO[str],
        err: IO[str],
        *,
        poll_s: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._rpc = rpc
        self._job_id = job_id
        self._out = out
        self._err = err
        self._poll_s = poll_s
        self._sleep = sleep
        self._cursor = LogCursor()

    def drain_logs(self) -> None:
        """Print every line not printed yet."""
        while True:
            entries = self._rpc.fetch_logs(self._job_id, self._cursor.next_filter())
            self._cursor.saw(entries)
            for entry in entries:
                self._print(entry)
            if len(entries) < PAGE_LINES:
                return

    def until_done(self) -> pb.JobStatus:
        """Print the logs live until the job ends; its final status (with result)."""
        while True:
            # The state first: a worker shows a terminal state only once every line
            # is stored, so the drain after it gets the last ones.
            status = self._rpc.status(self._job_id)
            self.drain_logs()
            if status.state in TERMINAL:
                return self._rpc.status(self._job_id, include_result=True)
            self._sleep(self._poll_s)

    def _print(self, entry: pb.LogEntry) -> None:
        if entry.source == "stdout":
            self._out.write(entry.data + "\n")
            self._out.flush()
        else:
            prefix = "" if entry.source == "stderr" else f"[{entry.source}] "
            self._err.write(prefix + entry.data + "\n")
            self._err.flush()


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def show_result(data: bytes) -> str:
    """The job's return value for a terminal, without running code from the pickle:
    plain values (numbers, strings, lists, dicts...) are shown, anything else is
    described (read it with ``cloudpickle.loads`` where you trust it)."""
    if not data:
        return "None"
    try:
        value = _SafeUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        return f"<{len(data)} bytes: a pickle of {e} (not loaded here: use cloudpickle.loads)>"
    except Exception as e:
        return f"<{len(data)} bytes: unreadable pickle ({type(e).__name__})>"
    text = repr(value)
    return text if len(text) <= 10_000 else text[:10_000] + "..."
