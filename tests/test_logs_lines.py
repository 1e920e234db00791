"""The ``docker logs --timestamps`` parser: timestamps, chunk boundaries, Docker's
partial messages, CRLF, UTF-8, over-long lines."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluster_worker.logs.lines import (
    StreamParser,
    cut_utf8,
    format_since,
    parse_timestamp,
    truncate_line,
)
from fluster_worker.testing.logs import docker_line, docker_output, format_timestamp

T0 = 1_795_000_000_123_456_789  # 2026-11-18T...


def feed_all(parser: StreamParser, chunks: list[bytes], clean: bool = True) -> tuple[list[int], list[bytes]]:
    stamps: list[int] = []
    lines: list[bytes] = []
    for chunk in chunks:
        s, l_ = parser.feed(chunk)
        stamps += s
        lines += l_
    if clean:
        s, l_ = parser.finish()
        stamps += s
        lines += l_
    return stamps, lines


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks, last = [], 0
    for p in points:
        chunks.append(data[last:p])
        last = p
    chunks.append(data[last:])
    return chunks


# -- timestamps -----------------------------------------------------------------------


def test_parse_docker_timestamp_keeps_nanoseconds() -> None:
    assert parse_timestamp("1970-01-01T00:00:00.000000001Z") == 1
    assert parse_timestamp(b"2026-11-28T11:37:13.304690917Z") == 1795865833_304690917
    assert parse_timestamp("2026-11-28T11:37:13Z") == 1795865833_000000000
    assert parse_timestamp("2026-11-28T11:37:13.5Z") == 1795865833_500000000


def test_parse_timestamp_with_offset_and_extra_digits() -> None:
    assert parse_timestamp("2026-11-28T13:37:13.304690917+02:00") == 1795865833_304690917
    assert parse_timestamp("2026-11-28T10:37:13.304690917-01:00") == 1795865833_304690917
    assert parse_timestamp("2026-11-28T11:37:13.3046909179999Z") == 1795865833_304690917


@pytest.mark.parametrize(
    "text",
    ["", "hello", "2026-11-28 11:37:13Z", "2026-13-28T11:37:13Z", "2026-02-30T11:37:13Z", "2026-11-28T11:37:13"],
)
def test_parse_timestamp_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(text)


@given(st.integers(min_value=0, max_value=4_000_000_000 * 10**9))
def test_timestamp_round_trip(ns: int) -> None:
    assert parse_timestamp(format_timestamp(ns)) == ns


def test_format_since() -> None:
    assert format_since(1795865833_000000042) == "1795865833.000000042"


# -- splitting ------------------------------------------------------------------------------


def test_lines_and_partial_last_line() -> None:
    parser = StreamParser(1 << 20)
    out = docker_line(T0, "one") + docker_line(T0 + 1, "") + docker_line(T0 + 2, "no newline", newline=False)
    stamps, lines = parser.feed(out)
    assert lines == [b"one", b""]
    assert stamps == [T0, T0 + 1]
    assert parser.buffered > 0
    assert parser.finish() == ([T0 + 2], [b"no newline"])
    assert parser.finish() == ([], [])


def test_discard_drops_the_unfinished_line() -> None:
    parser = StreamParser(1 << 20)
    parser.feed(docker_line(T0, "done") + docker_line(T0 + 1, "half", newline=False)[:-2])
    assert parser.discard() > 0
    assert parser.finish() == ([], [])


lines_strategy = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=10**6),
        st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=30),
    ),
    max_size=20,
)


@settings(max_examples=300)
@given(lines_strategy, st.lists(st.integers(min_value=0, max_value=2000), max_size=12), st.booleans())
def test_any_chunking_gives_the_same_lines(items: list[tuple[int, str]], cuts: list[int], last_partial: bool) -> None:
    stamps_in = []
    stamp = T0
    for delta, _ in items:
        stamp += delta
        stamps_in.append(stamp)
    out = b"".join(docker_line(s, d) for s, (_, d) in zip(stamps_in, items, strict=True))
    if last_partial and items:
        out = out[:-1]  # the container's last line had no newline
    stamps, lines = feed_all(StreamParser(1 << 20), split_at(out, cuts))
    assert [line.decode() for line in lines] == [d for _, d in items]
    assert stamps == stamps_in


def test_every_split_position_of_multibyte_text() -> None:
    out = docker_line(T0, "héllo wörld ✓ 🎉") + docker_line(T0 + 5, "日本語")
    for i in range(len(out) + 1):
        for j in range(i, len(out) + 1, 7):
            stamps, lines = feed_all(StreamParser(1 << 20), [out[:i], out[i:j], out[j:]])
            assert [line.decode() for line in lines] == ["héllo wörld ✓ 🎉", "日本語"], (i, j)


def test_invalid_utf8_is_replaced() -> None:
    out = docker_line(T0, b"bad \xff\xfe end") + docker_line(T0, b"cut \xe2\x9c") + docker_line(T0, b"ok")
    _, lines = feed_all(StreamParser(1 << 20), [out])
    assert [line.decode() for line in lines] == ["bad \ufffd\ufffd end", "cut \ufffd", "ok"]


def test_crlf() -> None:
    out = docker_line(T0, "windows\r") + docker_line(T0, "a\rb") + docker_line(T0, "\r")
    for i in range(len(out) + 1):
        _, lines = feed_all(StreamParser(1 << 20), [out[:i], out[i:]])
        assert lines == [b"windows", b"a\rb", b""]


def test_docker_partial_messages_are_reassembled() -> None:
    text = ("x" * 9000 + "é" + "y" * 30000).encode()  # é straddles no boundary ...
    text2 = ("z" * 16383 + "€" + "w" * 10).encode()  # ... € straddles the 16384 boundary
    exact = b"q" * 16384  # Docker sends an empty last piece
    out = docker_output([(T0, text), (T0 + 1, text2), (T0 + 2, exact), (T0 + 3, b"short")])
    for cuts in ([], [10], [16000, 16500, 16420], list(range(0, len(out), 4096))):
        stamps, lines = feed_all(StreamParser(1 << 20), split_at(out, cuts))
        assert lines == [text, text2, exact, b"short"]
        assert stamps == [T0, T0 + 1, T0 + 2, T0 + 3]


def test_over_long_line_is_truncated_with_marker() -> None:
    limit = 1000
    long = ("é" * 700).encode()  # 1400 bytes: the cut falls inside a character
    out = docker_line(T0, long) + docker_line(T0 + 1, "after")
    stamps, lines = feed_all(StreamParser(limit), [out])
    assert stamps == [T0, T0 + 1]
    assert lines[0] == ("é" * 500).encode() + b" [fluster: line truncated, 400 bytes dropped]"
    assert lines[1] == b"after"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=70000), max_size=10))
def test_huge_line_keeps_memory_bounded_and_counts_dropped_bytes(cuts: list[int]) -> None:
    limit = 20000
    data = bytes(range(48, 58)) * 20000  # 200000 bytes, over several Docker pieces
    out = docker_output([(T0, data), (T0 + 1, b"next")]) + docker_line(T0 + 2, "x" * 30000)
    parser = StreamParser(limit)
    stamps, lines = [], []
    peak = 0
    for chunk in split_at(out, cuts + list(range(0, len(out), 8192))):
        s, l_ = parser.feed(chunk)
        stamps += s
        lines += l_
        peak = max(peak, parser.buffered)
    s, l_ = parser.finish()
    lines += l_
    stamps += s
    assert peak < limit + 4 * 8192
    assert stamps == [T0, T0 + 1, T0 + 2]
    assert lines[0] == data[:limit] + b" [fluster: line truncated, 180000 bytes dropped]"
    assert lines[1] == b"next"
    assert lines[2] == b"x" * 20000 + b" [fluster: line truncated, 10000 bytes dropped]"


def test_unfinished_over_long_line_at_clean_end() -> None:
    parser = StreamParser(100)
    out = docker_line(T0, "a" * 5000, newline=False)
    stamps, lines = feed_all(parser, [out[i : i + 64] for i in range(0, len(out), 64)])
    assert stamps == [T0]
    assert lines == [b"a" * 100 + b" [fluster: line truncated, 4900 bytes dropped]"]


def test_cli_messages_are_diagnostics_not_lines() -> None:
    parser = StreamParser(1 << 20)
    stamps, lines = feed_all(parser, [b"Error response from daemon: No such container: abc\n" + docker_line(T0, "x")])
    assert lines == [b"x"]
    assert parser.take_diagnostics() == ["Error response from daemon: No such container: abc"]
    assert parser.take_diagnostics() == []


def test_other_timestamp_forms() -> None:
    out = b"2026-11-28T13:37:13.304690917+02:00 local\n2026-11-28T11:37:13Z coarse\n"
    stamps, lines = feed_all(StreamParser(1 << 20), [out])
    assert lines == [b"local", b"coarse"]
    assert stamps == [1795865833_304690917, 1795865833_000000000]


def test_helpers() -> None:
    assert cut_utf8("aé".encode(), 2) == b"a"
    assert cut_utf8(b"abc", 5) == b"abc"
    assert truncate_line(b"abcdef", 4) == b"abcd [fluster: line truncated, 2 bytes dropped]"
