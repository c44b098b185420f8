"""Where forecasts are scored: on a series' time grid, the same as by value without gaps."""

from __future__ import annotations

import numpy as np
import pytest

from forecaster.tools.interval_score import IntervalScores
from forecaster.tools.pairing import SeriesGrid
from forecaster.train.baselines import insample_scale, score_with_baselines, seasonal_naive, targets


def test_a_gapless_grid_scores_as_by_value() -> None:
    v = np.random.default_rng(0).normal(10.0, 2.0, 60)
    forecasts = {"model": np.random.default_rng(1).normal(10.0, 2.0, (60, 4))}
    grid = SeriesGrid.of(np.arange(60) * 3_600_000, v, np.full(60, 3_600_000))
    for g in (grid, SeriesGrid.by_value(v)):
        np.testing.assert_array_equal(g.targets(4), targets(v, 4))
        np.testing.assert_array_equal(g.seasonal_naive(4, 7), seasonal_naive(v, 4, 7))
        assert g.scale(7, 30) == insample_scale(v[:30], 7)
        mine = g.errors(forecasts, slice(29, 59), 4, 7, 30)
        theirs = score_with_baselines(forecasts, v, slice(29, 59), 4, 7, 30)
        for name, e in theirs.items():
            np.testing.assert_array_equal(mine[name].count, e.count)
            np.testing.assert_allclose(mine[name].sum_scaled, e.sum_scaled)


def test_missing_periods_are_never_targets_and_the_naive_reads_them_imputed() -> None:
    ts = np.array([0, 10, 20, 50, 61, 70])  # 30 and 40 missing; 61 snaps to 60
    grid = SeriesGrid.of(ts, np.array([1.0, 2.0, 3.0, 6.0, 7.0, 8.0]), np.full(6, 10), season=2)
    assert grid.position.tolist() == [0, 1, 2, 5, 6, 7]
    assert grid.target_rows(3).tolist() == [[1, 2, -1], [2, -1, -1], [-1, -1, 3], [4, 5, -1], [5, -1, -1]] + [
        [-1, -1, -1]
    ]
    # The engine imputes a missing period from the values before it (forecaster.timegrid.impute): 30 <- the
    # value at 10, a season (2) before it (two seasons are not held yet); 40 <- the value at 20 moved by the
    # change of level, the mean of the last season (at 20, 30: 3, 2) minus the one before (1, 2): 3 + 1.
    assert grid.filled.tolist() == [1.0, 2.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0]
    assert grid.seasonal_naive(2, 2)[2].tolist() == [2.0, 3.0]  # 30 and 40 a season back: 10 and 20
    # MASE's scale over pairs of real values a season apart: (3-1), (8-6) only.
    assert grid.scale(2, 6) == pytest.approx(2.0)


def test_a_restart_ends_the_pairing() -> None:
    ts = np.array([0, 10, 20, 30, 30 + 10 * 500, 30 + 10 * 501])  # a gap of 499 periods > max_gap 8
    grid = SeriesGrid.of(ts, np.arange(6.0), np.full(6, 10), season=1, max_gap=8)
    assert grid.segment.tolist() == [0, 0, 0, 0, 1, 1]
    assert grid.target_rows(1)[:, 0].tolist() == [1, 2, 3, -1, 5, -1]  # 30 -> the value after the gap: no


def test_forecasts_made_under_another_period_are_not_scored() -> None:
    ts = np.array([0, 10, 20, 30, 40])
    grid = SeriesGrid.of(ts, np.arange(5.0), np.array([0, 0, 10, 10, 10]))
    assert grid.scored.tolist() == [False, False, True, True, True]
    assert grid.target_rows(1)[:, 0].tolist() == [-1, -1, 3, 4, -1]
    by_value = SeriesGrid.of(ts, np.arange(5.0), np.array([10, 0, 0, 0, 0]))
    assert by_value.target_rows(1)[:, 0].tolist() == [-1, 2, 3, 4, -1]


def test_interval_scores_skip_targets_that_do_not_exist() -> None:
    values = np.array([1.0, 2.0, 3.0, 4.0])
    lower = values[:, None, None] + np.zeros((4, 1, 2))  # (T, L=1, H=2)
    scores = IntervalScores.empty(["80"], 2)
    scores.add(
        values,
        lower - 1.0,
        lower + 1.5,
        targets=np.array([[2.0, np.nan], [np.nan, 9.0]] + [[np.nan] * 2] * 2),
    )
    assert scores.count.tolist() == [1, 1] and scores.inside.tolist() == [[1, 0]]
    plain, paired = IntervalScores.empty(["80"], 2), IntervalScores.empty(["80"], 2)
    plain.add(values, lower - 1.0, lower + 1.5)
    paired.add(values, lower - 1.0, lower + 1.5, targets=targets(values, 2))
    for field in ("count", "inside", "winkler_sum"):  # the default pairing is the k-th next value
        np.testing.assert_array_equal(getattr(plain, field), getattr(paired, field))
