"""What confines a job besides its container's CPU and memory limits: the user
it runs as, the directories it may write, and how much disk they may hold.

The job runs as an unprivileged uid/gid (``--job-user``, 10001:10001 by
default) with a read-only root filesystem. What it can write is exactly its
per-job host directories, all owned by that user and all watched:

==============  ======================  ==========================================
in the job      on the host             lifetime
==============  ======================  ==========================================
/workdir, HOME  <job>/workdir           removed when the job ends (``--keep-workdir``)
/tmp, /var/tmp  <job>/tmp               removed when the job ends (``--keep-workdir``)
/fluster/out    <job>/out               its result; kept until retention
/app            the cached bundle       read-only, shared, never copied
==============  ======================  ==========================================

A file it makes can be setuid only to its own uid, never to root; the
container has no capabilities and ``no-new-privileges``. ``--job-user root``
gives the old behaviour (a writable root filesystem, files owned by root).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from fluster_worker.common.safe_tree import TreeUsage
from fluster_worker.containers.spec import Mount
from fluster_worker.images.dockerfile import (
    CONTAINER_APP_DIR,
    CONTAINER_ENTRYPOINT_PATH,
    CONTAINER_OUT_DIR,
)
from fluster_worker.jobs.model import JobSpec
from fluster_worker.jobs.store import JobStore

CONTAINER_WORKDIR = "/workdir"
CONTAINER_TMP_DIRS = ("/tmp", "/var/tmp")
#: The uid and gid jobs run as when the worker runs as root and --job-user is not given.
DEFAULT_JOB_UID = 10001
_USER = re.compile(r"([0-9]{1,10})(?::([0-9]{1,10}))?", re.ASCII)
#: Entries the disk watch counts before it calls a job's space too big to watch.
MAX_WATCHED_ENTRIES = 2_000_000


@dataclass(frozen=True)
class JobUser:
    uid: int
    gid: int

    @classmethod
    def parse(cls, text: str) -> JobUser:
        """``UID[:GID]`` (numbers; GID defaults to UID) or ``root``; ValueError
        (one line) otherwise."""
        text = text.strip()
        if text == "root":
            return cls(0, 0)
        match = _USER.fullmatch(text)
        if match is None:
            raise ValueError(f"invalid job user {text[:40]!r}: expected UID[:GID] (numbers) or root")
        uid = int(match.group(1))
        gid = int(match.group(2)) if match.group(2) is not None else uid
        for value in (uid, gid):
            if not 0 <= value < 2**32 - 1:
                raise ValueError(f"invalid job user {text[:40]!r}: ids are 0 to 4294967294")
        return cls(uid, gid)

    @classmethod
    def default(cls) -> JobUser:
        """10001:10001 when the worker is root; otherwise the worker's own ids
        (only root can hand directories to another user)."""
        if os.geteuid() == 0:
            return cls(DEFAULT_JOB_UID, DEFAULT_JOB_UID)
        return cls(os.geteuid(), os.getegid())

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @property
    def docker(self) -> str:
        """Docker's ``--user`` value."""
        return f"{self.uid}:{self.gid}"


@dataclass(frozen=True)
class Sandbox:
    """The worker's containment settings, handed to every job run."""

    user: JobUser
    keep_workdir: bool = False
    log_max_bytes: int | None = None  # the worker's log cap per stream, for the engine's own log

    def mounts(self, store: JobStore, job_id: str, app: str) -> list[Mount]:
        """The bind mounts of the job's container; ``app`` is the host directory
        shown read-only at /app (the cached bundle)."""
        mounts = [
            Mount(Path(app), CONTAINER_APP_DIR, True),
            Mount(store.workdir(job_id), CONTAINER_WORKDIR, False),
            Mount(store.entrypoint_path(job_id), CONTAINER_ENTRYPOINT_PATH, True),
            Mount(store.out_dir(job_id), CONTAINER_OUT_DIR, False),
        ]
        mounts += [Mount(store.tmp_dir(job_id), target, False) for target in CONTAINER_TMP_DIRS]
        return mounts

    @property
    def read_only_rootfs(self) -> bool:
        # An unprivileged job could write only the world-writable corners of the
        # image (/tmp, /run/lock): unwatched disk. Root may want to install things.
        return not self.user.is_root


def disk_overrun(usage: TreeUsage, spec: JobSpec) -> str:
    """Why the job's writable space is over its limit, or ""."""
    space = "the job's writable space (/workdir, /tmp, /fluster/out)"
    if usage.truncated:
        return f"Disk limit exceeded: {space} holds more than {MAX_WATCHED_ENTRIES} files and directories"
    limit = spec.disk_bytes
    if limit is not None and usage.bytes > limit:
        named = f"resources.disk {spec.disk.strip()}" if spec.disk.strip() else "--max-job-disk"
        return f"Disk limit exceeded: {space} holds {_mib(usage.bytes)}, over its limit of {_mib(limit)} ({named})"
    return ""


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
