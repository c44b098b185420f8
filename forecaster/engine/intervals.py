"""Prediction intervals on every forecast, calibrated online per series, per step and per level.

The method: normalised online conformal prediction with adaptive quantile tracking (adaptive conformal
inference, Gibbs & Candès 2021; the quantile tracker of conformal PID control, Angelopoulos, Candès &
Tibshirani 2023), on each series' own k-step errors in the units of its scaling.

* **Score.** When value ``v_t`` arrives, every forecast made ``k = 1..H`` values earlier that targeted it
  is scored: ``s_k = |inner(v_t) - inner(f_{t-k}[k-1])| / scale_{t-k}``, the absolute k-step error in
  the units of the series' scaling at the time the forecast was made (``inner`` is the logarithm under
  ``scaling.kind=log``, so bounds are then multiplicative). Scale-free: one learning rate fits every
  series whatever its units.
* **Spread.** ``m_k``: each series' running mean of ``s_k`` (a cumulative mean for the first
  ``halflife`` errors, then exponentially weighted), so a series whose noise grows or shrinks, or a model
  that gets better or worse, moves its intervals within tens of values.
* **Coverage.** ``c_{k,l}``: a multiplier per step and level, tracked online on the normalised score:
  ``c <- max(0, c + lr * (miss - alpha_l))`` with ``miss = s_k > m_k * c`` and ``alpha_l = 1 - level/100``.
  This is quantile tracking: whatever the errors do (drift, heavy tails, a new model), the fraction of
  misses over any long stretch stays within ``(max c - min c + lr) / (lr * T)`` of ``alpha_l``, with no
  assumption about their distribution. It starts at the Gaussian value ``z_l * sqrt(pi / 2)`` (the
  quantile over the mean absolute error of normal errors), so the tracker only corrects the shape.
* **Young series.** The forecasts a series makes before it has ``WARMUP`` values have no bounds (NaN,
  written as null) and are not scored: their scale is a running deviation of one to three values (the
  first one's is the floor, a thousandth of the level), so bounds would be arbitrarily narrow and their
  normalised errors say nothing. Before its first k-step error a series' ``m_k`` is 1 (one unit of its running scale,
  the spread of the series itself: wide, never absurd); the first error replaces it. A prior pooled across
  series was not taken: it would make a series' intervals depend on the other series and on arrival
  order, and the replay of a file would no longer give the service's intervals.
* **Bounds.** ``inner(f_t[k-1]) -/+ m_k * c_{k,l} * scale_t``, back to data units: symmetric in the units
  of the scaling (in ratios under log scaling).

* **Emitted bounds.** A k-step forecast is scored k values after its bounds were emitted, and ``m_k``
  and ``c`` have moved k - 1 times since. The miss the tracker counts (and the coverage counters) is
  against the half-widths ``m_k * c_{k,l}`` the bounds were emitted with, kept for each of the last H
  forecasts: the tracker then holds the coverage of the intervals users received. Counted against the
  current ones, a series whose errors grow sees fewer misses than its emitted bounds made: on
  elecdemand (half-hourly, horizon 48, an untrained seasonal baseline) the tracker counted 0.800 / 0.950
  at step 48 while the emitted bounds covered 0.718 / 0.872; with the emitted ones both read 0.800 /
  0.949.

Per series the state table keeps, for horizon H and L levels: the centres of the last H forecasts (H x H
float32), their scales (H) and their bounds' normalised half-widths (H x L x H), ``m`` (H), ``c`` (L x H)
and the ordinal of the first forecast to score (int64: past a new series' warm-up; after a re-warm, the
first the new model made, see ``forecaster.engine.recalibrate``):
``4 * (H * H + 2 * H + H * L + H * L * H) + 8`` bytes (1928 for H = 12, two levels).

The arithmetic is written once for numpy arrays (the per-series reference) and torch tensors (a GPU table)
alike; a CPU table runs it as compiled loops (``forecaster.engine.fused``), held equal to both by the tests.

>>> import numpy as np
>>> iv = Intervals(levels=(80.0, 95.0))
>>> [round(float(c), 4) for c in iv.prior]
[1.6062, 2.4565]
>>> mult = iv.prior[None, :, None].astype(np.float32)  # (1 series, 2 levels, 1 step)
>>> lower, upper = iv.bounds(np.array([[10.0]], np.float32), np.array([2.0], np.float32), np.ones((1, 1), np.float32), mult)
>>> lower.astype(float).round(3).tolist(), upper.astype(float).round(3).tolist()
([[[6.788], [5.087]]], [[[13.212], [14.913]]])
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from forecaster.scaling import Scaling, _lib

Array = Any  # np.ndarray or torch.Tensor, same kind throughout one call
WARMUP = 4  # forecasts made after fewer values than this are not scored (score_from of a new series)


@dataclass(frozen=True)
class Intervals:
    """How the bounds are calibrated: nominal ``levels`` (percent), ``learning_rate`` of the coverage
    tracker, ``halflife`` (in errors) of the mean absolute error. Methods take arrays of many series."""

    levels: tuple[float, ...] = (80.0, 95.0)
    learning_rate: float = 0.05
    halflife: float = 16.0

    def __post_init__(self) -> None:
        levels = tuple(float(level) for level in self.levels)
        if not levels or any(not 0.0 < level < 100.0 for level in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"levels must be distinct percentages in (0, 100), got {self.levels}")
        if not 0.0 < self.learning_rate <= 1.0 or not self.halflife > 0.0:
            raise ValueError("learning_rate must be in (0, 1] and halflife > 0")
        object.__setattr__(self, "levels", tuple(sorted(levels)))

    @classmethod
    def from_settings(cls, settings: Any) -> Intervals | None:
        """From an ``IntervalSettings`` section; None when intervals are off."""
        if not settings.enabled:
            return None
        return cls(tuple(settings.levels), settings.learning_rate, settings.halflife)

    @property
    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def labels(self) -> list[str]:
        """Level names as written in forecast records and metric labels: "80", "95", "99.5"."""
        return [f"{level:g}" for level in self.levels]

    @functools.cached_property
    def alpha(self) -> np.ndarray:
        """Miss rate each level aims at: (L,) float64."""
        return 1.0 - np.array(self.levels) / 100.0

    @functools.cached_property
    def floor(self) -> float:
        """Weight of a new error in the mean once a series has ``halflife`` of them."""
        return 1.0 - 0.5 ** (1.0 / self.halflife)

    @functools.cached_property
    def miss_step(self) -> np.ndarray:
        """lr * (1 - alpha) per level, (L, 1) float32: the step of a miss."""
        return (self.learning_rate * (1.0 - self.alpha)).astype(np.float32)[:, None]

    @functools.cached_property
    def prior(self) -> np.ndarray:
        """Starting multiplier per level, the normal quantile over the normal mean absolute error: (L,)."""
        z = [NormalDist().inv_cdf(0.5 + level / 200.0) for level in self.levels]
        return np.array(z) * math.sqrt(math.pi / 2.0)

    def score_steps(self, horizon: int) -> list[int]:
        """The steps (1-based) whose coverage goes to the metrics: h1 and the last one."""
        return sorted({1, horizon})

    def update(
        self,
        score: Array,
        valid: Array,
        n_errors: Array,
        mean_err: Array,
        mult: Array,
        emitted: Array | None = None,
    ) -> tuple[Array, Array, Array]:
        """Fold one value's k-step scores in, for n series (float32 throughout).

        ``score`` (n, H) normalised absolute errors of the forecasts made k = 1..H values ago (0 where
        not ``valid``), ``valid`` (n, H) bool: such a forecast is scored (None: all are), ``n_errors`` (n, H): errors
        scored at step k with this one, ``mean_err`` (n, H), ``mult`` (n, L, H), ``emitted`` (n, L, H): the
        normalised half-widths those forecasts' bounds were emitted with (``mult * mean_err`` when they were
        made; None: the current ones, which is the same at k = 1 only). Returns new ``mean_err``, new
        ``mult``, ``inside`` (n, L, H) bool: the value within the emitted bounds (False where not valid),
        and those bounds' normalised half-widths (n, L, H).
        """
        lib = _lib(score)
        half = mult * mean_err[:, None, :] if emitted is None else emitted  # (n, L, H) normalised half-widths
        inside = score[:, None, :] <= half  # (n, L, H)
        if valid is not None:
            inside &= valid[:, None, :]
        # c + lr * (miss - alpha) where scored: + lr * (1 - alpha), and - lr where inside
        up = self.miss_step if lib is np else torch.as_tensor(self.miss_step, device=mult.device)
        new_mult = mult + (up if valid is None else valid[:, None, :] * up)  # (n, L, H)
        new_mult -= inside * np.float32(self.learning_rate)
        new_mult = new_mult.clamp(min=0.0) if lib is torch else np.maximum(new_mult, 0.0, out=new_mult)
        floor = self.floor
        n = n_errors.float() if lib is torch else n_errors.astype(np.float32)
        weight = 1.0 / (n.clamp(min=1.0) if lib is torch else np.maximum(n, 1.0))  # (n, H)
        weight = weight.clamp(min=floor) if lib is torch else np.maximum(weight, floor)
        if valid is not None:
            weight = weight * valid
        new_mean = mean_err + weight * (score - mean_err)  # (n, H); unchanged where not valid
        return new_mean, new_mult, inside, half

    def bounds(
        self, center: Array, scale: Array, mean_err: Array, mult: Array, scaling: Scaling | None = None
    ) -> tuple[Array, Array]:
        """Bounds around forecast centres ``center`` (n, H) (``inner`` units, float32) with the series'
        scales ``scale`` (n,): lower, upper (n, L, H) float32 in data units."""
        spread = mean_err * scale[:, None]  # (n, H)
        half = mult * spread[:, None, :]  # (n, L, H)
        lower, upper = center[:, None, :] - half, center[:, None, :] + half  # (n, L, H)
        if scaling is not None and scaling.kind == "log":
            lib = _lib(lower)
            lower, upper = (
                lib.exp(b.clamp(max=88.0) if lib is torch else np.minimum(b, 88.0)) for b in (lower, upper)
            )  # capped below float32's largest exp: a wild bound is huge, not inf
        return lower, upper


@functools.cache
def lag_rows(horizon: int) -> np.ndarray:
    """Row j: the rows ((j - k) mod H) of a ring of H forecasts holding those made k = 1..H values before
    ordinal j (H, H)."""
    return (np.arange(horizon)[:, None] - np.arange(1, horizon + 1)) % horizon


@functools.cache
def half_offsets(horizon: int, levels: int) -> np.ndarray:
    """Row j: the offsets, within a slot's (H, L, H) half-widths, of those the forecasts made k = 1..H
    values before ordinal j were emitted with, by level and step k: (H, L, H) int64."""
    k = np.arange(1, horizon + 1)
    return (lag_rows(horizon)[:, None, :] * levels + np.arange(levels)[None, :, None]) * horizon + (k - 1)


def units(scaling: Scaling, stats: Array) -> Array:
    """The scale of each series for its intervals (n,) float32: the scaling's divisor (1 without)."""
    one = _lib(stats).ones_like(stats[:, 0]) if scaling.kind == "none" else scaling.scale(stats)
    return one.float() if isinstance(one, torch.Tensor) else one.astype(np.float32)


def centers(scaling: Scaling, forecasts: Array) -> Array:
    """Forecasts (float32 as emitted) -> the centres the bounds sit around, in ``inner`` units, float32."""
    return scaling.inner(forecasts)


def reference_intervals(
    forecasts: np.ndarray,
    values: Any,
    intervals: Intervals,
    scaling: Scaling | None = Scaling(),  # noqa: B008 - immutable
    season: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The calibrator over one series on its own, value by value: ``forecasts`` (T, H) as emitted after
    each of ``values`` (T,). Returns lower, upper (T, L, H) float32: what the engine emits for that series
    whatever the batching. A NaN value is a missing period of a series on its time grid: stepped with the
    value ``season`` earlier (``forecaster.timegrid``), scored by nothing, as the engine steps it."""
    scaling = scaling if scaling is not None else Scaling(kind="none")
    steps, horizon = forecasts.shape
    # (T, N_STATS) statistics and (T,) values as the engine steps them
    raw = np.array(values, dtype=np.float64)
    _, stats, v = scaling.transform_values(raw, season=season)
    stats, v, gap = stats.numpy(), v.numpy(), np.isnan(raw)
    k = np.arange(1, horizon + 1)
    past = np.zeros((horizon, horizon), np.float32)  # row j: centres of the forecast made at ordinal j % H
    past_scale = np.ones(horizon, np.float32)
    past_half = np.zeros((horizon, len(intervals.levels), horizon), np.float32)  # row j: its half-widths
    mean_err = np.ones((1, horizon), np.float32)
    mult = np.repeat(intervals.prior.astype(np.float32)[None, :, None], horizon, axis=2)  # (1, L, H)
    lower = np.zeros((steps, len(intervals.levels), horizon), np.float32)
    upper = np.zeros_like(lower)
    first = WARMUP - 1  # ordinal of the first forecast scored
    for t in range(steps):
        row = (t - k) % horizon
        valid = (t - k >= first)[None]
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.abs(scaling.inner(v[t]) - past[row, k - 1]) / past_scale[row]  # (H,) float64
        score = np.where(valid, score, 0.0).astype(np.float32)
        n_errors = (t - k - first + 1)[None]
        emitted = past_half[row, :, k - 1].T[None]  # (1, L, H) of the forecast made k values back
        if not gap[t]:
            mean_err, mult, _, _ = intervals.update(score, valid, n_errors, mean_err, mult, emitted)
        center = centers(scaling, forecasts[t : t + 1].astype(np.float32))  # (1, H)
        scale = units(scaling, stats[t : t + 1])  # (1,)
        past[t % horizon], past_scale[t % horizon] = center[0], scale[0]
        past_half[t % horizon] = mult[0] * mean_err[0][None, :]
        lo, hi = intervals.bounds(center, scale, mean_err, mult, scaling)
        lower[t], upper[t] = (lo[0], hi[0]) if t >= first else (np.nan, np.nan)
    return lower, upper
