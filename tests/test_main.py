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


@pytest.fixture
def ca_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    for key in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "FLUSTER_WORKER_CA_BUNDLE"):
        monkeypatch.delenv(key, raising=False)
    files = {}
    for name in ("ssl", "pip", "requests"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text("-----BEGIN CERTIFICATE-----\n")
    return files


def test_ca_bundle_defaults_to_what_the_hosts_python_trusts(
    ca_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert parse().config.ca_bundle is None
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_files["requests"]))
    assert parse().config.ca_bundle == ca_files["requests"]
    monkeypatch.setenv("PIP_CERT", str(ca_files["pip"]))
    assert parse().config.ca_bundle == ca_files["pip"]
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))  # only a file that exists counts
    assert parse().config.ca_bundle == ca_files["pip"]
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_files["ssl"]))
    assert parse().config.ca_bundle == ca_files["ssl"]


def test_an_explicit_ca_bundle_wins_and_empty_means_none(
    ca_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_files["ssl"]))
    assert parse("--ca-bundle", str(ca_files["pip"])).config.ca_bundle == ca_files["pip"]
    assert parse("--ca-bundle", "").config.ca_bundle is None
    monkeypatch.setenv("FLUSTER_WORKER_CA_BUNDLE", str(ca_files["requests"]))
    assert parse().config.ca_bundle == ca_files["requests"]
    monkeypatch.setenv("FLUSTER_WORKER_CA_BUNDLE", "")
    assert parse().config.ca_bundle is None


def test_jobs_outlive_the_worker_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLUSTER_WORKER_STOP_JOBS_ON_EXIT", raising=False)
    assert parse().config.stop_jobs_on_exit is False
    assert parse("--stop-jobs-on-exit").config.stop_jobs_on_exit is True
    monkeypatch.setenv("FLUSTER_WORKER_STOP_JOBS_ON_EXIT", "1")
    assert parse().config.stop_jobs_on_exit is True
    monkeypatch.setenv("FLUSTER_WORKER_STOP_JOBS_ON_EXIT", "maybe")
    with pytest.raises(usage.UsageError, match="STOP_JOBS_ON_EXIT"):
        parse()


def test_disk_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUSTER_WORKER_MIN_FREE_DISK_BYTES", "1000")
    config = parse("--low-free-disk-bytes", "5000").config
    assert (config.min_free_disk_bytes, config.low_free_disk_bytes) == (1000, 5000)
    with pytest.raises(usage.UsageError):
        parse("--min-free-disk-bytes", "-1")


def test_request_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("FLUSTER_WORKER_"):
            monkeypatch.delenv(key)
    config = parse().config
    assert (config.max_connections, config.request_read_timeout, config.max_pending_jobs) == (512, 60.0, 1000)
    assert (config.log_page_lines, config.log_page_bytes) == (100_000, 16 * 2**20)
    config = parse(
        "--max-connections", "0", "--request-read-timeout", "0", "--max-pending-jobs", "0",
        "--log-page-lines", "10", "--log-page-bytes", "4096",
    ).config
    assert (config.max_connections, config.request_read_timeout, config.max_pending_jobs) == (None, None, None)
    assert (config.log_page_lines, config.log_page_bytes) == (10, 4096)
    for argv in (("--max-connections", "-1"), ("--max-pending-jobs", "-5"), ("--log-page-lines", "0")):
        with pytest.raises(usage.UsageError):
            parse(*argv)
