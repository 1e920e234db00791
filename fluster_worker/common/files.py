"""Small blocking file helpers (run them on the BlockingPool from the reactor)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the
    whole new one: a temporary file beside it, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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


def read_untrusted(directory: Path, name: str, max_bytes: int) -> tuple[bytes, int] | None:
    """Read a file that a job (hostile) could have written: ``directory/name`` opened
    relative to the directory's fd, never through a symlink (O_NOFOLLOW on both),
    never blocking on a FIFO (O_NONBLOCK), only if it is a regular file. Returns
    its first ``max_bytes`` bytes and its size (more than ``len(data)`` when it is
    larger), or None when it is absent, a symlink or not a regular file."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a plain file name: {name[:80]!r}")
    nofollow = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | nofollow)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # the directory itself is a symlink
            return None
        raise
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | nofollow, dir_fd=dir_fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a socket or FIFO
                return None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None
            chunks: list[bytes] = []
            left = max_bytes
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            data = b"".join(chunks)
            return data, max(info.st_size, len(data))
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)
