"""Refused calls are logged once each, with method, code and reason, and a flood
is rate-limited to a bounded number of lines plus one summary per window."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from fluster_worker.web.refusals import RefusalLog


def capture(refusals: RefusalLog) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    refusals.log = Logger(namespace="test.refusals", observer=events.append)
    return events


def test_each_refusal_is_one_line_with_method_code_reason_and_peer() -> None:
    clock = Clock()
    refusals = RefusalLog(clock, burst=5, interval_s=60)
    events = capture(refusals)
    refusals.refused("RunJob", "invalid_argument", "invalid job_id '../x'\nsecond line", peer="10.0.0.5:4242")
    assert len(events) == 1
    text = formatEvent(events[0])
    assert text == "refused RunJob from 10.0.0.5:4242: invalid_argument: invalid job_id '../x' second line"
    assert events[0]["method"] == "RunJob" and events[0]["code"] == "invalid_argument"


def test_a_flood_writes_burst_lines_then_one_summary_per_window() -> None:
    clock = Clock()
    refusals = RefusalLog(clock, burst=3, interval_s=60)
    events = capture(refusals)
    for _ in range(10_000):
        refusals.refused("GetJobStatus", "not_found", "job x not found")
    refusals.refused("RunJob", "invalid_argument", "bad")
    assert len(events) == 3  # the rest wait for the window's summary
    clock.advance(60)
    assert len(events) == 4
    summary = formatEvent(events[-1])
    assert "suppressed 9998 more refused calls" in summary
    assert "GetJobStatus not_found x9997" in summary and "RunJob invalid_argument x1" in summary
    assert refusals.total == 10_001
    # A new window logs again, and nothing is pending once the flood stopped.
    refusals.refused("KillJob", "failed_precondition", "already finished")
    assert len(events) == 5 and "KillJob" in formatEvent(events[-1])
    assert clock.getDelayedCalls() == []


def test_hostile_text_is_bounded() -> None:
    refusals = RefusalLog(Clock(), burst=2)
    events = capture(refusals)
    refusals.refused("M" * 10_000, "invalid_argument", "r" * 100_000, peer="p" * 10_000)
    text = formatEvent(events[0])
    assert len(text) < 700


def test_stop_writes_the_pending_summary_and_cancels_its_timer() -> None:
    clock = Clock()
    refusals = RefusalLog(clock, burst=1)
    events = capture(refusals)
    refusals.refused("RunJob", "invalid_argument", "a")
    refusals.refused("RunJob", "invalid_argument", "b")
    assert len(clock.getDelayedCalls()) == 1
    refusals.stop()
    assert clock.getDelayedCalls() == []
    assert "suppressed 1 more" in formatEvent(events[-1])


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        RefusalLog(Clock(), burst=0)


def test_counts_have_labels_from_fixed_sets_only() -> None:
    refusals = RefusalLog(Clock(), burst=1)
    capture(refusals)
    refusals.refused("RunJob", "permission_denied", "no")
    refusals.refused("RunJob", "permission_denied", "no")
    refusals.refused("GetJobStatus", "not_found", "job x not found")
    for i in range(1000):  # made-up methods, paths and codes
        refusals.refused(f"Made{i}", "permission_denied", "no")
        refusals.refused(f"other.Service/M{i}", "unimplemented", "no")
        refusals.refused(f"GET /x{i}", "permission_denied", "no")
        refusals.refused("RunJob", f"code{i}", "no")
        refusals.refused(f"runjob {i}", "permission_denied", "no")
    assert refusals.counts == {
        ("RunJob", "permission_denied"): 2,
        ("GetJobStatus", "not_found"): 1,
        ("other", "permission_denied"): 2000,
        ("other", "unimplemented"): 1000,
        ("page", "permission_denied"): 1000,
        ("RunJob", "unknown"): 1000,
    }
    assert refusals.total == 5003
