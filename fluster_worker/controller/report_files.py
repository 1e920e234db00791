"""The files of the ReportQueue (reports.py): one binary ReportJobStateRequest
per file, ``<state_dir>/reports/<seq>.pb``, written atomically; what a starting
queue finds of them (the unreadable ones are discarded)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError
from twisted.logger import Logger

from fluster_worker.controller._types import BlockingRunner
from fluster_worker.web.rpc import cluster_pb2 as pb

__all__ = ["MAX_REPORT_FILE_BYTES", "REPORTS_DIR", "Entry", "load_pending", "report_path", "unlink"]

log = Logger()

REPORTS_DIR = "reports"
MAX_REPORT_FILE_BYTES = 1024 * 1024

_REPORT_FILE = re.compile(r"(\d{1,20})\.pb")


@dataclass(frozen=True)
class Entry:
    seq: int
    request: pb.ReportJobStateRequest


def report_path(directory: Path, seq: int) -> Path:
    return directory / f"{seq:012d}.pb"


def _load_files(directory: Path) -> list[tuple[int, bytes | None]]:
    """(seq, bytes) of every report file, by seq; None for a file too large to be
    ours. Removes temporary files left by a crash mid-write."""
    directory.mkdir(parents=True, exist_ok=True)
    found: list[tuple[int, bytes | None]] = []
    for path in directory.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
            continue
        match = _REPORT_FILE.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        size = path.stat().st_size
        data = path.read_bytes() if size <= MAX_REPORT_FILE_BYTES else None
        found.append((int(match.group(1)), data))
    found.sort(key=lambda item: item[0])
    return found


def unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


async def load_pending(pool: BlockingRunner, directory: Path, next_seq: int) -> tuple[list[Entry], int]:
    """The reports a previous run left in ``directory``, in order, and the
    sequence number of the next one (``next_seq`` when there were none)."""
    entries: list[Entry] = []
    try:
        files = await pool.run(_load_files, directory)
    except Exception as e:
        log.error(
            "cannot read pending job state reports in {dir}: {error}",
            dir=directory,
            error=str(e),
        )
        files = []
        # Never reuse the number of a file we could not see: start above any.
        next_seq = time.time_ns() // 1000
    bad: list[int] = []
    for seq, data in files:
        request = pb.ReportJobStateRequest()
        try:
            if data is None:
                raise DecodeError("file too large")
            request.ParseFromString(data)
        except DecodeError:
            bad.append(seq)
            continue
        entries.append(Entry(seq, request))
    for seq in bad:
        path = report_path(directory, seq)
        log.error("discarding unreadable report file {path}", path=path)
        try:
            await pool.run(unlink, path)
        except OSError as e:
            log.error("cannot remove {path}: {error}", path=path, error=str(e))
    if files:
        next_seq = files[-1][0] + 1
        log.info(
            "{count} job state reports pending from a previous run",
            count=len(entries),
        )
    return entries, next_seq
