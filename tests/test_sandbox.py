"""The job's sandbox without the engine: the job user, the bounds on a request
(environment, disk), the disk watch's verdict, options, file modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from twisted.python import usage

from fluster_worker.common.files import make_private_dir, write_atomically
from fluster_worker.common.safe_tree import TreeUsage
from fluster_worker.containers.resources import parse_disk
from fluster_worker.containers.spec import ContainerSpec
from fluster_worker.jobs.model import InvalidJobRequest, JobRequest, JobSpec
from fluster_worker.jobs.sandbox import MAX_WATCHED_ENTRIES, JobUser, disk_overrun
from fluster_worker.jobs.validation import RequestLimits, job_spec
from fluster_worker.main import Options

MiB = 2**20


def request(**fields: object) -> JobRequest:
    return JobRequest(job_id="j", entrypoint=b"x", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("text, user", [
    ("10001", JobUser(10001, 10001)),
    ("10001:20002", JobUser(10001, 20002)),
    (" 65534:65534 ", JobUser(65534, 65534)),
    ("root", JobUser(0, 0)),
    ("0:0", JobUser(0, 0)),
])
def test_job_user_parses(text: str, user: JobUser) -> None:
    assert JobUser.parse(text) == user


@pytest.mark.parametrize("text", ["nobody", "", "1:2:3", "-1", "10001:", "4294967295", "1.5"])
def test_job_user_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid job user"):
        JobUser.parse(text)


def test_default_job_user_is_unprivileged() -> None:
    user = JobUser.default()
    assert not user.is_root
    assert user.docker == (f"{user.uid}:{user.gid}")
    if os.geteuid() == 0:
        assert user == JobUser(10001, 10001)


def test_environment_bounds() -> None:
    limits = RequestLimits(max_env_vars=3, max_env_bytes=20)
    assert job_spec(request(env_vars={"A": "1", "B": "2", "C": "3"}), 1, limits=limits).env_vars == {
        "A": "1", "B": "2", "C": "3"}
    with pytest.raises(InvalidJobRequest) as info:
        job_spec(request(env_vars={"A": "", "B": "", "C": "", "D": ""}), 1, limits=limits)
    assert info.value.message == "too many environment variables: 4, over the limit of 3 (--max-env-vars)"
    # "KEY=value\0" per variable: 2 + 16 + 2 = 20 bytes fit, one more does not.
    assert job_spec(request(env_vars={"KK": "v" * 16}), 1, limits=limits)
    with pytest.raises(InvalidJobRequest) as info:
        job_spec(request(env_vars={"KK": "v" * 17}), 1, limits=limits)
    assert info.value.message == "environment variables take more than 20 bytes (--max-env-bytes)"
    with pytest.raises(InvalidJobRequest, match="more than 20 bytes"):
        job_spec(request(env_vars={"KK": "é" * 9}), 1, limits=limits)  # bytes, not characters


def test_defaults_are_the_issue_bounds() -> None:
    limits = RequestLimits()
    assert (limits.max_env_vars, limits.max_env_bytes, limits.max_job_disk_bytes) == (1000, 128 * 1024, 10 * 2**30)


def test_disk_limit_of_a_job() -> None:
    limits = RequestLimits(max_job_disk_bytes=100 * MiB)
    assert job_spec(request(), 1, limits=limits).disk_bytes == 100 * MiB
    spec = job_spec(request(disk="16m"), 1, limits=limits)
    assert (spec.disk, spec.disk_bytes) == ("16m", 16 * MiB)
    with pytest.raises(InvalidJobRequest) as info:
        job_spec(request(disk="1g"), 1, limits=limits)
    assert info.value.message == "resources.disk 1g exceeds this worker's --max-job-disk of 100 MiB"
    with pytest.raises(InvalidJobRequest, match='invalid disk "lots"'):
        job_spec(request(disk="lots"), 1, limits=limits)
    unlimited = RequestLimits(max_job_disk_bytes=None)
    assert job_spec(request(), 1, limits=unlimited).disk_bytes is None
    assert job_spec(request(disk="2t"), 1, limits=unlimited).disk_bytes == 2 * 2**40


def test_parse_disk() -> None:
    assert parse_disk("") is None
    assert parse_disk("10g") == 10 * 2**30
    assert parse_disk("512") == 512 * MiB
    for bad in ("0", "100k", "-1g", "1x", "9" * 100):
        with pytest.raises(ValueError):
            parse_disk(bad)


def test_disk_overrun_names_the_limit() -> None:
    by_worker = JobSpec(disk_bytes=32 * MiB)
    by_request = JobSpec(disk="16m", disk_bytes=16 * MiB)
    assert disk_overrun(TreeUsage(32 * MiB, 10), by_worker) == ""
    assert disk_overrun(TreeUsage(48 * MiB, 10), by_worker) == (
        "Disk limit exceeded: the job's writable space (/workdir, /tmp, /fluster/out) holds 48.0 MiB, "
        "over its limit of 32.0 MiB (--max-job-disk)")
    assert disk_overrun(TreeUsage(17 * MiB, 10), by_request).endswith("over its limit of 16.0 MiB (resources.disk 16m)")
    assert disk_overrun(TreeUsage(10**15, 10), JobSpec(disk_bytes=None)) == ""
    assert disk_overrun(TreeUsage(0, MAX_WATCHED_ENTRIES, truncated=True), JobSpec(disk_bytes=None)).endswith(
        f"holds more than {MAX_WATCHED_ENTRIES} files and directories")


def test_options(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FLUSTER_WORKER_"):
            monkeypatch.delenv(key)
    config = _parse().config
    assert config.job_user is None  # decided at start: 10001:10001 for a root worker
    assert (config.max_env_vars, config.max_env_bytes) == (1000, 128 * 1024)
    assert config.max_job_disk_bytes == 10 * 2**30 and config.keep_workdir is False
    monkeypatch.setenv("FLUSTER_WORKER_MAX_JOB_DISK", "0")
    monkeypatch.setenv("FLUSTER_WORKER_KEEP_WORKDIR", "yes")
    config = _parse("--max-env-vars", "10", "--max-env-bytes", "4096").config
    assert config.max_job_disk_bytes is None and config.keep_workdir is True
    assert (config.max_env_vars, config.max_env_bytes) == (10, 4096)
    if os.geteuid() == 0:
        assert _parse("--job-user", "root").config.job_user == (0, 0)
        assert _parse("--job-user", "20000:20001").config.job_user == (20000, 20001)
    for argv in (("--job-user", "nobody"), ("--max-job-disk", "lots"), ("--keep-workdir", "maybe"),
                 ("--max-env-vars", "-1")):
        with pytest.raises(usage.UsageError):
            _parse(*argv)


def _parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_container_spec_user() -> None:
    spec = ContainerSpec(name="fluster-x", image="i", command=["c"], user="10001:10001", read_only_rootfs=True)
    assert spec.user == "10001:10001"
    for bad in ("root", "10001", "1:2:3", "-1:0"):
        with pytest.raises(ValueError, match="invalid user"):
            ContainerSpec(name="fluster-x", image="i", command=["c"], user=bad)


def test_records_are_written_0600_and_dirs_0700(tmp_path: Path) -> None:
    old = os.umask(0)  # a careless umask changes nothing
    try:
        path = tmp_path / "state" / "jobs" / "j" / "record.json"
        write_atomically(path, b"{}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        write_atomically(path, b"{}", 0o600, (os.getuid(), os.getgid()))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        make_private_dir(tmp_path / "state")
        assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
        os.chmod(tmp_path / "state", 0o755)
        make_private_dir(tmp_path / "state")  # also when it existed
        assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    finally:
        os.umask(old)
