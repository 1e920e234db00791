"""The worker id: configured, or generated once and kept in ``state_dir/worker_id``.

Called once at startup (from makeService, before the reactor runs), so the small
file I/O here is synchronous.
"""

from __future__ import annotations

import re
import secrets
import socket
from pathlib import Path

from twisted.logger import Logger

from fluster_worker.common.files import write_atomically

log = Logger()

WORKER_ID_FILE = "worker_id"
MAX_WORKER_ID_LENGTH = 128

_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize(text: str) -> str:
    """Runs of characters outside [A-Za-z0-9._-] become one '-'."""
    return _UNSAFE.sub("-", text).strip("-.")


def generate_worker_id(hostname: str | None = None) -> str:
    """ "worker-<hostname>-<8 hex>", sanitized and at most 128 characters."""
    host = sanitize(hostname if hostname is not None else socket.gethostname())[:100] or "host"
    return f"worker-{host}-{secrets.token_hex(4)}"


def validate_worker_id(worker_id: str) -> str:
    """A worker id names containers and files: 1-128 of [A-Za-z0-9._-], starting with
    a letter or digit. Raises ValueError (one line) otherwise."""
    value = worker_id.strip()
    if not _VALID.fullmatch(value):
        raise ValueError(
            f"worker id {worker_id[:200]!r} must be 1-{MAX_WORKER_ID_LENGTH} letters, digits,"
            " '.', '_' or '-', starting with a letter or digit"
        )
    return value


def load_or_create_worker_id(state_dir: Path, configured: str | None) -> str:
    """The configured id when given (validated, not stored); else the id kept in
    ``state_dir/worker_id``; else a new one, written atomically there so restarts keep
    the identity. An unreadable or invalid stored id is replaced (and logged)."""
    if configured is not None and configured.strip():
        return validate_worker_id(configured)
    path = state_dir / WORKER_ID_FILE
    try:
        stored = path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        stored = None
    if stored is not None:
        try:
            return validate_worker_id(stored)
        except ValueError:
            log.warn("ignoring invalid stored worker id in {path}; generating a new one", path=path)
    worker_id = generate_worker_id()
    write_atomically(path, (worker_id + "\n").encode("ascii"))
    log.info("generated worker id {worker_id} (kept in {path})", worker_id=worker_id, path=path)
    return worker_id
