"""PortAllocator, port names and ranges, with a fake is_free (and one real bind check)."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluster_worker.containers.ports import (
    MAX_PORTS_PER_JOB,
    PortAllocator,
    PortsExhausted,
    bind_check,
    parse_port_range,
    validate_port_name,
    validate_port_names,
)


class FakeFree:
    """is_free over a set of busy ports; records what was checked."""

    def __init__(self, busy: set[int] | None = None) -> None:
        self.busy = set(busy or ())
        self.checked: list[int] = []

    def __call__(self, port: int) -> bool:
        self.checked.append(port)
        return port not in self.busy


def test_allocates_one_port_per_name_in_order() -> None:
    alloc = PortAllocator(100, 109, FakeFree())
    assert alloc.allocate(["http", "actor"]) == {"http": 100, "actor": 101}
    assert alloc.held == {100, 101}


def test_never_hands_out_a_held_port() -> None:
    alloc = PortAllocator(100, 104, FakeFree())
    first = alloc.allocate(["a", "b", "c"])
    second = alloc.allocate(["a", "b"])
    assert set(first.values()).isdisjoint(second.values())
    assert alloc.held == {100, 101, 102, 103, 104}
    with pytest.raises(PortsExhausted):
        alloc.allocate(["a"])


def test_checks_free_before_handing_out_and_skips_busy() -> None:
    free = FakeFree(busy={100, 102})
    alloc = PortAllocator(100, 109, free)
    assert alloc.allocate(["a", "b"]) == {"a": 101, "b": 103}
    assert free.checked == [100, 101, 102, 103]


def test_exhausted_holds_none_and_says_so_on_one_line() -> None:
    free = FakeFree(busy={101, 103})
    alloc = PortAllocator(100, 103, free)
    with pytest.raises(PortsExhausted) as info:
        alloc.allocate(["a", "b", "c"])
    assert alloc.held == frozenset()
    assert str(info.value) == "not enough free ports in 100-103: 3 needed, 2 free"
    # Nothing was taken: the two free ports are still there, from the same cursor.
    assert alloc.allocate(["a", "b"]) == {"a": 100, "b": 102}


def test_released_port_is_not_immediately_reused() -> None:
    alloc = PortAllocator(100, 103, FakeFree())
    assert alloc.allocate(["a"]) == {"a": 100}
    alloc.release([100])
    assert alloc.allocate(["a"]) == {"a": 101}
    assert alloc.allocate(["a", "b"]) == {"a": 102, "b": 103}
    # Wraps around to the oldest released port.
    assert alloc.allocate(["a"]) == {"a": 100}


def test_release_ignores_ports_not_held() -> None:
    alloc = PortAllocator(100, 103, FakeFree())
    ports = alloc.allocate(["a", "b"])
    alloc.release([*ports.values(), 555, 100])
    assert alloc.held == frozenset()


def test_empty_request_allocates_nothing() -> None:
    free = FakeFree()
    alloc = PortAllocator(100, 103, free)
    assert alloc.allocate([]) == {}
    assert free.checked == []


def test_single_port_range() -> None:
    alloc = PortAllocator(5000, 5000, FakeFree())
    assert alloc.allocate(["x"]) == {"x": 5000}
    with pytest.raises(PortsExhausted):
        alloc.allocate(["y"])
    alloc.release([5000])
    assert alloc.allocate(["y"]) == {"y": 5000}


def test_invalid_names_hold_nothing() -> None:
    alloc = PortAllocator(100, 103, FakeFree())
    with pytest.raises(ValueError):
        alloc.allocate(["ok", "not ok"])
    with pytest.raises(ValueError):
        alloc.allocate(["http", "HTTP"])
    assert alloc.held == frozenset()


@pytest.mark.parametrize("low,high", [(0, 10), (10, 9), (1, 65536), (-5, 5)])
def test_allocator_rejects_bad_ranges(low: int, high: int) -> None:
    with pytest.raises(ValueError):
        PortAllocator(low, high, FakeFree())


@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("alloc"), st.integers(min_value=0, max_value=4)),
            st.tuples(st.just("release"), st.integers(min_value=0, max_value=10)),
        ),
        max_size=40,
    ),
    busy=st.sets(st.integers(min_value=100, max_value=115), max_size=6),
)
def test_allocator_invariants(ops: list[tuple[str, int]], busy: set[int]) -> None:
    alloc = PortAllocator(100, 115, FakeFree(busy))
    handed: list[dict[str, int]] = []
    for op, n in ops:
        before = alloc.held
        if op == "alloc":
            names = [f"p{i}" for i in range(n)]
            try:
                got = alloc.allocate(names)
            except PortsExhausted:
                assert alloc.held == before
                continue
            assert list(got) == names
            ports = set(got.values())
            assert len(ports) == n
            assert ports.isdisjoint(before) and ports.isdisjoint(busy)
            assert all(100 <= p <= 115 for p in ports)
            assert alloc.held == before | ports
            handed.append(got)
        elif handed:
            gone = handed.pop(n % len(handed))
            alloc.release(gone.values())
            assert alloc.held == before - set(gone.values())


@pytest.mark.parametrize("name", ["http", "ACTOR", "_x", "a1", "a" * 64, "A_B_9"])
def test_valid_port_names(name: str) -> None:
    assert validate_port_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "1http", "a-b", "a b", "a.b", "a" * 65, "é", "a\n", "a=b", "$x", "\u0663", "ａ"],
)
def test_invalid_port_names(name: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_port_name(name)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("invalid port name ")


def test_port_name_not_a_string() -> None:
    with pytest.raises(ValueError):
        validate_port_name(7)  # type: ignore[arg-type]


def test_duplicate_names_rejected_case_insensitively() -> None:
    with pytest.raises(ValueError) as info:
        validate_port_names(["http", "actor", "Http"])
    assert "FLUSTER_PORT_HTTP" in str(info.value)
    with pytest.raises(ValueError):
        validate_port_names(["a", "a"])


def test_too_many_names_rejected() -> None:
    names = [f"p{i}" for i in range(MAX_PORTS_PER_JOB + 1)]
    with pytest.raises(ValueError, match="too many ports"):
        validate_port_names(names)
    assert validate_port_names(names[:-1]) == names[:-1]


@given(st.text(max_size=80))
def test_port_name_is_a_valid_env_suffix_or_rejected(name: str) -> None:
    try:
        validate_port_name(name)
    except ValueError as e:
        assert "\n" not in str(e)
        return
    env = f"FLUSTER_PORT_{name.upper()}"
    assert env.isascii() and env.replace("_", "").isalnum() and not env[0].isdigit()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30000-39999", (30000, 39999)), (" 1 - 65535 ", (1, 65535)), ("80-80", (80, 80))],
)
def test_parse_port_range(text: str, expected: tuple[int, int]) -> None:
    assert parse_port_range(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "30000", "39999-30000", "0-10", "1-65536", "a-b", "-1-5", "1--5", "100000-100001",
     "1-2-3", "30000:39999", "1" * 50 + "-2"],
)
def test_parse_port_range_rejects(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_port_range(text)
    assert str(info.value).startswith("invalid port range ")
    assert "\n" not in str(info.value)


def test_bind_check_sees_a_listening_socket() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert bind_check(port) is False
    finally:
        listener.close()
    # A port nobody holds: ask the kernel for one, release it, check it.
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("0.0.0.0", 0))
    free_port = probe.getsockname()[1]
    probe.close()
    assert bind_check(free_port) is True
