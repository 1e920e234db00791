"""The worker id survives restarts; a configured id wins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fluster_worker.controller.identity import (
    WORKER_ID_FILE,
    generate_worker_id,
    load_or_create_worker_id,
    validate_worker_id,
)

VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def test_generated_once_and_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_or_create_worker_id(state, None)
    assert VALID.fullmatch(first)
    assert first.startswith("worker-")
    assert (state / WORKER_ID_FILE).read_text().strip() == first
    # A restart (same state dir) keeps the identity.
    assert load_or_create_worker_id(state, None) == first
    assert load_or_create_worker_id(state, "  ") == first
    # No temporary files left behind by the atomic write.
    assert sorted(p.name for p in state.iterdir()) == [WORKER_ID_FILE]


def test_another_state_dir_gets_another_id(tmp_path: Path) -> None:
    assert load_or_create_worker_id(tmp_path / "a", None) != load_or_create_worker_id(tmp_path / "b", None)


def test_configured_wins_and_is_not_stored(tmp_path: Path) -> None:
    stored = load_or_create_worker_id(tmp_path, None)
    assert load_or_create_worker_id(tmp_path, "gpu-box-1") == "gpu-box-1"
    assert (tmp_path / WORKER_ID_FILE).read_text().strip() == stored
    assert load_or_create_worker_id(tmp_path, None) == stored


@pytest.mark.parametrize("bad", ["has space", "a/b", "-leading", "x" * 129, "tab\there", "é"])
def test_configured_id_is_validated(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="worker id"):
        load_or_create_worker_id(tmp_path, bad)


def test_corrupt_stored_id_is_replaced(tmp_path: Path) -> None:
    (tmp_path / WORKER_ID_FILE).write_text("../../etc/passwd\n")
    new = load_or_create_worker_id(tmp_path, None)
    assert VALID.fullmatch(new)
    assert load_or_create_worker_id(tmp_path, None) == new


def test_generated_id_is_sanitized() -> None:
    worker_id = generate_worker_id("My Host/äö:01..x" + "y" * 300)
    assert VALID.fullmatch(worker_id), worker_id
    assert worker_id.startswith("worker-My-Host-")
    assert re.search(r"-[0-9a-f]{8}$", worker_id)
    assert VALID.fullmatch(generate_worker_id("---"))


def test_validate_strips() -> None:
    assert validate_worker_id(" w-1 ") == "w-1"
