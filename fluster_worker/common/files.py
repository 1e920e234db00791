"""Small blocking file helpers (run them on the BlockingPool from the reactor)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(
    path: Path, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the
    whole new one: a temporary file beside it, fsync, rename, fsync the directory.
    The file gets exactly ``mode`` (0600 by default: records hold secrets) and,
    when given, ``owner`` (uid, gid)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # not narrowed by the umask, nor left wider by an old tmp file
            if owner is not None:
                os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def make_private_dir(path: Path) -> None:
    """``path`` and its missing parents, ``path`` itself 0700 (also when it existed)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in ``directory`` durable (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
