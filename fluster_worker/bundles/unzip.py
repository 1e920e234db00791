"""Blocking work on untrusted bundle bytes: a capped, hashed copy and a safe unzip.

Every function here blocks: call them through ``BlockingPool.run``, never on the
reactor. Each takes a ``threading.Event`` that aborts it between chunks (the
caller sets it when nobody waits for the result any more); an aborted or failed
call removes what it created. Errors are `UnzipError` (one line naming the
cause) or `Aborted`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import struct
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fluster_worker.bundles import local
from fluster_worker.common.safe_tree import tree_usage
from fluster_worker.common.text import one_line

CHUNK = 1024 * 1024
_DRIVE = re.compile(r"^[A-Za-z]:")
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
# zipfile materializes the whole central directory before we can count members;
# bound its size first. A real entry is 46 bytes plus its name and extra fields.
_CD_BYTES_PER_MEMBER = 256
_CD_BYTES_MIN = 1024 * 1024
_MAX_NAME = 4096  # PATH_MAX
_MAX_DEPTH = 256

FileKey = tuple[str, int, int, int, int]  # (path, size, mtime_ns, dev, inode)


class UnzipError(Exception):
    """A bundle file is missing, too large, corrupt or unsafe."""


class Aborted(Exception):
    """The abort event was set."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_members: int


def oneline(text: str, limit: int = 200) -> str:
    """Untrusted text squeezed into one short line."""
    return one_line(text, limit)


def stat_key(path: str, roots: Sequence[str] = ()) -> FileKey:
    """The cache key of a local bundle file: changes whenever the file does.
    ``roots``: where it may lie (`local.py`); none: anywhere."""
    try:
        return _key(path, local.stat_bundle(path, roots))
    except local.LocalBundleError as e:
        raise UnzipError(str(e)) from None


def copy_file(
    path: str, dest: Path, max_bytes: int, abort: threading.Event, roots: Sequence[str] = ()
) -> tuple[FileKey, str]:
    """Copy a local bundle to ``dest``; returns its key and the sha256 of the copy."""
    try:
        fd, before = local.open_bundle(path, roots)
    except local.LocalBundleError as e:
        raise UnzipError(str(e)) from None
    try:
        src = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with src:
        digest = copy_stream(src, dest, max_bytes, abort)
        if _key(path, os.fstat(src.fileno())) != _key(path, before):
            dest.unlink(missing_ok=True)
            raise UnzipError(f"bundle changed while being read: {oneline(path)}")
    return _key(path, before), digest


def copy_stream(src: IO[bytes], dest: Path, max_bytes: int, abort: threading.Event) -> str:
    """Copy at most ``max_bytes`` from ``src`` to a new file ``dest``; returns the sha256."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(dest, "xb") as out:
            while chunk := src.read(CHUNK):
                if abort.is_set():
                    raise Aborted()
                size += len(chunk)
                if size > max_bytes:
                    raise UnzipError(f"bundle is larger than {max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def unpack_into_place(
    zip_path: Path, work: Path, final: Path, limits: Limits, abort: threading.Event
) -> int:
    """Extract ``zip_path`` into the new directory ``work``, then rename it to ``final``.

    Returns what the unpacked tree holds on disk (`tree_size`). If ``final``
    already exists (another unpack of the same content won), ``work`` is
    discarded and ``final`` kept.
    """
    extract(zip_path, work, limits, abort)
    size = tree_size(work)
    if abort.is_set():
        shutil.rmtree(work, ignore_errors=True)
        raise Aborted()
    try:
        os.rename(work, final)
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        if not final.is_dir():
            raise UnzipError(f"cannot install bundle: {_reason(e)}") from None
    return size


def extract(zip_path: Path, dest: Path, limits: Limits, abort: threading.Event) -> int:
    """Safely unpack ``zip_path`` into the new directory ``dest``; returns bytes written.

    Rejected: absolute names, ``..``, backslashes, drive letters, symlinks and other
    special members, duplicates, more than ``max_members`` members, more than
    ``max_bytes`` bytes (declared or actually decompressed). Only the executable
    bit of a member's mode is kept. On any error ``dest`` is removed.
    """
    dest.mkdir(mode=0o755)
    try:
        with open(zip_path, "rb") as fp:
            _check_central_directory(fp, limits)
            try:
                archive = zipfile.ZipFile(fp)
            except Exception as e:  # zipfile raises many types on hostile input
                raise UnzipError(f"bundle is not a valid zip: {_reason(e)}") from None
            with archive:
                members = archive.infolist()
                if len(members) > limits.max_members:
                    raise UnzipError(
                        f"bundle has too many members ({len(members)} > {limits.max_members})"
                    )
                declared = sum(m.file_size for m in members)
                if declared > limits.max_bytes:
                    raise UnzipError(f"bundle unpacks to more than {limits.max_bytes} bytes")
                written = 0
                for member in members:
                    if abort.is_set():
                        raise Aborted()
                    written = _extract_member(archive, member, dest, written, limits, abort)
        return written
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def tree_size(root: Path) -> int:
    """What the tree under ``root`` really holds on disk: the allocated blocks of
    every file and directory (100,000 one-byte files take 400 MB, not 100 KB)."""
    return tree_usage(root).bytes


def _extract_member(
    archive: zipfile.ZipFile, member: zipfile.ZipInfo, dest: Path, written: int,
    limits: Limits, abort: threading.Event,
) -> int:
    """Extract one member; returns the running total of bytes written."""
    parts = _safe_parts(member)
    if not parts:
        return written
    target = dest.joinpath(*parts)
    name = oneline(repr(member.filename))
    try:
        if member.is_dir() or stat.S_ISDIR(member.external_attr >> 16):
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
            return written
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(target, flags, 0o600)
        try:
            out = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
    except FileExistsError:
        raise UnzipError(f"bundle member is duplicated or clashes: {name}") from None
    except OSError as e:
        raise UnzipError(f"cannot unpack bundle member {name}: {_reason(e)}") from None
    with out:
        try:
            src = archive.open(member)
        except Exception as e:  # bad header, encrypted, unsupported compression...
            raise UnzipError(f"corrupt bundle member {name}: {_reason(e)}") from None
        with src:
            while True:
                if abort.is_set():
                    raise Aborted()
                try:
                    chunk = src.read(CHUNK)
                except Exception as e:
                    raise UnzipError(f"corrupt bundle member {name}: {_reason(e)}") from None
                if not chunk:
                    break
                written += len(chunk)  # counted: declared sizes may lie
                if written > limits.max_bytes:
                    raise UnzipError(f"bundle unpacks to more than {limits.max_bytes} bytes")
                try:
                    out.write(chunk)
                except OSError as e:
                    raise UnzipError(f"cannot unpack bundle member {name}: {_reason(e)}") from None
        executable = (member.external_attr >> 16) & 0o111
        os.fchmod(out.fileno(), 0o755 if executable else 0o644)
    return written


def _safe_parts(member: zipfile.ZipInfo) -> list[str]:
    name = member.filename
    shown = oneline(repr(name))
    kind = stat.S_IFMT(member.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise UnzipError(f"bundle member is a symlink: {shown}")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnzipError(f"bundle member is not a regular file: {shown}")
    if name.startswith("/") or _DRIVE.match(name):
        raise UnzipError(f"bundle member has an absolute path: {shown}")
    if "\\" in name or "\x00" in name:
        raise UnzipError(f"bundle member name is unsafe: {shown}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnzipError(f"bundle member escapes the bundle: {shown}")
    if len(name) > _MAX_NAME or len(parts) > _MAX_DEPTH:
        raise UnzipError(f"bundle member path is too long: {shown}")
    return parts


def _check_central_directory(fp: IO[bytes], limits: Limits) -> None:
    """Refuse archives whose central directory is too big, before zipfile reads it."""
    fp.seek(0, os.SEEK_END)
    size = fp.tell()
    tail_start = max(0, size - _EOCD.size - 0xFFFF)
    fp.seek(tail_start)
    tail = fp.read()
    at = len(tail) - _EOCD.size  # no archive comment: zipfile's first guess
    if at < 0 or tail[at : at + 4] != b"PK\x05\x06":
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise UnzipError("bundle is not a valid zip: no end of central directory")
    _sig, _disk, _cd_disk, _n_disk, members, cd_size, _cd_at, _clen = _EOCD.unpack_from(tail, at)
    locator_at = at - _EOCD64_LOCATOR.size
    if locator_at >= 0 and tail[locator_at : locator_at + 4] == b"PK\x06\x07":
        record_at = tail_start + locator_at - _EOCD64.size
        if record_at >= 0:
            fp.seek(record_at)
            record = fp.read(_EOCD64.size)
            if len(record) == _EOCD64.size and record[:4] == b"PK\x06\x06":
                fields = _EOCD64.unpack(record)
                members, cd_size = fields[7], fields[8]
    if members > limits.max_members:
        raise UnzipError(f"bundle has too many members ({members} > {limits.max_members})")
    if cd_size > max(_CD_BYTES_MIN, limits.max_members * _CD_BYTES_PER_MEMBER):
        raise UnzipError(f"bundle zip directory is too large ({cd_size} bytes)")
    fp.seek(0)


def _key(path: str, st: os.stat_result) -> FileKey:
    return (path, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return oneline(str(e)) or type(e).__name__
