"""Measuring and removing a directory tree that a job could have written.

A job may fill its writable directories with symlinks to host paths, swap a
directory for a symlink while it is being walked, nest directories a million
levels deep, or take away its own permissions. ``os.walk`` and ``du`` follow
paths (a swapped directory leads them outside), ``os.fwalk`` and
``shutil.rmtree`` keep one fd (and, in Python 3.11, one stack frame) per level.

The walk here holds ONE directory fd at a time, whatever the depth: it goes
down with ``openat(name, O_NOFOLLOW | O_DIRECTORY)`` and checks that the
directory it opened is the one it listed (device and inode), and goes back up
with ``openat("..")``, checking the parent's identity the same way. A tree that
changes under the walk is not followed anywhere else: a swapped entry is
skipped, a moved directory ends the walk (`TreeChanged`). Symlinks are counted
as entries, never followed.

Blocking: run these on the BlockingPool.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fluster_worker.common.safe_files import DIR_FLAGS

__all__ = ["TreeChanged", "TreeUsage", "remove_tree", "tree_usage"]

_BATCH = 4096  # names listed at a time while removing


class TreeChanged(Exception):
    """A directory was moved while the walk was inside it."""


@dataclass(frozen=True)
class TreeUsage:
    bytes: int  # allocated: st_blocks * 512 of every entry, directories included
    entries: int  # files, directories, links... below the root
    truncated: bool = False  # the walk stopped at ``max_entries``
    changed: bool = False  # a directory moved under the walk: the counts are a lower bound


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _open_child(parent_fd: int, name: str, listed: os.stat_result) -> int | None:
    """The directory ``name`` in ``parent_fd``, if it still is the one listed."""
    fd: int | None
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except PermissionError:
        fd = _open_after_chmod(parent_fd, name)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None  # gone or swapped since it was listed
        raise
    if fd is None:
        return None
    if _identity(os.fstat(fd)) != _identity(listed):
        os.close(fd)
        return None
    return fd


def _open_after_chmod(parent_fd: int, name: str) -> int | None:
    """A worker that is not root meets directories its jobs (same uid) made
    unreadable: give the owner its rights back, through an O_PATH fd (never a
    path that could be a link), and open again."""
    try:
        handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent_fd)
    except OSError:
        return None
    try:
        os.chmod(f"/proc/self/fd/{handle}", 0o700)
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError:
        return None
    finally:
        os.close(handle)


def _up(fd: int, expected: tuple[int, int]) -> int:
    """The parent of ``fd`` (``fd`` is closed), checked to be ``expected``."""
    try:
        parent = os.open("..", DIR_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)
    if _identity(os.fstat(parent)) != expected:
        os.close(parent)
        raise TreeChanged("a directory was moved during the walk")
    return parent


def _walk(
    top_fd: int,
    list_names: Callable[[int], list[str]],
    on_entry: Callable[[int, str, os.stat_result], bool],
    on_leave: Callable[[int, str, tuple[int, int]], None],
    relist: bool = False,
) -> None:
    """Depth first from ``top_fd`` (taken over and closed). ``on_entry(dir_fd,
    name, lstat)`` is called for every entry; returning False stops the walk.
    ``on_leave(parent_fd, name, identity)`` after a directory is done. With
    ``relist``, a directory whose names are used up is listed again until a
    listing is empty (removal lists in batches)."""
    fd = top_fd
    # One frame per level: (identity, names still to visit, name in the parent).
    stack: list[tuple[tuple[int, int], list[str], str]] = []
    try:
        stack.append((_identity(os.fstat(fd)), list_names(fd), ""))
        while stack:
            ident, names, own_name = stack[-1]
            if not names and relist:
                names.extend(list_names(fd))
            if names:
                name = names.pop()
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not on_entry(fd, name, st):
                    return
                if stat.S_ISDIR(st.st_mode):
                    child = _open_child(fd, name, st)
                    if child is not None:
                        os.close(fd)
                        fd = child
                        stack.append((_identity(st), list_names(fd), name))
                continue
            stack.pop()
            if not stack:
                return
            current, fd = fd, -1
            fd = _up(current, stack[-1][0])
            on_leave(fd, own_name, ident)
    finally:
        if fd >= 0:
            os.close(fd)


def _open_top(path: Path) -> int | None:
    """``path`` (its parent is trusted; the last component is not followed)."""
    try:
        return os.open(path, DIR_FLAGS)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def tree_usage(root: Path, max_entries: int = 2_000_000, attempts: int = 3) -> TreeUsage:
    """Allocated bytes and entries under ``root`` (itself included in the bytes);
    an absent root uses nothing. Stops at ``max_entries`` (``truncated``). A walk
    cut short by a moved directory is tried again, ``attempts`` times in all."""
    usage = TreeUsage(0, 0)
    for _ in range(attempts):
        usage = _usage_once(root, max_entries)
        if not usage.changed:
            break
    return usage


def _usage_once(root: Path, max_entries: int) -> TreeUsage:
    fd = _open_top(root)
    if fd is None:
        return TreeUsage(0, 0)
    total = os.fstat(fd).st_blocks * 512
    entries = 0
    stopped = False

    def count(_dir_fd: int, _name: str, st: os.stat_result) -> bool:
        nonlocal total, entries, stopped
        if entries >= max_entries:
            stopped = True
            return False
        entries += 1
        total += st.st_blocks * 512
        return True

    try:
        _walk(fd, _list_all, count, lambda _fd, _name, _ident: None)
    except TreeChanged:
        return TreeUsage(total, entries, changed=True)
    return TreeUsage(total, entries, truncated=stopped)


def remove_tree(root: Path) -> None:
    """Remove ``root`` and everything under it; a missing root is fine. Entries
    that cannot be removed are left, and the last error is raised."""
    fd = _open_top(root)
    if fd is None:
        try:
            os.unlink(root)  # a file or a link where the directory was
        except FileNotFoundError:
            pass
        return
    failures: list[OSError] = []
    # Per directory being emptied in batches, the names of its last batch: a
    # listing with nothing new holds only what could not be removed.
    last_batch: dict[tuple[int, int], set[str]] = {}

    def listing(dir_fd: int) -> list[str]:
        ident = _identity(os.fstat(dir_fd))
        names = _list_batch(dir_fd)
        previous = last_batch.get(ident)
        if previous is not None and previous.issuperset(names):
            return []
        last_batch[ident] = set(names)
        return names

    def remove_entry(dir_fd: int, name: str, st: os.stat_result) -> bool:
        if not stat.S_ISDIR(st.st_mode):
            _remove(dir_fd, name, failures, os.unlink)
        return True

    def leave(parent_fd: int, name: str, ident: tuple[int, int]) -> None:
        last_batch.pop(ident, None)
        _remove(parent_fd, name, failures, os.rmdir)

    try:
        _walk(fd, listing, remove_entry, leave, relist=True)
    except TreeChanged as e:
        failures.append(OSError(errno.EAGAIN, str(e)))
    try:
        os.rmdir(root)
    except FileNotFoundError:
        pass
    except OSError as e:
        failures.append(e)
    if failures:
        raise failures[-1]


def _remove(dir_fd: int, name: str, failures: list[OSError], remove: Callable[..., None]) -> None:
    """``remove(name, dir_fd=dir_fd)`` (unlink or rmdir); a directory made
    read-only by its job (a worker that is not root) is given back its owner's
    rights once."""
    for attempt in (1, 2):
        try:
            remove(name, dir_fd=dir_fd)
            return
        except FileNotFoundError:
            return
        except PermissionError as e:
            if attempt == 2:
                failures.append(e)
                return
            try:
                os.fchmod(dir_fd, 0o700)
            except OSError:
                failures.append(e)
                return
        except OSError as e:
            failures.append(e)
            return


def _list_all(fd: int) -> list[str]:
    return os.listdir(fd)


def _list_batch(fd: int) -> list[str]:
    names: list[str] = []
    with os.scandir(fd) as it:
        for entry in it:
            names.append(entry.name)
            if len(names) >= _BATCH:
                break
    return names
