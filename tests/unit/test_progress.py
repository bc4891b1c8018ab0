"""Progress without Redis: the `::tidal progress` grammar, the python API's validation, the
rate limit (on a fake clock), which reports become events, and how the log writer batches
reports with the lines (a fake pipeline records what one flush would send)."""

from __future__ import annotations

from typing import Any

import pytest

from common.keys import Keys
from tests.unit.test_worker_output import FakeClient
from worker import calls
from worker.calls import (
    PROGRESS_INTERVAL_S,
    STAGE_BURST,
    ProgressReport,
    ProgressThrottle,
    parse_progress_line,
    progress_line,
    progress_report,
)
from worker.output import PROGRESS_EVENTS_MAX, LogWriter, ProgressEvents

# -- the grammar ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("::tidal progress 40", ProgressReport(40.0)),
        ("::tidal progress 40%", ProgressReport(40.0)),
        ("::tidal progress 12.5 compiling", ProgressReport(12.5, "compiling")),
        ("::tidal progress 0 fetch 3 of 8  files ", ProgressReport(0.0, "fetch", "3 of 8 files")),
        ("::tidal progress 100 - done, no stage", ProgressReport(100.0, "", "done, no stage")),
        ("::tidal progress 7 ", ProgressReport(7.0)),  # a trailing space
    ],
)
def test_progress_lines_parse(line: str, expected: ProgressReport) -> None:
    assert parse_progress_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "::tidal progress",  # no percent
        "::tidal progress ",
        "::tidal progress forty",
        "::tidal progress 101",  # over 100
        "::tidal progress -5",
        "::tidal progress 1e2",
        "::tidal progress 4.",
        "::tidal progress .5",
        "::tidal progress 1.2.3",
        "::tidal progress 40  two spaces",
        "::tidal progres 40",  # a typo of the command
        "::tidal stage build",  # an unknown command
        " ::tidal progress 40",  # not at the start of the line
        "::tidal progress 40 " + "s" * 65,  # stage too long
    ],
)
def test_malformed_progress_lines_are_not_reports(line: str) -> None:
    assert parse_progress_line(line) is None


def test_a_long_message_is_cut() -> None:
    report = parse_progress_line("::tidal progress 1 st " + "m" * 1000)
    assert report is not None and len(report.message) == calls.MESSAGE_MAX


@pytest.mark.parametrize(
    "report",
    [ProgressReport(40.0), ProgressReport(12.5, "compile"), ProgressReport(0.0, "", "a b"),
     ProgressReport(100.0, "link", "almost: there")],
)
def test_a_printed_report_parses_back(report: ProgressReport) -> None:
    assert parse_progress_line(progress_line(report)) == report


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        ((150,), "from 0 to 100"),
        ((-1,), "from 0 to 100"),
        ((float("nan"),), "from 0 to 100"),
        (("40",), "must be a number"),
        ((True,), "must be a number"),
        ((10, "two words"), "stage must be one word"),
        ((10, "x" * 65), "stage must be one word"),
    ],
)
def test_bad_python_progress_raises_a_clear_error(args: tuple[Any, ...], culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        progress_report(*args)


def test_python_progress_message_is_one_line() -> None:
    assert progress_report(5, None, "two\nlines") == ProgressReport(5.0, "", "two lines")


# -- the rate limit -------------------------------------------------------------------------


def test_a_tight_loop_writes_the_first_report_and_holds_the_last() -> None:
    t = ProgressThrottle()
    sent = [r for i in range(1000) if (r := t.offer(ProgressReport(i / 10), 5.0))]
    assert sent == [ProgressReport(0.0)]
    assert t.due_in(5.0) == pytest.approx(PROGRESS_INTERVAL_S)
    assert t.take_due(5.05) is None  # not yet
    assert t.take_due(5.0 + PROGRESS_INTERVAL_S) == ProgressReport(99.9)
    assert t.due_in(6.0) is None


def test_a_report_after_the_interval_goes_at_once_and_repeats_are_dropped() -> None:
    t = ProgressThrottle()
    assert t.offer(ProgressReport(1), 0.0) == ProgressReport(1)
    assert t.offer(ProgressReport(1), 1.0) is None  # same as the last one written
    assert t.due_in(1.0) is None
    assert t.offer(ProgressReport(2), 1.0) == ProgressReport(2)


def test_a_new_stage_goes_at_once_within_a_burst() -> None:
    t = ProgressThrottle()
    t.offer(ProgressReport(0, "s0"), 0.0)
    sent = [t.offer(ProgressReport(0, f"s{i}"), 0.001 * i) for i in range(1, 30)]
    assert sum(r is not None for r in sent) == STAGE_BURST
    assert t.take_held(0.05) == ProgressReport(0, "s29")  # the last one is never lost


def test_the_interval_grows_with_the_writes_made() -> None:
    t = ProgressThrottle()
    now = 0.0
    for i in range(calls.PROGRESS_SLOWDOWN_EVERY):
        assert t.offer(ProgressReport(i % 100, "", str(i)), now) is not None
        now += 1.25 * PROGRESS_INTERVAL_S
    assert t.interval() == pytest.approx(2 * PROGRESS_INTERVAL_S)
    assert t.offer(ProgressReport(1, "", "later"), now) is None  # 0.125 s: now too soon


def test_events_at_a_new_step_or_stage_only() -> None:
    events = ProgressEvents()
    percents = [0, 3, 9.99, 10, 15, 55, 100, 100]
    assert [events(ProgressReport(p, "a")) for p in percents] == [
        True, False, False, True, False, True, True, False]
    assert events(ProgressReport(100, "b")) is True
    assert events(ProgressReport(100, "b", "message only")) is False


def test_events_are_capped_per_attempt() -> None:
    events = ProgressEvents()
    made = sum(events(ProgressReport(0, f"stage{i}")) for i in range(PROGRESS_EVENTS_MAX + 50))
    assert made == PROGRESS_EVENTS_MAX


# -- the log writer -------------------------------------------------------------------------


def writer(client: FakeClient, token: str | None = "1-0") -> LogWriter:
    return LogWriter(client, Keys("{p}"), "j1", flush_ms=10_000, max_lines=1000, token=token)


def progress_args(client: FakeClient) -> list[list[Any]]:
    return [args for batch in client.batches for op, (_keys, args) in batch if op == "progress"]


def test_a_tight_loop_of_reports_costs_no_round_trip_per_call() -> None:
    client = FakeClient()
    w = writer(client)
    for i in range(10_001):
        w.progress(ProgressReport(i / 100))
    w.close()
    sent = progress_args(client)
    assert len(client.batches) <= 2 and 2 <= len(sent) <= 5
    token, percent = sent[-1][:2]
    assert (token, percent) == ("1-0", "100")  # the last report is always written


def test_reports_go_in_order_with_the_lines_in_one_flush() -> None:
    client = FakeClient()
    w = writer(client)
    w.add("o", "before")
    w.progress(ProgressReport(50, "build", "half"))
    w.add("o", "after")
    w.close()
    [ops] = client.batches
    assert [op for op, _ in ops] == ["xadd", "progress", "xadd", "publish"]
    keys, args = ops[1][1]
    assert keys == ["{p}:job:j1", "{p}:log:j1", "{p}:events"]
    assert args[:7] == ["1-0", "50", "build", "half", "progress 50% build: half", 1001, "1"]


def test_a_refused_report_turns_progress_off_and_keeps_the_lines() -> None:
    client = FakeClient()
    client.progress_answer = -1  # another attempt owns the job
    w = writer(client)
    w.progress(ProgressReport(10))
    w.add("o", "line")
    assert w.flush() is True
    w.progress(ProgressReport(20, "next"))
    w.close()
    assert [args[1] for args in progress_args(client)] == ["10"]
    assert [f["l"] for b in client.batches for op, (_k, f) in b if op == "xadd"] == ["line"]


def test_no_token_no_progress() -> None:
    client = FakeClient()
    w = writer(client, token=None)
    w.progress(ProgressReport(10))
    w.close()
    assert progress_args(client) == []


# -- the output cap's marker --------------------------------------------------------------


def test_the_cap_marker_says_how_many_lines_were_dropped() -> None:
    client = FakeClient(max_lines=5)
    w = LogWriter(client, Keys("{p}"), "j1", flush_ms=10_000, max_lines=5)
    for i in range(12):
        w.add("o", f"line {i}")
    w.close()
    texts = [f["l"] for b in client.batches for op, (_k, f) in b if op == "xadd"]
    assert texts[:5] == [f"line {i}" for i in range(5)]
    assert texts[5] == "[output over this attempt's limit (5 lines): 7 lines dropped (51 bytes), " \
                      "not stored]"
