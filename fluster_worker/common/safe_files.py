"""Reading a file that a job could have written, without following its links.

A job controls every name under its writable mounts (its out dir, /workdir,
/tmp): any of them may be a symlink to a host file, a FIFO that blocks an open,
a directory, or a huge file. The worker runs as root, so it must never open such
a path the ordinary way. Here:

* the ``root`` directory is trusted (a worker path; it may contain the
  operator's links) and opened normally; every component below it is opened
  relative to its parent's fd with ``O_NOFOLLOW``;
* a file's kind is checked with ``lstat`` *before* it is opened (a FIFO or a
  device is never opened) and its identity with ``fstat`` after (no swap in
  between); the open is ``O_NONBLOCK`` and ``O_NOCTTY`` all the same;
* at most ``limit`` bytes are read.

Errors: `UnsafeFile` (one line naming the path relative to ``root`` and what it
is instead of a regular file) and `FileTooLarge`. Every function blocks: run it
on the BlockingPool. Every fd opened here is closed on every path.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["FileTooLarge", "UnsafeFile", "kind_of", "open_dir", "probe_regular", "read_regular"]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CHUNK = 1 << 20


class UnsafeFile(Exception):
    """Not a regular file where one was expected (a symlink, a FIFO, a directory...)."""


class FileTooLarge(Exception):
    def __init__(self, shown: str, size: int, limit: int) -> None:
        super().__init__(f"{shown} is larger than {limit} bytes")
        self.size = size
        self.limit = limit


def kind_of(st: os.stat_result) -> str:
    """What an lstat result is, in words ("a symbolic link", "a FIFO", ...)."""
    mode = st.st_mode
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "a special file"


def _split(relative: str | Sequence[str]) -> list[str]:
    parts = relative.split("/") if isinstance(relative, str) else list(relative)
    if not parts or any(p in ("", ".", "..") or "/" in p or "\x00" in p for p in parts):
        raise ValueError(f"not a plain relative path: {relative!r}")
    return parts


class _Absent(Exception):
    pass


def _refuse(dir_fd: int, name: str, shown: str, expected: str) -> UnsafeFile:
    """The UnsafeFile for ``name`` (in ``dir_fd``), saying what it is instead."""
    try:
        what = kind_of(os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
    except OSError:
        what = "not accessible"
    return UnsafeFile(f"{shown} is {what}, not {expected}")


@contextmanager
def open_dir(root: Path, relative: str | Sequence[str] = ()) -> Iterator[int]:
    """An fd of the directory ``root/relative``, each component below ``root``
    opened without following links. FileNotFoundError when a component is
    missing; UnsafeFile when one is not a directory."""
    parts = _split(relative) if relative else []
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(parts):
            try:
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refuse(fd, name, "/".join(parts[: i + 1]), "a directory") from None
                raise
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


@contextmanager
def _open_regular(root: Path, relative: str | Sequence[str]) -> Iterator[tuple[int, os.stat_result, str]]:
    """(fd, fstat, shown name) of the regular file ``root/relative``; _Absent if
    it (or a directory on the way) does not exist."""
    parts = _split(relative)
    shown = "/".join(parts)
    try:
        with open_dir(root, parts[:-1]) as dir_fd:
            name = parts[-1]
            try:
                before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise _Absent() from None
            if not stat.S_ISREG(before.st_mode):
                raise UnsafeFile(f"{shown} is {kind_of(before)}, not a regular file")
            try:
                fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                raise _Absent() from None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise _refuse(dir_fd, name, shown, "a regular file") from None
                raise
    except FileNotFoundError:
        raise _Absent() from None
    try:
        after = os.fstat(fd)
        if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise UnsafeFile(f"{shown} was replaced while being opened")
        yield fd, after, shown
    finally:
        os.close(fd)


def probe_regular(root: Path, relative: str | Sequence[str], limit: int) -> int | None:
    """The size of the regular file ``root/relative``, None when it does not exist.
    UnsafeFile when it (or a directory on the way) is something else;
    FileTooLarge when it is over ``limit`` bytes."""
    try:
        with _open_regular(root, relative) as (_fd, st, shown):
            if st.st_size > limit:
                raise FileTooLarge(shown, st.st_size, limit)
            return st.st_size
    except _Absent:
        return None


def read_regular(root: Path, relative: str | Sequence[str], limit: int) -> bytes | None:
    """The bytes of the regular file ``root/relative`` (at most ``limit``), None
    when it does not exist; UnsafeFile or FileTooLarge as `probe_regular`."""
    try:
        with _open_regular(root, relative) as (fd, st, shown):
            if st.st_size > limit:
                raise FileTooLarge(shown, st.st_size, limit)
            chunks: list[bytes] = []
            size = 0
            while chunk := os.read(fd, min(_CHUNK, limit + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:  # grew since the fstat
                    raise FileTooLarge(shown, size, limit)
            return b"".join(chunks)
    except _Absent:
        return None
