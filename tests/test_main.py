"""Options: defaults, environment variables, command line precedence, bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from fluster_worker.main import Options


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("FLUSTER_WORKER_"):
            monkeypatch.delenv(key)
    config = parse().config
    assert config.listen == "tcp:8080:interface=127.0.0.1"
    assert config.port_range == (30000, 39999)
    assert config.max_concurrent_jobs == 4
    assert config.controller is None


def test_environment_then_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUSTER_WORKER_BASE_IMAGE", "from-env:1")
    monkeypatch.setenv("FLUSTER_WORKER_MAX_CONCURRENT_JOBS", "7")
    monkeypatch.setenv("FLUSTER_WORKER_STATE_DIR", "/tmp/env-state")
    config = parse("--max-concurrent-jobs", "2", "--extra-index-url", "http://a/simple, http://b/simple").config
    assert config.base_image == "from-env:1"
    assert config.max_concurrent_jobs == 2
    assert config.state_dir == Path("/tmp/env-state")
    assert config.extra_index_urls == ("http://a/simple", "http://b/simple")


@pytest.mark.parametrize(
    "argv",
    [
        ("--max-concurrent-jobs", "many"),
        ("--max-concurrent-jobs", "0"),
        ("--port-range", "40000-30000"),
        ("--port-range", "x"),
        ("--no-such-option",),
    ],
)
def test_bad_values_are_usage_errors(argv: tuple[str, ...]) -> None:
    with pytest.raises(usage.UsageError):
        parse(*argv)
