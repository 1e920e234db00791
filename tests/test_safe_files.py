"""Reading, measuring and removing what a job could have written: links are
never followed, FIFOs never opened, fds never leaked, any depth is fine."""

from __future__ import annotations

import gc
import os
import stat
import threading
from pathlib import Path

import pytest

from fluster_worker.common.safe_files import FileTooLarge, UnsafeFile, probe_regular, read_regular
from fluster_worker.common.safe_tree import remove_tree, tree_usage


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "host-secret"
    path.write_bytes(b"host bytes")
    return path


@pytest.fixture
def job(tmp_path: Path) -> Path:
    """A job directory with the job-writable out/."""
    root = tmp_path / "job"
    (root / "out").mkdir(parents=True)
    return root


def test_reads_a_regular_file_within_the_bound(job: Path) -> None:
    (job / "out" / "result.pkl").write_bytes(b"x" * 100)
    assert read_regular(job, "out/result.pkl", 100) == b"x" * 100
    assert probe_regular(job, "out/result.pkl", 100) == 100
    with pytest.raises(FileTooLarge, match="out/result.pkl is larger than 99 bytes"):
        read_regular(job, "out/result.pkl", 99)
    with pytest.raises(FileTooLarge):
        probe_regular(job, "out/result.pkl", 99)


def test_absent_is_none(job: Path) -> None:
    assert read_regular(job, "out/result.pkl", 10) is None
    assert probe_regular(job, "out/result.pkl", 10) is None
    assert read_regular(job, "nothing/result.pkl", 10) is None


@pytest.mark.parametrize("kind, words", [
    ("symlink", "out/result.pkl is a symbolic link, not a regular file"),
    ("fifo", "out/result.pkl is a FIFO, not a regular file"),
    ("dir", "out/result.pkl is a directory, not a regular file"),
    ("socket", "out/result.pkl is a socket, not a regular file"),
])
def test_refuses_what_is_not_a_regular_file(job: Path, secret: Path, kind: str, words: str) -> None:
    target = job / "out" / "result.pkl"
    if kind == "symlink":
        target.symlink_to(secret)
    elif kind == "fifo":
        os.mkfifo(target)  # opening it would block the worker's thread forever
    elif kind == "dir":
        target.mkdir()
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(target))
        sock.close()
    before = open_fds()
    for check in (read_regular, probe_regular):
        with pytest.raises(UnsafeFile) as info:
            check(job, "out/result.pkl", 1 << 20)
        assert str(info.value) == words
    assert open_fds() == before


def test_a_link_on_the_way_is_not_followed(job: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "result.pkl").write_bytes(b"host bytes")
    os.rmdir(job / "out")
    (job / "out").symlink_to(elsewhere)
    with pytest.raises(UnsafeFile, match="^out is a symbolic link, not a directory$"):
        read_regular(job, "out/result.pkl", 100)


def test_relative_path_must_be_plain(job: Path) -> None:
    for bad in ("../x", "out/../x", "/etc/shadow", "", "out//x"):
        with pytest.raises(ValueError):
            read_regular(job, bad, 10)


def test_usage_counts_allocated_bytes_and_never_follows(tmp_path: Path, secret: Path) -> None:
    root = tmp_path / "workdir"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "big").write_bytes(os.urandom(1 << 20))
    (root / "sparse").open("wb").truncate(1 << 30)  # 1 GiB apparent, nothing allocated
    (root / "link").symlink_to(tmp_path)  # would count the whole tmp_path if followed
    (root / "a" / "up").symlink_to("../..")
    usage = tree_usage(root)
    assert usage.entries == 6
    assert (1 << 20) <= usage.bytes < (1 << 20) + 64 * 1024
    assert not usage.truncated and not usage.changed
    assert tree_usage(tmp_path / "missing").bytes == 0


def test_usage_stops_at_the_entry_bound(tmp_path: Path) -> None:
    for i in range(10):
        (tmp_path / f"f{i}").touch()
    assert tree_usage(tmp_path, max_entries=10).truncated is False
    stopped = tree_usage(tmp_path, max_entries=5)
    assert stopped.truncated and stopped.entries == 5


def deep_tree(root: Path, depth: int) -> None:
    """``depth`` nested directories (far more than PATH_MAX allows in one path)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "wb") as f:
            f.write(b"x" * 10_000)
    finally:
        os.close(fd)


def test_any_depth_with_one_fd(tmp_path: Path) -> None:
    root = tmp_path / "deep"
    deep_tree(root, 5000)  # os.walk, fwalk and rmtree (3.11) fail or hold 5000 fds
    # Garbage of earlier tests (a docker client, a socket) may hold fds that a
    # collection during the walk would close: collect it first.
    gc.collect()
    before = open_fds()
    usage = tree_usage(root)
    assert usage.entries == 5001 and usage.bytes >= 10_000
    assert open_fds() == before
    remove_tree(root)
    assert not root.exists()
    assert open_fds() == before


def test_remove_does_not_follow_links(tmp_path: Path, secret: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_text("stay")
    root = tmp_path / "workdir"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "to-keep").symlink_to(keep)
    (root / "to-secret").symlink_to(secret)
    os.mkfifo(root / "fifo")
    (root / "ro").mkdir()
    (root / "ro" / "f").touch()
    os.chmod(root / "ro", 0o500)
    for i in range(5000):  # more than one listing batch
        (root / "sub" / f"f{i}").touch()
    remove_tree(root)
    assert not root.exists()
    assert (keep / "precious").read_text() == "stay" and secret.read_bytes() == b"host bytes"


def test_remove_of_a_link_removes_only_the_link(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").touch()
    (tmp_path / "workdir").symlink_to(keep)
    remove_tree(tmp_path / "workdir")
    assert not (tmp_path / "workdir").is_symlink() and (keep / "precious").exists()
    remove_tree(tmp_path / "missing")  # fine


def test_a_swapped_directory_is_never_entered(tmp_path: Path) -> None:
    """A job swaps a directory for a link to the host again and again while the
    worker walks: the walk never counts or deletes anything outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(50):
        (outside / f"keep{i}").write_bytes(b"x" * 8192)
    root = tmp_path / "workdir"
    root.mkdir()
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            try:
                (root / "d").mkdir()
                (root / "d" / "f").touch()
                os.unlink(root / "d" / "f")
                os.rmdir(root / "d")
                (root / "d").symlink_to(outside)
                os.unlink(root / "d")
            except OSError:
                pass

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        for _ in range(200):
            assert tree_usage(root).bytes < 50 * 8192
    finally:
        stop.set()
        swapper.join()
    remove_tree(root)
    assert len(list(outside.iterdir())) == 50
    assert all(stat.S_ISREG(p.lstat().st_mode) for p in outside.iterdir())
