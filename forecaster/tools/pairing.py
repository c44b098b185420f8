"""Which value each forecast is scored against: a step is a period.

A series the engine stepped on its time grid (``EngineOutput.step_ms`` > 0) made ``forecast[k]`` for the
value ``k + 1`` periods after its origin, not for its ``k + 1``-th next value: after a gap the two differ.
``SeriesGrid`` puts one series' stepped values back on the grid the engine stepped them on
(``forecaster.timegrid.to_grid``: the same spacings, snapping and long-gap restarts) and gives, per origin
(a stepped row), the target of each step (none where that period is missing: never scored), the
seasonal-naive forecast read on the grid (a missing period read as the engine imputed it) and MASE's
in-sample scale over pairs of real values one season apart. A series without a period is its own grid,
one position per value, where all of this is what ``forecaster.train.baselines`` computes.

Forecasts a series made under another period than the one it ended with (its first values, before it
settled its own) are not scored: their steps meant something else.

>>> ts = np.array([0, 10, 20, 50, 60])  # the periods at 30 and 40 are missing
>>> grid = SeriesGrid.of(ts, np.array([1.0, 2.0, 3.0, 6.0, 7.0]), np.full(5, 10))
>>> grid.position.tolist()
[0, 1, 2, 5, 6]
>>> grid.targets(2).tolist()  # row 2 (ts 20) forecast 30 and 40: nothing to score
[[2.0, 3.0], [3.0, nan], [nan, nan], [7.0, nan], [nan, nan]]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from forecaster.timegrid import DEFAULT_MAX_GAP, grid_steps, to_grid
from forecaster.train.baselines import ForecastErrors, last_value, seasonal_naive


@dataclass(frozen=True)
class SeriesGrid:
    """One series' stepped values (rows) on its time grid (positions)."""

    values: np.ndarray  # (T,) float64: the stepped values, in stepped order
    position: np.ndarray  # (T,) int64: each row's grid position (-1: not on the grid)
    filled: np.ndarray  # (G,) float64: the grid's values, missing periods as the engine imputed them
    row_at: np.ndarray  # (G,) int64: the row at each position (-1: a missing period)
    segment: np.ndarray  # (T,) int64: a restart (a gap longer than max_gap) begins a new segment
    scored: np.ndarray  # (T,) bool: origins made with the grid's period

    @classmethod
    def by_value(cls, values: np.ndarray) -> SeriesGrid:
        """A series without a period: each value one step."""
        v = np.asarray(values, dtype=np.float64)
        rows = np.arange(len(v), dtype=np.int64)
        zero = np.zeros(len(v), dtype=np.int64)
        return cls(v, rows, v, rows, zero, np.ones(len(v), dtype=bool))

    @classmethod
    def of(
        cls,
        ts: np.ndarray,
        values: np.ndarray,
        step_ms: np.ndarray,
        *,
        season: int = 1,
        max_gap: int = DEFAULT_MAX_GAP,
    ) -> SeriesGrid:
        """The grid of one series from its stepped rows: ``ts`` (increasing), ``values`` and each row's
        ``step_ms``; the period is the one the series ended with (0: by value). ``season`` and ``max_gap``:
        the engine's (its model's season imputes, and keeps the phase over a restart)."""
        step_ms = np.asarray(step_ms, dtype=np.int64)
        period = int(step_ms[-1]) if len(step_ms) else 0
        if period <= 0:
            grid = cls.by_value(values)
            return cls(grid.values, grid.position, grid.filled, grid.row_at, grid.segment, step_ms <= 0)
        ts = np.asarray(ts, dtype=np.int64)
        on = to_grid(ts, values, period, season=season, max_gap=max_gap)
        row_at = np.full(len(on.values), -1, dtype=np.int64)
        kept = on.position >= 0
        row_at[on.position[kept]] = np.flatnonzero(kept)
        steps, _, restart = grid_steps(np.diff(ts), np.full(len(ts) - 1, period), max_gap, season)
        segment = np.concatenate(([0], np.cumsum(steps & restart))).astype(np.int64)
        return cls(np.asarray(values, np.float64), on.position, on.values, row_at, segment, step_ms == period)

    def target_rows(self, horizon: int) -> np.ndarray:
        """(T, horizon) int64: the row of the value forecast ``k + 1`` steps after each row; -1 where that
        period is missing, past the end, beyond a restart, or the origin is not scored."""
        at = self.position[:, None] + np.arange(1, horizon + 1)[None, :]  # (T, H) grid positions
        inside = (self.position[:, None] >= 0) & (at < len(self.row_at))
        rows = np.where(inside, self.row_at[np.where(inside, at, 0)], -1)
        same = self.segment[np.maximum(rows, 0)] == self.segment[:, None]
        return np.where((rows >= 0) & same & self.scored[:, None], rows, -1)

    def targets(self, horizon: int) -> np.ndarray:
        """(T, horizon) float64: what happened at each forecast's target (NaN: nothing to score)."""
        rows = self.target_rows(horizon)
        return np.where(rows >= 0, self.values[np.maximum(rows, 0)], np.nan)

    def seasonal_naive(self, horizon: int, season: int) -> np.ndarray:
        """(T, horizon): the value one season before each target on the grid (a missing period as imputed)."""
        on_grid = seasonal_naive(self.filled, horizon, season)  # (G, H)
        return np.where(self.position[:, None] >= 0, on_grid[np.maximum(self.position, 0)], np.nan)

    def scale(self, season: int, known: int) -> float:
        """MASE's scale: the mean ``|y[p] - y[p - season]|`` over the pairs of real values within the grid up
        to row ``known - 1`` (lag 1 where that does not hold a season and one more); NaN when 0 or undefined.
        Without missing periods, ``forecaster.train.baselines.insample_scale``."""
        end = int(self.position[:known].max(initial=-1)) + 1
        real = np.where(self.row_at[:end] >= 0, self.filled[:end], np.nan)
        lag = season if end > season else 1
        if end <= lag:
            return float("nan")
        diffs = np.abs(real[lag:] - real[:-lag])
        diffs = diffs[np.isfinite(diffs)]
        scale = float(diffs.mean()) if len(diffs) else 0.0
        return scale if scale > 0.0 else float("nan")

    def errors(
        self, forecasts: Mapping[str, np.ndarray], rows: slice, horizon: int, season: int, known: int
    ) -> dict[str, ForecastErrors]:
        """Errors of each forecast (T, >= horizon) at origins ``rows``, next to last-value and seasonal-naive
        forecasts, on the points where every method and the target exist (``score_with_baselines`` on the
        grid); MASE scaled over the first ``known`` rows."""
        scale = self.scale(season, known)
        made = {name: np.asarray(f, dtype=np.float64)[rows, :horizon] for name, f in forecasts.items()}
        made["last_value"] = last_value(self.values, horizon)[rows]
        made["seasonal_naive"] = self.seasonal_naive(horizon, season)[rows]
        target = self.targets(horizon)[rows]  # (T, H)
        common = np.isfinite(target)
        for f in made.values():
            common &= np.isfinite(f)
        return {name: ForecastErrors.of(f, target, common, scale) for name, f in made.items()}
