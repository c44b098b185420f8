"""Back-off: growing, capped, jittered delays that stop at a deadline."""

from __future__ import annotations

import random

import pytest

from forecaster.retry import Backoff


def test_delays_grow_by_the_factor_up_to_the_cap_and_reset() -> None:
    waits: list[float] = []
    backoff = Backoff(first=0.5, factor=3.0, cap=4.0, jitter=0.0, sleep=waits.append)
    for _ in range(4):
        assert backoff.wait()
    assert waits == [0.5, 1.5, 4.0, 4.0]
    backoff.reset()
    backoff.wait()
    assert waits[-1] == 0.5


def test_jitter_stays_within_its_share_and_varies() -> None:
    backoff = Backoff(first=1.0, factor=1.0, cap=1.0, jitter=0.2, rng=random.Random(7))
    delays = [backoff.delay() for _ in range(200)]
    assert min(delays) >= 0.8 and max(delays) <= 1.2
    assert len(set(delays)) > 100


def test_the_deadline_cuts_the_last_wait_then_ends_the_waiting() -> None:
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    backoff = Backoff(
        first=1.0, factor=2.0, cap=10.0, jitter=0.0, deadline=2.5, sleep=sleep, clock=lambda: now[0]
    )
    assert backoff.wait() and backoff.wait()
    assert not backoff.wait()
    assert waits == [1.0, 1.5]


@pytest.mark.parametrize("bad", [{"first": 0.0}, {"factor": 0.5}, {"cap": 0.01}, {"jitter": 1.0}])
def test_nonsense_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        Backoff(**bad)
