"""Naive baselines and the error measures every quality figure uses (trainer validation, replay, benches).

All forecasts are arrays ``(T, horizon)``: row ``t`` is the forecast made after value ``t`` (knowing values
``0..t``), column ``k`` the value expected ``k + 1`` steps later; NaN where a method has no forecast.
``targets(values, horizon)`` is the matching array of what happened (NaN past the end).

Two scores compare methods. MASE is Hyndman & Koehler's mean absolute scaled error: each absolute error is
divided by its series' in-sample seasonal-naive MAE (``insample_scale``, over the values known before the
first scored forecast: a series' training part), and the scaled errors are averaged over every point of every
series (statsforecast, darts and the M-competitions compute the same; series of equal test length weigh
equally). A series whose history has no such scale (flat, or a single value) is left out of MASE and
counted (``unscaled_series``); its errors still count in MAE and RMSE. Relative MAE is the MAE of a forecast
over that of a baseline on the same points (out-of-sample scaling): below 1 the forecast beats the baseline.

>>> v = np.array([1.0, 2.0, 3.0, 4.0])
>>> last_value(v, 2)[1].tolist(), seasonal_naive(v, 2, season=2)[1].tolist(), targets(v, 2)[1].tolist()
([2.0, 2.0], [1.0, 2.0], [3.0, 4.0])
>>> e = ForecastErrors.of(last_value(v, 1), targets(v, 1))
>>> e.mae().tolist(), e.count.tolist()
([1.0], [3])
>>> insample_scale(np.array([1.0, 5.0, 2.0, 6.0]), season=2)  # |2 - 1|, |6 - 5|
1.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def targets(values: np.ndarray, horizon: int) -> np.ndarray:
    """What happened: ``out[t, k] = values[t + k + 1]`` (NaN past the end). (T, horizon) float64."""
    v = np.asarray(values, dtype=np.float64)
    padded = np.concatenate([v, np.full(horizon, np.nan)])  # (T + horizon,)
    idx = np.arange(len(v))[:, None] + np.arange(1, horizon + 1)[None, :]  # (T, horizon)
    return padded[idx]


def last_value(values: np.ndarray, horizon: int) -> np.ndarray:
    """The last value repeated: ``out[t, k] = values[t]``. (T, horizon) float64."""
    v = np.asarray(values, dtype=np.float64)
    return np.repeat(v[:, None], horizon, axis=1)


def seasonal_naive(values: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """The value one season before the target: ``out[t, k] = values[t + k + 1 - season * ceil((k+1)/season)]``.

    NaN where that is before the first value; ``season=1`` is ``last_value``.
    """
    if season < 1:
        raise ValueError("season must be >= 1")
    v = np.asarray(values, dtype=np.float64)
    step = np.arange(1, horizon + 1)  # (horizon,)
    back = step - season * np.ceil(step / season).astype(np.int64)  # (horizon,) in (-season, 0]
    idx = np.arange(len(v))[:, None] + back[None, :]  # (T, horizon)
    out = v[np.clip(idx, 0, None)] if len(v) else np.zeros((0, horizon))
    return np.where(idx >= 0, out, np.nan)


def insample_scale(values: np.ndarray, season: int) -> float:
    """MASE's scale: the in-sample MAE of seasonal naive, mean ``|y[t] - y[t - season]|`` over ``values``
    (the last value's MAE where the values do not hold a season and one more); NaN when it is 0 or undefined."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    lag = season if len(v) > season else 1
    if len(v) <= lag:
        return float("nan")
    scale = float(np.mean(np.abs(v[lag:] - v[:-lag])))
    return scale if scale > 0.0 else float("nan")


def detect_season(
    series: Sequence[np.ndarray], *, max_season: int = 400, min_acf: float = 0.3, sample: int = 200
) -> int:
    """The dominant period of the series by autocorrelation of their first differences; 1 if none.

    The mean autocorrelation (over up to ``sample`` longest series) is searched for local peaks at lags
    >= 2 that reach ``min_acf``; the smallest lag within 90 % of the highest peak wins (so a daily period
    is preferred over its multiples).
    """
    chosen = sorted((np.asarray(s, dtype=np.float64) for s in series), key=len, reverse=True)[:sample]
    chosen = [s[np.isfinite(s)] for s in chosen]
    chosen = [s for s in chosen if len(s) >= 8]
    if not chosen:
        return 1
    max_lag = min(max_season, max(len(s) for s in chosen) // 2)
    if max_lag < 3:
        return 1
    total = np.zeros(max_lag + 1)
    weight = np.zeros(max_lag + 1)
    for s in chosen:
        d = np.diff(s)
        d = d - d.mean()
        denom = float(d @ d)
        if denom <= 0.0:
            continue
        n = len(d)
        size = 1 << int(np.ceil(np.log2(2 * n)))
        spectrum = np.fft.rfft(d, size)
        acf = np.fft.irfft(spectrum * np.conj(spectrum), size)[: max_lag + 1] / denom  # (max_lag + 1,)
        usable = min(max_lag, n // 2)
        total[: usable + 1] += acf[: usable + 1] * n
        weight[: usable + 1] += n
    acf = np.divide(total, weight, out=np.zeros_like(total), where=weight > 0)
    peaks = [
        lag
        for lag in range(2, max_lag)
        if acf[lag] >= min_acf and acf[lag] >= acf[lag - 1] and acf[lag] >= acf[lag + 1]
    ]
    if not peaks:
        return 1
    best = max(acf[lag] for lag in peaks)
    return next(lag for lag in peaks if acf[lag] >= 0.9 * best)


@dataclass
class ForecastErrors:
    """Accumulated errors per horizon step: ``count``, ``sum_abs``, ``sum_sq``, and ``sum_scaled`` (absolute
    errors over their series' ``insample_scale``) over the ``count_scaled`` points of series that have one,
    each (horizon,); ``unscaled_series``: series with points scored but no scale (left out of MASE)."""

    count: np.ndarray
    sum_abs: np.ndarray
    sum_sq: np.ndarray
    sum_scaled: np.ndarray
    count_scaled: np.ndarray
    unscaled_series: int = 0

    @classmethod
    def empty(cls, horizon: int) -> ForecastErrors:
        zero = np.zeros(horizon, np.int64)
        return cls(zero, np.zeros(horizon), np.zeros(horizon), np.zeros(horizon), zero.copy())

    @classmethod
    def of(
        cls,
        forecast: np.ndarray,
        target: np.ndarray,
        mask: np.ndarray | None = None,
        scale: float = float("nan"),
    ) -> ForecastErrors:
        """Errors of ``forecast`` against ``target`` (both (T, horizon)) where both are finite (and ``mask``);
        ``scale``: the series' ``insample_scale`` (MASE)."""
        keep = np.isfinite(forecast) & np.isfinite(target)  # (T, horizon)
        if mask is not None:
            keep &= mask
        err = np.where(keep, forecast - target, 0.0)  # (T, horizon)
        count = keep.sum(0).astype(np.int64)
        sum_abs, sum_sq = np.abs(err).sum(0), (err * err).sum(0)
        if math.isfinite(scale):
            return cls(count, sum_abs, sum_sq, sum_abs / scale, count.copy())
        unscaled = int(count.sum() > 0)
        return cls(count, sum_abs, sum_sq, np.zeros_like(sum_abs), np.zeros_like(count), unscaled)

    def __add__(self, other: ForecastErrors) -> ForecastErrors:
        return ForecastErrors(
            self.count + other.count,
            self.sum_abs + other.sum_abs,
            self.sum_sq + other.sum_sq,
            self.sum_scaled + other.sum_scaled,
            self.count_scaled + other.count_scaled,
            self.unscaled_series + other.unscaled_series,
        )

    def mae(self) -> np.ndarray:
        """Mean absolute error per horizon step (NaN where nothing was counted)."""
        return np.divide(self.sum_abs, self.count, out=np.full(len(self.count), np.nan), where=self.count > 0)

    def rmse(self) -> np.ndarray:
        """Root mean squared error per horizon step."""
        mse = np.divide(self.sum_sq, self.count, out=np.full(len(self.count), np.nan), where=self.count > 0)
        return np.sqrt(mse)

    def mase(self) -> np.ndarray:
        """MASE per horizon step: the mean scaled absolute error (NaN where no series with a scale counted)."""
        n = self.count_scaled
        return np.divide(self.sum_scaled, n, out=np.full(len(n), np.nan), where=n > 0)

    def overall_mase(self) -> float:
        n = int(self.count_scaled.sum())
        return float(self.sum_scaled.sum() / n) if n else float("nan")

    def overall_mae(self) -> float:
        n = int(self.count.sum())
        return float(self.sum_abs.sum() / n) if n else float("nan")

    def overall_rmse(self) -> float:
        n = int(self.count.sum())
        return float(np.sqrt(self.sum_sq.sum() / n)) if n else float("nan")

    def summary(self) -> dict[str, object]:
        """JSON-ready figures: overall and per-horizon MAE, RMSE and MASE, the count, and how many series
        MASE left out (no in-sample scale)."""
        return {
            "count": int(self.count.sum()),
            "mae": self.overall_mae(),
            "rmse": self.overall_rmse(),
            "mase": self.overall_mase(),
            "mase_series_left_out": self.unscaled_series,
            "mae_by_horizon": [float(x) for x in self.mae()],
            "rmse_by_horizon": [float(x) for x in self.rmse()],
            "mase_by_horizon": [float(x) for x in self.mase()],
        }


def relative_mae(model: ForecastErrors, baseline: ForecastErrors) -> tuple[float, list[float]]:
    """MAE of ``model`` over MAE of ``baseline`` (same points): overall and per horizon step."""
    overall = model.overall_mae() / baseline.overall_mae() if baseline.overall_mae() > 0 else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        per = model.mae() / baseline.mae()
    return float(overall), [float(x) for x in per]


def error_report(
    errors: Mapping[str, ForecastErrors], baselines: Sequence[str], **header: Any
) -> dict[str, Any]:
    """JSON-ready figures per method (MAE, RMSE and MASE overall and by horizon), with the relative MAE of
    every method that is not a baseline against each of ``baselines``; ``header`` fields come first."""
    report: dict[str, Any] = dict(header)
    for name, method in errors.items():
        entry = method.summary()
        if name not in baselines:
            for baseline in baselines:
                overall, per = relative_mae(method, errors[baseline])
                entry[f"relative_mae_vs_{baseline}"] = overall
                entry[f"relative_mae_vs_{baseline}_by_horizon"] = per
        report[name] = entry
    return report


def score_with_baselines(
    forecasts: Mapping[str, np.ndarray],
    values: np.ndarray,
    rows: slice,
    horizon: int,
    season: int,
    insample: int | None = None,
) -> dict[str, ForecastErrors]:
    """Errors of each forecast (T, >= horizon) of one series at ``rows``, next to last-value and
    seasonal-naive forecasts, all on the points where every method and the target are finite. MASE is
    scaled by the seasonal-naive MAE over the first ``insample`` values (None: those up to the first
    origin scored, ``rows.start + 1``)."""
    known = rows.start + 1 if insample is None else insample
    scale = insample_scale(np.asarray(values)[:known], season)
    made = {name: np.asarray(f, dtype=np.float64)[rows, :horizon] for name, f in forecasts.items()}
    made["last_value"] = last_value(values, horizon)[rows]
    made["seasonal_naive"] = seasonal_naive(values, horizon, season)[rows]
    target = targets(values, horizon)[rows]  # (T, H)
    common = np.isfinite(target)
    for f in made.values():
        common &= np.isfinite(f)
    return {name: ForecastErrors.of(f, target, common, scale) for name, f in made.items()}
