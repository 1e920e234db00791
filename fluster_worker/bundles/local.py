"""Where a local bundle (an absolute path or ``file://``) may lie, and opening it.

With ``--bundle-roots`` given, a bundle is read only when the path, with its
symbolic links and ``..`` resolved, lies under one of the roots (themselves
resolved). The file is then opened from the root down, one component at a time,
relative to its parent's fd and with ``O_NOFOLLOW`` (`common/safe_files.py`): a
link swapped in after the check, at any depth, makes the open fail instead of
leading elsewhere. Paths outside the roots are refused before anything below them
is opened or stat'ed, so the answer says nothing about what exists there.

Without roots, any path the worker can read is a bundle (the behaviour of old
workers; the cache logs a warning at start).

Every function blocks: run it on the BlockingPool.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from fluster_worker.common.safe_files import FILE_FLAGS, UnsafeFile, open_dir
from fluster_worker.common.text import one_line

__all__ = ["LocalBundleError", "open_bundle", "stat_bundle", "under_roots"]

_ANY_PATH_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO must not hang


class LocalBundleError(Exception):
    """One line: the bundle file is missing, refused or unreadable."""


def under_roots(path: str, roots: Sequence[str]) -> tuple[str, list[str]] | None:
    """(the resolved root, the components below it) of ``path``; None when it
    lies under none of ``roots``."""
    real = os.path.realpath(path)
    for root in roots:
        base = os.path.realpath(root)
        if real != base and os.path.commonpath([base, real]) == base:
            return base, os.path.relpath(real, base).split(os.sep)
    return None


def open_bundle(path: str, roots: Sequence[str]) -> tuple[int, os.stat_result]:
    """An fd (O_RDONLY) and fstat of the regular file ``path``, refused outside
    ``roots`` when some are given. The caller closes the fd."""
    shown = one_line(path, 200)
    if not roots:
        try:
            fd = os.open(path, _ANY_PATH_FLAGS)
        except FileNotFoundError:
            raise LocalBundleError(f"bundle not found: {shown}") from None
        except (OSError, ValueError) as e:
            raise LocalBundleError(f"cannot read bundle {shown}: {_reason(e)}") from None
    else:
        fd = _open_beneath(path, roots, shown)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LocalBundleError(f"bundle is not a regular file: {shown}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def stat_bundle(path: str, roots: Sequence[str]) -> os.stat_result:
    """The stat of the regular file ``path`` (refused as `open_bundle` refuses)."""
    if roots:
        fd, st = open_bundle(path, roots)
        os.close(fd)
        return st
    shown = one_line(path, 200)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LocalBundleError(f"bundle not found: {shown}") from None
    except (OSError, ValueError) as e:
        raise LocalBundleError(f"cannot read bundle {shown}: {_reason(e)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise LocalBundleError(f"bundle is not a regular file: {shown}")
    return st


def _open_beneath(path: str, roots: Sequence[str], shown: str) -> int:
    try:
        found = under_roots(path, roots)
    except (OSError, ValueError) as e:
        raise LocalBundleError(f"cannot read bundle {shown}: {_reason(e)}") from None
    if found is None:
        raise LocalBundleError(f"bundle path is outside the allowed roots (--bundle-roots): {shown}")
    root, parts = found
    try:
        with open_dir(Path(root), parts[:-1]) as dir_fd:
            name = parts[-1]
            before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(before.st_mode):
                # A link here was resolved by the check: it changed since.
                what = "changed while being opened" if stat.S_ISLNK(before.st_mode) else "is not a regular file"
                raise LocalBundleError(f"bundle {what}: {shown}")
            fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise LocalBundleError(f"bundle not found: {shown}") from None
    except UnsafeFile:  # a directory on the way became a link or a file
        raise LocalBundleError(f"bundle changed while being opened: {shown}") from None
    except LocalBundleError:
        raise
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and e.errno == errno.ELOOP:
            raise LocalBundleError(f"bundle changed while being opened: {shown}") from None
        raise LocalBundleError(f"cannot read bundle {shown}: {_reason(e)}") from None
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise LocalBundleError(f"bundle changed while being opened: {shown}")
    return fd


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return one_line(str(e), 200) or type(e).__name__
