"""Backoff and retry budget: growth, cap, jitter bounds, attempt limit and deadline, with a fake clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.backoff import Backoff, RetryBudget


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ceilings_grow_by_factor_until_the_cap() -> None:
    backoff = Backoff(base=0.1, factor=2.0, cap=1.0, jitter=0.0)
    assert [backoff.ceiling(n) for n in range(7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_without_jitter_the_delay_is_the_ceiling() -> None:
    backoff = Backoff(base=0.05, factor=3.0, cap=2.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(5)] == pytest.approx([0.05, 0.15, 0.45, 1.35, 2.0])


def test_huge_attempt_numbers_stay_at_the_cap() -> None:
    assert Backoff(base=0.1, factor=2.0, cap=5.0).ceiling(10_000) == 5.0
    assert Backoff(base=0.1, factor=1.0, cap=5.0).ceiling(10_000) == pytest.approx(0.1)


def test_full_jitter_spans_zero_to_the_ceiling() -> None:
    backoff = Backoff(base=1.0, factor=2.0, cap=8.0, jitter=1.0)
    assert backoff.delay(2, rand=lambda: 0.0) == 4.0
    assert backoff.delay(2, rand=lambda: 0.999999) == pytest.approx(0.0, abs=1e-5)
    rng = random.Random(7)
    delays = [backoff.delay(3, rng.random) for _ in range(2000)]
    assert all(0.0 < d <= 8.0 for d in delays)
    # Spread over the whole range, not bunched: both quarters at the ends are visited.
    assert min(delays) < 2.0 and max(delays) > 6.0


@given(
    base=st.floats(0.001, 10.0),
    factor=st.floats(1.0, 10.0),
    extra=st.floats(0.0, 100.0),
    jitter=st.floats(0.0, 1.0),
    attempt=st.integers(0, 200),
    u=st.floats(0.0, 1.0, exclude_max=True),
)
def test_delay_always_within_jitter_bounds(
    base: float, factor: float, extra: float, jitter: float, attempt: int, u: float
) -> None:
    backoff = Backoff(base=base, factor=factor, cap=base + extra, jitter=jitter)
    ceiling = backoff.ceiling(attempt)
    assert base * 0.999999 <= ceiling <= backoff.cap
    delay = backoff.delay(attempt, rand=lambda: u)
    assert ceiling * (1 - jitter) - 1e-9 <= delay <= ceiling + 1e-9


@pytest.mark.parametrize(
    "kwargs",
    [{"base": 0}, {"base": -1}, {"factor": 0.5}, {"cap": 0.01}, {"jitter": 1.5}, {"jitter": -0.1}],
)
def test_bad_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_budget_gives_up_after_max_attempts() -> None:
    clock = FakeClock()
    budget = RetryBudget(Backoff(base=0.1, jitter=0.0), max_attempts=3, clock=clock)
    assert budget.fail() == pytest.approx(0.1)
    assert budget.fail() == pytest.approx(0.2)
    assert budget.fail() is None
    assert budget.failures == 3


def test_budget_pauses_never_pass_the_deadline_and_then_it_gives_up() -> None:
    clock = FakeClock()
    budget = RetryBudget(Backoff(base=1.0, factor=2.0, cap=4.0, jitter=0.0), deadline=5.5, clock=clock)
    pauses = []
    while (pause := budget.fail()) is not None:
        pauses.append(pause)
        clock.now += pause + 0.5  # the pause, then an attempt that takes 0.5 s and fails
    # Attempts begin at 0, 1.5 and 4.0 s; the last pause is cut so the last attempt begins at
    # the 5.5 s deadline, and its failure at 6.0 s spends the budget.
    assert pauses == pytest.approx([1.0, 2.0, 1.5])
    assert budget.elapsed() == pytest.approx(6.0)


def test_budget_counts_from_when_the_trouble_began() -> None:
    clock = FakeClock()
    budget = RetryBudget(Backoff(base=1.0, jitter=0.0), deadline=10.0, clock=clock)
    budget.start(at=clock.now - 9.5)  # the first send was 9.5 s ago and never answered
    assert budget.fail() == pytest.approx(0.5)
    clock.now += 0.6
    assert budget.fail() is None


def test_reset_starts_a_fresh_budget() -> None:
    clock = FakeClock()
    budget = RetryBudget(Backoff(base=1.0, jitter=0.0), deadline=5.0, max_attempts=10, clock=clock)
    budget.fail()
    clock.now += 4.0
    budget.fail()
    budget.reset()
    assert not budget.active and budget.failures == 0
    clock.now += 100.0
    assert budget.fail() == pytest.approx(1.0)  # starts from the first ceiling again
    assert budget.elapsed() == 0.0


def test_budget_without_limits_never_gives_up() -> None:
    clock = FakeClock()
    budget = RetryBudget(Backoff(base=0.1, cap=1.0, jitter=0.0), clock=clock)
    for _ in range(1000):
        pause = budget.fail()
        assert pause is not None and pause <= 1.0
        clock.now += 10.0
