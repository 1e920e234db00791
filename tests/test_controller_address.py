"""The controller option: normalization, and the address job containers get."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluster_worker.controller.address import (
    container_controller_address,
    is_local_host,
    normalize_controller_url,
    parse_controller_address,
)


@pytest.mark.parametrize(
    ("option", "url"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("controller:10000", "http://controller:10000"),
        ("http://controller:10000", "http://controller:10000"),
        ("http://controller:10000/", "http://controller:10000"),
        ("  http://controller:10000  ", "http://controller:10000"),
        ("HTTP://controller:1", "http://controller:1"),
        ("https://controller.example.com/prefix/", "https://controller.example.com/prefix"),
        ("[::1]:8080", "http://[::1]:8080"),
        ("http://[fd00::5]:8080", "http://[fd00::5]:8080"),
        ("controller", "http://controller"),
    ],
)
def test_normalize(option: str, url: str) -> None:
    assert normalize_controller_url(option) == url


@pytest.mark.parametrize(
    "option",
    [
        "",
        "   ",
        "ftp://controller:21",
        "controller:notaport",
        "controller:70000",
        "controller:0",
        "http://user:secret@controller:1",
        "http://controller:1/?q=1",
        "http://controller:1/#frag",
        "http://:8080",
        "contr oller:1",
        "cont\x00roller:1",
        "http://" + "a" * 3000 + ":1",
    ],
)
def test_normalize_rejects(option: str) -> None:
    with pytest.raises(ValueError):
        normalize_controller_url(option)


def test_parse_keeps_whether_the_scheme_was_given() -> None:
    assert not parse_controller_address("h:1").scheme_given
    assert parse_controller_address("http://h:1").scheme_given
    assert parse_controller_address("https://h").effective_port == 443
    assert parse_controller_address("h").effective_port == 80


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("127.0.0.1:8080", "host.docker.internal:8080"),
        ("http://127.0.0.1:8080", "http://host.docker.internal:8080"),
        ("http://localhost:8080", "http://host.docker.internal:8080"),
        ("localhost:9000", "host.docker.internal:9000"),
        ("LOCALHOST:9000", "host.docker.internal:9000"),
        ("http://[::1]:8080", "http://host.docker.internal:8080"),
        ("[::1]:8080", "host.docker.internal:8080"),
        ("127.1.2.3:80", "host.docker.internal:80"),
        ("https://localhost:8443/api", "https://host.docker.internal:8443/api"),
        ("http://localhost", "http://host.docker.internal"),
        ("0.0.0.0:8080", "host.docker.internal:8080"),
        ("http://[::ffff:127.0.0.1]:8080", "http://host.docker.internal:8080"),
        # Not loopback: exact host match only, never a substring.
        ("controller.example.com:8080", "controller.example.com:8080"),
        ("http://10.0.0.5:8080", "http://10.0.0.5:8080"),
        ("http://localhost.example.com:8080", "http://localhost.example.com:8080"),
        ("http://127.0.0.1.nip.io:8080", "http://127.0.0.1.nip.io:8080"),
        ("http://mylocalhost:8080", "http://mylocalhost:8080"),
        ("128.0.0.1:1", "128.0.0.1:1"),
        ("http://host.docker.internal:8080", "http://host.docker.internal:8080"),
    ],
)
def test_container_controller_address(option: str, expected: str) -> None:
    assert container_controller_address(option) == expected


def test_container_controller_address_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        container_controller_address("ftp://localhost:1")


@given(
    st.sampled_from(["127.0.0.1", "localhost", "[::1]", "127.255.0.9"]),
    st.integers(min_value=1, max_value=65535),
    st.booleans(),
)
def test_loopback_rewrite_keeps_port_and_scheme(host: str, port: int, with_scheme: bool) -> None:
    option = f"{'http://' if with_scheme else ''}{host}:{port}"
    rewritten = container_controller_address(option)
    assert rewritten == f"{'http://' if with_scheme else ''}host.docker.internal:{port}"


@given(st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True))
def test_names_other_than_localhost_are_kept(name: str) -> None:
    if name in ("localhost", "ip6-localhost", "ip6-loopback"):
        return
    assert not is_local_host(name)
    assert container_controller_address(f"http://{name}:80") == f"http://{name}:80"
