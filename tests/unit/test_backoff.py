"""The retry backoff is a pure function: a table of cases, with the randomness pinned."""

from __future__ import annotations

import pytest

from common.backoff import retry_delay_s

MID = 0.5  # rand() == 0.5 means no jitter


@pytest.mark.parametrize(
    ("attempt", "delay", "backoff", "max_delay", "expected"),
    [
        (1, 5.0, 2.0, 300.0, 5.0),
        (2, 5.0, 2.0, 300.0, 10.0),
        (3, 5.0, 2.0, 300.0, 20.0),
        (7, 5.0, 2.0, 300.0, 300.0),  # 320 capped
        (1, 1.0, 1.0, 60.0, 1.0),  # no growth
        (10, 1.0, 1.0, 60.0, 1.0),
        (0, 5.0, 2.0, 300.0, 5.0),  # below 1 counts as the first retry
        (-3, 5.0, 2.0, 300.0, 5.0),
        (1, 0.0, 2.0, 300.0, 0.0),  # no delay asked
        (5, 5.0, 2.0, 0.0, 0.0),
        (1, 10.0, 2.0, 3.0, 3.0),  # max below the first delay
        (10_000, 5.0, 10.0, 300.0, 300.0),  # would overflow a float
        (101, 5.0, 10.0, 7 * 24 * 3600.0, 7 * 24 * 3600.0),
    ],
)
def test_exponential_and_capped(
    attempt: int, delay: float, backoff: float, max_delay: float, expected: float
) -> None:
    got = retry_delay_s(attempt, delay, backoff, max_delay, rand=lambda: MID)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    ("rand", "jitter", "expected"),
    [
        (0.0, 0.1, 9.0),  # lowest: -10 %
        (0.5, 0.1, 10.0),
        (0.999999, 0.1, 11.0),  # highest: +10 %
        (0.0, 0.5, 5.0),
        (0.0, 0.0, 10.0),  # no jitter
        (0.0, 1.0, 0.0),  # never negative
    ],
)
def test_jitter_spreads_around_the_base(rand: float, jitter: float, expected: float) -> None:
    got = retry_delay_s(2, 5.0, 2.0, 300.0, jitter=jitter, rand=lambda: rand)
    assert got == pytest.approx(expected, abs=1e-4)


def test_jitter_never_exceeds_the_cap() -> None:
    assert retry_delay_s(20, 5.0, 2.0, 300.0, jitter=0.1, rand=lambda: 0.999) <= 300.0
    assert retry_delay_s(20, 5.0, 2.0, 300.0, jitter=0.1, rand=lambda: 0.0) == pytest.approx(270.0)


def test_default_randomness_stays_in_bounds() -> None:
    for _ in range(200):
        assert 4.5 <= retry_delay_s(1, 5.0, 2.0, 300.0) <= 5.5
