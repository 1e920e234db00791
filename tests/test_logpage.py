"""A FetchLogs page encoded a slice at a time is byte for byte the whole message's
encoding; at most PAGES_IN_FLIGHT pages are between their query and their bytes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.defer import Deferred, fail, succeed

from fluster_worker.logs.model import InvalidLogQuery, LogLine
from fluster_worker.testing.logs import InlinePool
from fluster_worker.web import wire
from fluster_worker.web.logpage import INLINE_ENTRIES, SLICE, PageGate, encode_page
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


def test_a_page_holds_its_slot_from_its_query_to_its_encoded_bytes() -> None:
    gate = PageGate(limit=1)
    first: Deferred[list[LogLine]] = Deferred()
    started: list[str] = []

    def query(name: str, d: Deferred[list[LogLine]]) -> Callable[[], Deferred[list[LogLine]]]:
        def run() -> Deferred[list[LogLine]]:
            started.append(name)
            return d

        return run

    page1 = Deferred.fromCoroutine(gate.page(query("first", first)))
    page2 = Deferred.fromCoroutine(gate.page(query("second", succeed(lines(3)))))
    assert started == ["first"]
    first.callback(lines(INLINE_ENTRIES + 1))
    encoded = page1.result
    assert started == ["first"] and not page2.called  # the first page is not encoded yet
    body = encoded.body(codec.PROTO, InlinePool())
    assert body.result == codec.encode(wire.log_entries(lines(INLINE_ENTRIES + 1)), codec.PROTO)
    assert started == ["first", "second"]
    # a small page is encoded inline, and gives its slot back then
    assert page2.result.body(codec.JSON, InlinePool()) == codec.encode(wire.log_entries(lines(3)), codec.JSON)
    third = Deferred.fromCoroutine(gate.page(query("third", succeed([]))))
    assert third.called and started == ["first", "second", "third"]


def test_a_failed_query_gives_its_slot_back() -> None:
    gate = PageGate(limit=1)
    failed = Deferred.fromCoroutine(gate.page(lambda: fail(InvalidLogQuery("bad regex"))))
    failed.addErrback(lambda f: f.trap(InvalidLogQuery))
    after = Deferred.fromCoroutine(gate.page(lambda: succeed(lines(1))))
    assert after.called
