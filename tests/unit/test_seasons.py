"""Seasons from the calendar, plus autocorrelation's estimate; what is tried and why the rest is dropped."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from forecaster.train.seasons import calendar_seasons, plan_seasons

MINUTE = 60_000
DAY = 1440 * MINUTE


def stamps(freq: str, n: int = 50) -> np.ndarray:
    return (
        pd.date_range("2001-01-01", periods=n, freq=freq).astype("datetime64[ms]").astype(np.int64).to_numpy()
    )


@pytest.mark.parametrize(
    "freq, name, seasons",
    [
        ("MS", "monthly", (12,)),
        ("ME", "monthly", (12,)),
        ("QS", "quarterly", (4,)),
        ("W-MON", "weekly", (52,)),
        ("D", "daily", (7, 365)),
        ("h", "hourly", (24, 168)),
        ("30min", "half-hourly", (48, 336)),
        ("15min", "15-minute", (96, 672)),
        ("min", "minutely", (60, 1440)),
        ("YS", "irregular", ()),
    ],
)
def test_the_spacing_of_the_timestamps_names_the_seasons(freq: str, name: str, seasons: tuple) -> None:
    assert calendar_seasons([stamps(freq), stamps(freq, 5)]) == (name, seasons)


def test_one_value_per_series_has_no_calendar() -> None:
    assert calendar_seasons([np.array([5]), np.array([], dtype=np.int64)]) == ("irregular", ())


def reach(season: int) -> int:
    return season - 1  # seasonal naive over one season reads season - 1 values before the current one


def test_a_trending_monthly_set_tries_a_year_though_autocorrelation_finds_none(caplog) -> None:
    """The failure of the issue: a trend swamps the yearly pattern; the calendar still offers 12."""
    rng = np.random.default_rng(0)
    t = np.arange(90)
    values = [100 + 3 * t + rng.normal(0, 5, len(t)) for _ in range(4)]  # trend and noise, no season
    with caplog.at_level(logging.INFO, logger="forecaster.train.seasons"):
        plan = plan_seasons([stamps("MS", 90)] * 4, values, declared=None, longer=[], reach=reach, window=256)
    assert (plan.season, plan.more) == (12, [])
    assert plan.tried == {12: "calendar (monthly)"}
    assert "season 12 tried: calendar (monthly)" in caplog.text
    assert "autocorrelation of first differences: no season found" in caplog.text


def test_daily_keeps_the_week_drops_the_year_the_window_cannot_hold_and_adds_autocorrelation() -> None:
    rng = np.random.default_rng(1)
    t = np.arange(800)
    values = [10 + np.sin(2 * np.pi * t / 30) + 0.01 * rng.normal(size=len(t))]  # a 30-day cycle
    plan = plan_seasons([stamps("D", 800)], values, declared=None, longer=[], reach=reach, window=256)
    assert (plan.season, plan.more) == (7, [30])
    assert plan.tried == {7: "calendar (daily)", 30: "autocorrelation of first differences"}
    assert plan.dropped == {365: "calendar (daily): its baseline reads 365 values, state.window is 256"}
    wide = plan_seasons([stamps("D", 800)], values, declared=None, longer=[], reach=reach, window=400)
    assert wide.more == [365, 30]


def test_a_history_shorter_than_two_seasons_drops_the_season() -> None:
    plan = plan_seasons(
        [stamps("MS", 20)], [np.arange(20.0)], declared=None, longer=[], reach=reach, window=256
    )
    assert plan.season == 1 and plan.tried == {}
    assert (
        plan.dropped[12]
        == "calendar (monthly): the longest training part (20 values) holds fewer than two seasons"
    )


def test_a_declared_season_replaces_calendar_and_autocorrelation() -> None:
    values = [np.arange(400.0)]
    plan = plan_seasons([stamps("h", 400)], values, declared=5, longer=[168], reach=reach, window=256)
    assert (plan.season, plan.more) == (5, [168])
    assert plan.describe() == {
        "season": 5,
        "tried": {"5": "declared (train.season)", "168": "declared (train.seasons)"},
        "dropped": {},
    }
