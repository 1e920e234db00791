"""Job ids: which are valid (hierarchical ids of up to 1024 bytes; hostile ones
refused with a reason), and the one derivation of file names from them
(``job_key``): injective, a plain child name, stable for ids of the old rule;
used by the job store and the log store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred

from fluster_worker.common.jobnames import MAX_JOB_ID_BYTES, job_id_problem, job_key, valid_job_id
from fluster_worker.jobs import validation
from fluster_worker.jobs.model import InvalidJobRequest, JobRecord, JobSpec
from fluster_worker.jobs.store import ERROR_FILE, JobStore
from fluster_worker.logs.layout import job_directory
from fluster_worker.testing.controller import InlinePool

VALID = [
    "a", "my-exp", "my-exp/worker-0", "a/b/c/d", "exp/logs", "a__b", "-rf", ".hidden", "x y", "über/größe",
    "job:1@host", "a/.b/c..", "%2F", "\\", "a" * 1024, "é" * 512,
]
INVALID = [
    "", "/", "a/", "/a", "a//b", ".", "..", "../x", "x/..", "a/./b", "a/../b", "a\x00b", "a\nb", "a\tb",
    "a\x7fb", "a\u2028b", "\x1b[31m", "a" * 1025, "é" * 513, "x" * 100_000, "\ud800",
]


@pytest.mark.parametrize("job_id", VALID)
def test_valid_ids(job_id: str) -> None:
    assert job_id_problem(job_id) is None
    validation.check_job_id(job_id)


@pytest.mark.parametrize("job_id", INVALID)
def test_hostile_ids_are_invalid_argument_with_a_reason(job_id: str) -> None:
    assert not valid_job_id(job_id)
    with pytest.raises(InvalidJobRequest) as e:
        validation.check_job_id(job_id)
    message = e.value.message
    assert message.startswith("invalid job_id ") and len(message) < 200
    assert "\n" not in message and "\x00" not in message and "\x1b" not in message


def test_reasons_say_what_is_wrong() -> None:
    assert job_id_problem("a//b") == "has an empty segment between slashes"
    assert job_id_problem("a/../b") == "has a '..' segment between slashes"
    assert job_id_problem("a\x00") == "contains the control character U+0000"
    assert job_id_problem("x" * 2000) == f"is longer than {MAX_JOB_ID_BYTES} bytes"
    assert job_id_problem(7) == "must be a string, not int"


def test_ids_of_the_old_rule_keep_their_plain_names() -> None:
    for job_id in ("job-1", "my.exp_2", "A" * 200):
        assert job_key(job_id) == job_id


def test_other_ids_get_a_slug_and_a_hash() -> None:
    key = job_key("my-exp/worker-0")
    assert key.startswith("my-exp_worker-0~") and len(key) == len("my-exp_worker-0~") + 20
    assert job_key("a/b") != job_key("a__b") == "a__b"
    assert job_key("a/b") != job_key("a_b") and job_key("a b") != job_key("a/b")
    assert job_key("..a").startswith("a~") and job_key("/".join(["é"] * 3)).startswith("job~")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=4))
def test_keys_are_plain_child_names(segments: list[str]) -> None:
    job_id = "/".join(segments)
    if not valid_job_id(job_id):
        return
    key = job_key(job_id)
    assert key not in ("", ".", "..") and "/" not in key and "\x00" not in key
    assert len(key.encode()) <= 200 and key.isascii()
    root = Path("/state/jobs")
    assert (root / key).parent == root


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_keys_are_injective(first: str, second: str) -> None:
    if first != second and valid_job_id(first) and valid_job_id(second):
        assert job_key(first) != job_key(second)


def test_log_directories_use_the_same_keys(tmp_path: Path) -> None:
    assert job_directory(tmp_path, "a/b") == tmp_path / job_key("a/b")
    with pytest.raises(ValueError):
        job_directory(tmp_path, "../x")


# -- the job store ----------------------------------------------------------------


def record(job_id: str) -> JobRecord:
    return JobRecord(job_id=job_id, attempt_id=1, worker_id="w", spec=JobSpec(), submitted_at_ms=1)


def result_of(d: Deferred[object]) -> object:
    out: list[object] = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


def test_store_keeps_a_b_and_a__b_apart_and_loads_both(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs", InlinePool())  # type: ignore[arg-type]
    for job_id in ("a/b", "a__b", "my-exp/worker-0"):
        result_of(store.save(record(job_id)))
        result_of(store.prepare(job_id, b"pickle of " + job_id.encode()))
    assert store.job_dir("a/b") != store.job_dir("a__b")
    assert store.entrypoint_path("a/b").read_bytes() == b"pickle of a/b"
    assert store.entrypoint_path("a__b").read_bytes() == b"pickle of a__b"
    assert sorted(os.listdir(tmp_path / "jobs")) == sorted(job_key(j) for j in ("a/b", "a__b", "my-exp/worker-0"))
    loaded = result_of(store.load_all())
    assert sorted(r.job_id for r in loaded) == ["a/b", "a__b", "my-exp/worker-0"]  # type: ignore[attr-defined]


def test_store_loads_a_state_dir_of_the_old_layout(tmp_path: Path) -> None:
    # What a worker before hierarchical ids wrote: <root>/<job_id>/record.json.
    old = tmp_path / "jobs" / "old-job-1"
    old.mkdir(parents=True)
    (old / "record.json").write_text(json.dumps(record("old-job-1").to_json()))
    store = JobStore(tmp_path / "jobs", InlinePool())  # type: ignore[arg-type]
    loaded = result_of(store.load_all())
    assert [r.job_id for r in loaded] == ["old-job-1"]  # type: ignore[attr-defined]
    assert store.job_dir("old-job-1") == old


def test_store_skips_a_record_outside_its_jobs_directory(tmp_path: Path) -> None:
    elsewhere = tmp_path / "jobs" / "innocent"
    elsewhere.mkdir(parents=True)
    (elsewhere / "record.json").write_text(json.dumps(record("other/job").to_json()))
    store = JobStore(tmp_path / "jobs", InlinePool())  # type: ignore[arg-type]
    assert result_of(store.load_all()) == []
    assert (elsewhere / "record.json").exists()  # left alone, not deleted


def test_read_error_takes_one_bounded_printable_line(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs", InlinePool())  # type: ignore[arg-type]
    result_of(store.prepare("a/b", b"x"))
    out = store.out_dir("a/b")
    assert result_of(store.read_error("a/b")) == ""
    (out / ERROR_FILE).write_bytes(b"ValueError: boom\n\x1b[31mred\x00 \xff" + b"x" * 3000)
    text = result_of(store.read_error("a/b"))
    assert isinstance(text, str) and text.startswith("ValueError: boom [31mred ")
    assert "\x1b" not in text and "\x00" not in text and len(text) <= 1000
    (out / ERROR_FILE).write_bytes(b"x" * 100_000)  # not what the runner writes: ignored
    assert result_of(store.read_error("a/b")) == ""


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "dir-symlink"])
def test_read_error_never_follows_a_job_planted_file(tmp_path: Path, kind: str) -> None:
    store = JobStore(tmp_path / "jobs", InlinePool())  # type: ignore[arg-type]
    result_of(store.prepare("j", b"x"))
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    target = store.out_dir("j") / ERROR_FILE
    if kind == "symlink":
        target.symlink_to(secret)
    elif kind == "fifo":
        os.mkfifo(target)  # opening it for reading would block without O_NONBLOCK
    elif kind == "directory":
        target.mkdir()
    else:
        out = store.out_dir("j")
        os.rename(out, tmp_path / "moved")
        (tmp_path / "moved" / ERROR_FILE).write_text("host secret")
        out.symlink_to(tmp_path / "moved")
    assert result_of(store.read_error("j")) == ""
