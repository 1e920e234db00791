"""parse_memory / parse_cpu: the forms peers write, and everything else rejected."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluster_worker.containers.resources import (
    MAX_CPU_CORES,
    MAX_MEMORY_BYTES,
    MIN_MEMORY_BYTES,
    parse_cpu,
    parse_memory,
)

KI, MI, GI, TI = 2**10, 2**20, 2**30, 2**40


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8g", 8 * GI),
        ("512m", 512 * MI),
        ("1024", 1024 * MI),  # a bare number is megabytes
        ("2GB", 2 * GI),
        ("8Gi", 8 * GI),
        ("512MiB", 512 * MI),
        ("1.5g", 3 * GI // 2),
        ("8192k", 8 * MI),
        ("8192kb", 8 * MI),
        ("8192KiB", 8 * MI),
        ("8192Ki", 8 * MI),
        ("1t", TI),
        ("1TiB", TI),
        ("  8G  ", 8 * GI),
        ("8 g", 8 * GI),
        ("8 GiB", 8 * GI),
        ("6m", MIN_MEMORY_BYTES),
        ("0.5g", GI // 2),
        ("1.1g", int(Fraction("1.1") * GI)),  # exact, floor
        ("00512m", 512 * MI),
        ("4194304t", MAX_MEMORY_BYTES),
    ],
)
def test_accepts_peer_forms(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "\t"])
def test_empty_means_no_limit(text: str) -> None:
    assert parse_memory(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "8x", "-1", "-1g", "+1g", "0", "0g", "0.0g", "1e9", "1E3m", "8gg", ".5g", "5.g",
        "8b", "8 g b", "8 g i", "g", "m8", "8,5g", "1_000m", "0x10m", "inf", "nan",
        "\u0663g", "８g", "8\u00a0g", "8g\n9", "1k", "5m", "4194305t", "9" * 30 + "t",
        "1" * 100, "8p", "8 eb", "8 MB\x00",
    ],
)
def test_rejects_everything_else(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_memory(text)
    message = str(info.value)
    assert message.startswith("invalid memory ")
    assert "\n" not in message
    assert len(message) < 200


def test_error_message_names_the_input_and_the_expected_form() -> None:
    with pytest.raises(ValueError) as info:
        parse_memory("8x")
    assert str(info.value) == (
        'invalid memory "8x": expected a number with an optional unit '
        '(k, m, g, t; e.g. "512m", "8g", "1.5Gi")'
    )


def test_not_a_string_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        parse_memory(512)  # type: ignore[arg-type]


_UNITS = {
    "": MI, "k": KI, "kb": KI, "ki": KI, "kib": KI, "m": MI, "mb": MI, "mi": MI,
    "mib": MI, "g": GI, "gb": GI, "gi": GI, "gib": GI, "t": TI, "tb": TI, "ti": TI,
    "tib": TI,
}


@given(
    number=st.integers(min_value=1, max_value=10**6),
    unit=st.sampled_from(sorted(_UNITS)),
    upper=st.lists(st.booleans(), min_size=3, max_size=3),
    spaces=st.tuples(*(st.sampled_from(["", " ", "  "]) for _ in range(3))),
)
def test_integers_with_any_unit_spelling(
    number: int, unit: str, upper: list[bool], spaces: tuple[str, str, str]
) -> None:
    spelled = "".join(c.upper() if u else c for c, u in zip(unit, upper, strict=False))
    text = f"{spaces[0]}{number}{spaces[1]}{spelled}{spaces[2]}"
    expected = number * _UNITS[unit]
    if expected < MIN_MEMORY_BYTES or expected > MAX_MEMORY_BYTES:
        with pytest.raises(ValueError):
            parse_memory(text)
    else:
        assert parse_memory(text) == expected


@given(
    whole=st.integers(min_value=0, max_value=10**4),
    frac=st.text(alphabet="0123456789", min_size=1, max_size=9),
    unit=st.sampled_from(["m", "g", "Gi", "t"]),
)
def test_decimals_round_down_exactly(whole: int, frac: str, unit: str) -> None:
    text = f"{whole}.{frac}{unit}"
    exact = Fraction(f"{whole}.{frac}") * _UNITS[unit.lower()]
    if int(exact) < MIN_MEMORY_BYTES or int(exact) > MAX_MEMORY_BYTES:
        with pytest.raises(ValueError):
            parse_memory(text)
    else:
        assert parse_memory(text) == int(exact)


@given(st.text(max_size=80))
def test_any_text_parses_in_range_or_raises_one_line_value_error(text: str) -> None:
    try:
        result = parse_memory(text)
    except ValueError as e:
        assert "\n" not in str(e)
        assert str(e).startswith("invalid memory ")
        return
    assert result is None or MIN_MEMORY_BYTES <= result <= MAX_MEMORY_BYTES
    if result is None:
        assert not text.strip()


@given(st.integers(min_value=1, max_value=MAX_CPU_CORES))
def test_cpu_cores_to_nano_cpus(cores: int) -> None:
    assert parse_cpu(cores) == cores * 10**9


def test_cpu_zero_is_no_limit() -> None:
    assert parse_cpu(0) is None


@given(st.integers(max_value=-1) | st.integers(min_value=MAX_CPU_CORES + 1))
def test_cpu_out_of_range_is_rejected(cores: int) -> None:
    with pytest.raises(ValueError) as info:
        parse_cpu(cores)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"invalid cpu {cores}")


@pytest.mark.parametrize("cores", [True, 1.5, "2", None])
def test_cpu_non_int_is_a_type_error(cores: object) -> None:
    with pytest.raises(TypeError):
        parse_cpu(cores)  # type: ignore[arg-type]
