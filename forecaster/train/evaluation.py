"""Forecast quality on the validation part of each series: models against the naive baselines.

``model_forecasts`` is the batched full-sequence path (``Scaling.transform``, one ``model(x)``,
``Scaling.denormalize``): per series it equals ``engine.reference_forecast``, so it is what the service
would have emitted. ``evaluate`` scores every model and both baselines on exactly the same points: the
forecasts made from the last training value on, whose targets lie in the validation part.

>>> from forecaster.model import RecurrentForecaster
>>> from forecaster.scaling import Scaling
>>> model = RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2)
>>> v = [np.arange(40.0) % 5]
>>> result = evaluate({"model": (model, Scaling())}, v, validation_fraction=0.25, season=5)
>>> sorted(result.errors), result.errors["seasonal_naive"].overall_mae()
(['last_value', 'model', 'seasonal_naive'], 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from forecaster.engine.intervals import Intervals, reference_intervals
from forecaster.model import RecurrentForecaster
from forecaster.scaling import Scaling
from forecaster.tools.interval_score import IntervalScores
from forecaster.train.baselines import (
    ForecastErrors,
    error_report,
    relative_mae,
    score_with_baselines,
    targets,
)
from forecaster.train.fit import split_point

BASELINES = ("last_value", "seasonal_naive")


def model_forecasts(
    model: RecurrentForecaster,
    scaling: Scaling,
    values: Sequence[np.ndarray],
    *,
    batch_series: int = 256,
    chunk_length: int = 1024,
) -> list[np.ndarray]:
    """The forecast after each value of each series, in data units: a list of (T_i, horizon) float64."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = [np.zeros((0, model.horizon))] * len(values)
    order = sorted(range(len(values)), key=lambda i: len(values[i]))
    try:
        with torch.inference_mode():
            for lo in range(0, len(order), batch_series):
                rows = [i for i in order[lo : lo + batch_series] if len(values[i])]
                if not rows:
                    continue
                length = max(len(values[i]) for i in rows)
                raw = np.stack(
                    [
                        np.pad(np.asarray(values[i], np.float64), (0, length - len(values[i])), mode="edge")
                        for i in rows
                    ]
                )  # (B, L): right padding never reaches earlier values
                # (B, L) inputs, (B, L, N_STATS) statistics, (B, L) values as stepped: the baseline reads them
                x, stats, raw_t = scaling.transform_values(raw, season=model.season)  # NaN: missing
                h, ys = None, []
                for start in range(0, length, chunk_length):
                    stop = min(start + chunk_length, length)
                    base = model.scaled_baseline(raw_t, stats, scaling, start, stop)  # (B, T, H)
                    y, h = model(
                        x[:, start:stop, None].to(device), h, base=None if base is None else base.to(device)
                    )  # (B, T, H)
                    ys.append(y.cpu())
                y = torch.cat(ys, 1)  # (B, L, H)
                for r, i in enumerate(rows):
                    n = len(values[i])
                    out[i] = scaling.denormalize(stats[r, :n], y[r, :n]).numpy()  # (n, H)
    finally:
        model.train(was_training)
    return out


@dataclass
class Evaluation:
    """Errors per method (each model by name, ``last_value``, ``seasonal_naive``) on common points."""

    errors: dict[str, ForecastErrors]
    season: int
    horizon: int
    intervals: dict[str, IntervalScores] = field(default_factory=dict)  # per model, with intervals on

    def mae(self, name: str) -> float:
        return self.errors[name].overall_mae()

    def mase(self, name: str) -> float:
        """Hyndman & Koehler's MASE (scale: each series' in-sample seasonal-naive MAE on its training part)."""
        return self.errors[name].overall_mase()

    def relative_mae(self, name: str, baseline: str = "seasonal_naive") -> float:
        """MAE of ``name`` over MAE of ``baseline`` on the same points."""
        return relative_mae(self.errors[name], self.errors[baseline])[0]

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures per method (MASE included), plus the relative MAE of each model against both
        baselines (and the coverage and interval score of each model's intervals per level and step)."""
        report = error_report(self.errors, BASELINES, season=self.season, horizon=self.horizon)
        if self.intervals:
            report["intervals"] = {name: scores.report() for name, scores in self.intervals.items()}
        return report


def evaluate(
    models: Mapping[str, tuple[RecurrentForecaster, Scaling]],
    values: Sequence[np.ndarray],
    *,
    validation_fraction: float,
    season: int,
    intervals: Intervals | None = None,
) -> Evaluation:
    """Score ``models`` (name -> (model, scaling)) and the baselines on each series' validation part.

    The horizon scored is the shortest of the models'; a point counts only where every method has a
    forecast (the seasonal-naive one needs a season of history) and the target exists. ``intervals``:
    also score each model's prediction intervals, as the service's calibrator would make them, on the
    validation origins (coverage and Winkler score per level and step).
    """
    horizon = min(model.horizon for model, _ in models.values())
    forecasts = {name: model_forecasts(model, scaling, values) for name, (model, scaling) in models.items()}
    errors = {name: ForecastErrors.empty(horizon) for name in [*models, *BASELINES]}
    for i, v in enumerate(values):
        n = len(v)
        first = split_point(n, validation_fraction) - 1  # the forecast made after the last training value
        if n < 2 or first < 0 or first >= n - 1:
            continue
        rows = slice(first, n - 1)
        scored = score_with_baselines({name: f[i] for name, f in forecasts.items()}, v, rows, horizon, season)
        for name, e in scored.items():
            errors[name] = errors[name] + e
    evaluation = Evaluation(errors=errors, season=season, horizon=horizon)
    if intervals is not None:
        evaluation.intervals = {
            name: validation_intervals(
                forecasts[name], values, scaling, intervals, validation_fraction, model.season
            )
            for name, (model, scaling) in models.items()
        }
    return evaluation


@dataclass(frozen=True)
class Advantage:
    """How a fitted model compares with its untrained baseline on the validation part: both MAEs (data
    units, every point both forecast), and ``z``: the mean per-origin difference of their absolute errors
    (fitted minus baseline, each origin's mean over its steps) in standard errors, negative where the
    fitted model is better. An origin's steps overlap the next origins' (a k-step error shares its target
    with k - 1 others), so the standard error counts the origins as ``1 / horizon`` as many independent
    ones; no variance: -inf or +inf by the sign of the difference (0 for none)."""

    mae: float
    baseline_mae: float
    z: float
    origins: int


def advantage(
    model: RecurrentForecaster,
    baseline: RecurrentForecaster,
    scaling: Scaling,
    values: Sequence[np.ndarray],
    *,
    validation_fraction: float,
) -> Advantage:
    """``model`` against ``baseline`` (the same shape untrained) on each series' validation origins.

    >>> from forecaster.model import RecurrentForecaster
    >>> base = RecurrentForecaster("gru", hidden_size=2, num_layers=1, horizon=2, season=1, base_seasons=1)
    >>> same = advantage(base, base, Scaling(), [np.arange(40.0) % 5], validation_fraction=0.25)
    >>> same.z, same.mae == same.baseline_mae
    (0.0, True)
    """
    horizon = min(model.horizon, baseline.horizon)
    fitted, plain = (model_forecasts(m, scaling, values) for m in (model, baseline))
    sums, counts, differences = np.zeros(2), 0, []
    for i, v in enumerate(values):
        n = len(v)
        first = split_point(n, validation_fraction) - 1
        if n < 2 or first < 0 or first >= n - 1:
            continue
        target = targets(v, horizon)[first : n - 1]  # (T, H) NaN past the end
        errors = [np.abs(f[i][first : n - 1, :horizon] - target) for f in (fitted, plain)]  # (T, H) each
        both = np.isfinite(errors[0]) & np.isfinite(errors[1])
        sums += [float(e[both].sum()) for e in errors]
        counts += int(both.sum())
        steps = both.sum(1)  # (T,)
        gap = np.where(both, errors[0] - errors[1], 0.0).sum(1)[steps > 0] / steps[steps > 0]
        differences.append(gap)
    d = np.concatenate(differences) if differences else np.zeros(0)
    mean = float(d.mean()) if len(d) else 0.0
    spread = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    if spread > 0.0:
        z = mean / (spread * math.sqrt(horizon / len(d)))
    else:
        z = math.copysign(math.inf, mean) if mean != 0.0 else 0.0
    maes = sums / counts if counts else np.full(2, math.nan)
    return Advantage(float(maes[0]), float(maes[1]), z, len(d))


def validation_intervals(
    forecasts: Sequence[np.ndarray],
    values: Sequence[np.ndarray],
    scaling: Scaling,
    intervals: Intervals,
    validation_fraction: float,
    season: int = 1,
) -> IntervalScores:
    """The calibrator over each whole series (``reference_intervals``), scored on its validation origins
    (NaN values: missing periods of a series on its time grid, imputed with ``season``, never scored)."""
    scores = IntervalScores.empty(intervals.labels, forecasts[0].shape[1] if len(forecasts) else 1)
    for f, v in zip(forecasts, values, strict=True):
        first = split_point(len(v), validation_fraction) - 1
        if len(v) < 2 or first < 0 or first >= len(v) - 1:
            continue
        lower, upper = reference_intervals(f.astype(np.float32), v, intervals, scaling, season)
        scores.add(np.asarray(v, np.float64), lower, upper, first)
    return scores
