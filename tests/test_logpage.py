"""A FetchLogs page encoded a slice at a time is byte for byte the whole message's encoding."""

from __future__ import annotations

import pytest

from fluster_worker.logs.model import LogLine
from fluster_worker.web import wire
from fluster_worker.web.logpage import SLICE, encode_page
from fluster_worker.web.rpc import codec


def lines(n: int) -> list[LogLine]:
    texts = ["plain", "été ☃ \U0001f600", "quote \" back\\slash \t tab \x00 nul", "", "<script>&amp;"]
    start = 1_700_000_000_000_000_000
    return [LogLine(start + i * 7919, ("stdout", "stderr")[i % 2], texts[i % 5], i) for i in range(n)]


@pytest.mark.parametrize("n", [0, 1, 5, SLICE - 1, SLICE, SLICE + 1, 3 * SLICE + 17])
@pytest.mark.parametrize("media", [codec.PROTO, codec.JSON])
def test_sliced_encoding_is_the_whole_messages(n: int, media: str) -> None:
    page = lines(n)
    assert encode_page(page, media) == codec.encode(wire.log_entries(page), media)
