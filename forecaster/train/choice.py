"""The baseline a model forecasts over, chosen on the later part of the history (``choose_baseline``).

Candidates are built from the seasons the trainer tries (``forecaster.train.seasons``): seasonal naive
over one to twelve seasons, as it is or moved to the current level; seasonal naive plus the recent mean
seasonal change (a trend); the last value, alone or with a damped local trend. Each may be moved per step
toward the last value (``mix``, fitted by least squares on the earlier part). All are computed by the one
implementation the engine steps (``RecurrentForecaster`` with a zero head).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from forecaster.model import RecurrentForecaster
from forecaster.scaling import Scaling
from forecaster.train.baselines import targets
from forecaster.train.evaluation import model_forecasts
from forecaster.train.fit import split_point

log = logging.getLogger(__name__)

BASE_SEASONS = (
    1,
    2,
    3,
    5,
    8,
    12,
)  # seasons averaged by the seasonal baselines tried (those the window holds)
TREND_SEASONS = (1, 2, 3)  # seasons averaged under a trend (older seasons need a longer extrapolation)
TREND_SPANS = (1, 3)  # seasons between the two whose means give the slope
DAMPING = (0.9, 1.0)  # of the last value's local trend
PLAIN_SE = 2.0  # a baseline replaces the plainer one only if better by this many standard errors


def choose_baseline(
    settings: Any, values: list, scaling: Scaling, season: int, more: Sequence[int] | None = None
) -> tuple[dict[str, Any], np.ndarray]:
    """The build arguments of the baseline the model forecasts over (``season``, ``base_seasons``,
    ``base_level``, and ``trend_span`` and ``damping`` for a trend), and its ``mix`` (horizon,): per step,
    the weight in [0, 1] that moves it toward the last value.

    Candidates (those the retained window holds), for ``season`` and each of ``more`` (None:
    ``settings.train.seasons``): seasonal naive averaged over 1 to 12 seasons, as it is or moved to the
    current level; seasonal naive over 1 to 3 seasons plus the mean change between the newest season and
    the one 1 or 3 seasons before (per step, times how far the target lies past the values read); and the
    last value, alone or with the damped slope of the last ``season`` or three ``season`` values. Each series is cut as training cuts it: each candidate's ``mix`` is fitted by least
    squares on the earlier part (each series in units of its mean absolute change, so that no series weighs
    more for being large), then the candidate, with that mix or without, is scored (MAE over all series, as
    evaluation and replay score) on the forecasts whose targets lie in the later part -- the recent past
    says more about the future than the whole history. The best one wins unless the better of seasonal
    naive and the last value (each with or without its mix) is within ``PLAIN_SE`` standard errors of it
    (paired, per forecast origin): a small holdout does not get to pick an elaborate baseline by chance.

    Each is scored as an untrained model (zero head: its forecast is the baseline, in the serving code's
    units) on every forecast made after ``warmup`` values."""
    horizon, window, train = settings.model.horizon, settings.state.window, settings.train
    plain = [{"season": 1, "base_seasons": 1, "base_level": False}]
    if season > 1:
        plain.append({"season": season, "base_seasons": 1, "base_level": False})
    more = train.seasons if more is None else more
    seasons = [s for s in dict.fromkeys([season, *more]) if s > 1]
    candidates = plain + [
        {"season": s, "base_seasons": m, "base_level": level}
        for s in seasons
        for level in (False, True)
        for m in BASE_SEASONS
        if (s, m, level) != (season, 1, False)
    ]
    candidates += [
        {"season": s, "base_seasons": m, "base_level": False, "trend_span": s * n}
        for s in seasons
        for m in TREND_SEASONS
        for n in TREND_SPANS
    ]
    candidates += [
        {"season": 1, "base_seasons": 1, "base_level": False, "trend_span": span, "damping": phi}
        for span in dict.fromkeys([max(season, 2) * n for n in TREND_SPANS])
        for phi in DAMPING
    ]
    models = [
        RecurrentForecaster("rnn", hidden_size=1, num_layers=1, horizon=horizon, **c) for c in candidates
    ]
    keep = [i for i, model in enumerate(models) if model.context < window]  # the engine retains what it reads
    for s in seasons:
        if not any(candidates[i]["season"] == s for i in keep):
            need = min(m.context for c, m in zip(candidates, models, strict=True) if c["season"] == s) + 1
            log.warning(
                "season %d is not tried: its baseline reads %d values, state.window is %d", s, need, window
            )
    candidates, models = [candidates[i] for i in keep], [models[i] for i in keep]
    # Per series, from its warmup on: the last value, the targets in the earlier and in the later part, its unit.
    parts = []
    for v in values:
        cut, rows = split_point(len(v), train.validation_fraction), slice(min(train.warmup, len(v)), None)
        target = targets(v, horizon)[rows]  # (T', horizon)
        index = (np.arange(len(v))[:, None] + np.arange(1, horizon + 1))[rows]  # (T', horizon) of each target
        change = np.abs(np.diff(v))
        change = change[np.isfinite(change)]  # NaN: a missing period (time grid)
        unit = max(float(change.mean()) if len(change) else 1.0, 1e-12)
        parts.append(
            (
                rows,
                np.asarray(v, np.float64)[rows, None],
                np.where(index < cut, target, np.nan),
                np.where(index >= cut, target, np.nan),
                unit,
            )
        )
    scored = []  # (candidate, mix, per-origin mean absolute error on the later part)
    for candidate, model in zip(candidates, models, strict=True):
        bases = [f[p[0]] for f, p in zip(model_forecasts(model, scaling, values), parts, strict=True)]
        mix = _least_squares_mix(
            [(b, last, early, u) for b, (_, last, early, _, u) in zip(bases, parts, strict=True)], horizon
        )
        later = [(b, last, late) for b, (_, last, _, late, _) in zip(bases, parts, strict=True)]
        for weights in (mix, np.zeros(horizon)) if mix.any() else (mix,):  # a zero mix is the plain one
            scored.append((candidate, weights, _origin_errors(later, weights)))
    if not any(len(e) for _, _, e in scored):
        return candidates[0], np.zeros(horizon)
    best = min(scored, key=lambda c: c[2].mean() if len(c[2]) else math.inf)
    plainest = min((c for c in scored if c[0] in plain), key=lambda c: c[2].mean())
    diff = plainest[2] - best[2]  # (origins,) paired, per origin
    se = diff.std() / math.sqrt(
        max(len(diff) / horizon, 1.0)
    )  # overlapping targets: about len / horizon apart
    chosen = plainest if diff.mean() <= PLAIN_SE * se else best
    for candidate, weights, errors in scored:
        log.info("baseline %s%s: MAE %.6g", candidate, " with mix" if weights.any() else "", errors.mean())
    log.info("baseline chosen: %s, mix %s", chosen[0], np.round(chosen[1], 3).tolist())
    return chosen[0], chosen[1]


def _least_squares_mix(parts: list[tuple], horizon: int) -> np.ndarray:
    """Per step, the weight in [0, 1] of the last value that minimises the squared error of
    ``base + w * (last - base)`` over ``parts`` [(base, last, target, unit)]."""
    num, den, count = np.zeros(horizon), np.zeros(horizon), np.zeros(horizon)
    for base, last, target, u in parts:
        d, r = (last - base) / u, (target - base) / u  # (T, horizon)
        ok = np.isfinite(d) & np.isfinite(r)
        num += np.where(ok, d * r, 0.0).sum(0)
        den += np.where(ok, d * d, 0.0).sum(0)
        count += ok.sum(0)
    # A step whose baseline is the last value already (one season ahead) differs from it by rounding only.
    moves = den > 1e-9 * np.maximum(count, 1.0)
    return np.clip(np.divide(num, den, out=np.zeros(horizon), where=moves), 0.0, 1.0)


def _origin_errors(parts: list[tuple], mix: np.ndarray) -> np.ndarray:
    """Mean absolute error (data units, as evaluation and replay pool them) of every forecast origin with a
    target in ``parts``."""
    out = []
    for base, last, target in parts:
        err = np.abs(base + mix * (last - base) - target)  # (T, horizon), NaN where no target
        has = np.isfinite(err).any(1)
        out.append(np.nanmean(err[has], axis=1) if has.any() else np.zeros(0))
    return np.concatenate(out) if out else np.zeros(0)
