"""The offline trainer: history in, a validated and (if better) published checkpoint out.

``train_once`` first picks the baseline the model forecasts over (seasonal naive over one to twelve
seasons, as it is or moved to the current level, or the last value, each step possibly moved toward the
last value: the one with the lowest error on the later part of the history, ``choose_baseline``), fits the
serving model on the training part of each series (``forecaster.train.fit``), keeps its untrained baseline
instead if that does better on the validation part (the fitted model is not trusted then), scores it
on the validation part against the last-value and seasonal-naive baselines and against the currently
published checkpoint (``forecaster.train.evaluation``), and publishes a new version only if it is better than the
published one (unless ``settings.train.publish_only_if_better`` is off). The decision and every figure go
to the log and to the manifest.

>>> import tempfile
>>> import numpy as np
>>> from forecaster.config import Settings
>>> from forecaster.train.history import History
>>> settings = Settings(model={"hidden_size": 4, "num_layers": 1, "horizon": 2},
...                     train={"epochs": 1}, checkpoints={"dir": tempfile.mkdtemp()})
>>> values = np.sin(np.arange(80) / 3.0) + 5.0
>>> history = History.from_long(["a"] * 80, np.arange(80), values)
>>> outcome = train_once(settings, history, progress=False)
>>> outcome.published is not None, outcome.reason
(True, 'first model')
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from forecaster.checkpoints.store import (
    LoadedCheckpoint,
    latest_version,
    load_checkpoint,
    save_checkpoint,
)
from forecaster.engine.intervals import Intervals
from forecaster.errors import CheckpointError, DataError
from forecaster.model import RecurrentForecaster, build_model
from forecaster.scaling import Scaling
from forecaster.train.baselines import detect_season, targets
from forecaster.train.evaluation import BASELINES, Evaluation, evaluate, model_forecasts
from forecaster.train.fit import FitResult, fit, split_point
from forecaster.train.history import History

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    """What one training run did: the version published (None if nothing), why, and the figures."""

    published: str | None
    reason: str
    fit: FitResult
    evaluation: Evaluation
    parent: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


BASE_SEASONS = (
    1,
    2,
    3,
    5,
    8,
    12,
)  # seasons averaged by the seasonal baselines tried (those the window holds)
PLAIN_SE = 2.0  # a baseline replaces the plainer one only if better by this many standard errors


def choose_baseline(
    settings: Any, values: list, scaling: Scaling, season: int
) -> tuple[dict[str, Any], np.ndarray]:
    """``season``, ``base_seasons`` and ``base_level`` of the baseline the model forecasts over, and its
    ``mix`` (horizon,): per step, the weight in [0, 1] that moves it toward the last value.

    Candidates: seasonal naive averaged over 1 to 12 seasons, as it is or moved to the current level
    (those the retained window holds), for ``season`` and each of ``settings.train.seasons``, and the
    last value. Each series is cut as training cuts it: each candidate's ``mix`` is fitted by least
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
    seasons = [s for s in dict.fromkeys([season, *train.seasons]) if s > 1]
    candidates = plain + [
        {"season": s, "base_seasons": m, "base_level": level}
        for s in seasons
        for level in (False, True)
        for m in BASE_SEASONS
        if (s, m, level) != (season, 1, False)
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
        unit = max(float(np.mean(np.abs(np.diff(v)))) if len(v) > 1 else 1.0, 1e-12)
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
        for weights in (mix, np.zeros(horizon)):
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


def baseline_model(settings: Any, baseline: dict[str, Any], mix: np.ndarray) -> RecurrentForecaster:
    """A fresh model over ``baseline`` with its per-step ``mix`` set (untrained: it forecasts the baseline)."""
    config = settings.model.config.model_copy(update=baseline)
    model = build_model(config, seed=settings.model.seed)
    with torch.no_grad():
        model.mix.copy_(torch.as_tensor(mix, dtype=model.mix.dtype))
    return model


def resolve_season(settings: Any, history: History) -> int:
    """``settings.train.season``, or the period detected on the training parts of the series."""
    if settings.train.season is not None:
        return int(settings.train.season)
    fraction = settings.train.validation_fraction
    season = detect_season([v[: split_point(len(v), fraction)] for v in history.values])
    log.info("season detected by autocorrelation: %d", season)
    return season


def published_checkpoint(root: Any, device: str = "cpu") -> LoadedCheckpoint | None:
    """The checkpoint LATEST names, or None if nothing (valid) is published."""
    try:
        version = latest_version(root)
        return load_checkpoint(root / version, device=device) if version else None
    except CheckpointError as exc:
        log.error("the published checkpoint cannot be compared against: %s", exc)
        return None


def train_once(settings: Any, history: History, *, progress: bool | None = None) -> TrainOutcome:
    """Fit, evaluate, decide, publish. Raises ``DataError`` when the history cannot train a model."""
    train = settings.train
    values = [v for v in history.values if len(v) > 0]
    if not values:
        raise DataError("no history to train on")
    scaling = Scaling.from_settings(settings.scaling)
    if scaling.positive and any((v <= 0).any() for v in values):
        bad = sum(int((v <= 0).sum()) for v in values)
        raise DataError(f"{bad} values are <= 0: scaling.kind={scaling.kind} needs positive values (use ewm)")
    season = resolve_season(settings, history)
    # Step 1. The baseline the model forecasts over, then fit the model on the training part of every series.
    baseline, mix = choose_baseline(settings, values, scaling, season)
    model = baseline_model(settings, baseline, mix)
    fitted = fit(
        model,
        values,
        scaling,
        epochs=train.epochs,
        chunk_length=train.chunk_length,
        batch_series=train.batch_series,
        learning_rate=train.learning_rate,
        validation_fraction=train.validation_fraction,
        patience=train.patience,
        warmup=train.warmup,
        seed=settings.model.seed,
        progress=progress,
    )
    if not fitted.train_losses or not math.isfinite(fitted.train_losses[0]):
        raise DataError(
            f"history too short to train: {len(values)} series, longest {max(len(v) for v in values)} values "
            f"(need more than warmup={train.warmup} + validation)"
        )
    # Step 2. An untrained model forecasts its baseline: keep that where the fitted model does worse.
    untrained = baseline_model(settings, baseline, mix)
    trust = evaluate(
        {"model": (model, scaling), "untrained": (untrained, scaling)},
        values,
        validation_fraction=train.validation_fraction,
        season=season,
    )
    if trust.mae("untrained") < trust.mae("model"):
        log.warning(
            "the fitted model does worse than its baseline on the validation data (MAE %.6g vs %.6g): "
            "keeping the baseline",
            trust.mae("model"),
            trust.mae("untrained"),
        )
        model, fell_back = untrained.eval(), True
    else:
        fell_back = False
    # Step 3. Score it, the naive baselines and the published model on the same validation points.
    published = published_checkpoint(settings.checkpoints.dir)
    models = {"model": (model, scaling)}
    if published is not None:
        models["published"] = (published.model, published.scaling)
    evaluation = evaluate(
        models,
        values,
        validation_fraction=train.validation_fraction,
        season=season,
        intervals=Intervals.from_settings(settings.intervals),
    )
    # Step 4. Decide.
    publish, reason = _decide(evaluation, published, train)
    summary = evaluation.summary()
    metrics = {
        "validation": summary,
        "baseline": {**baseline, "mix": [round(float(w), 4) for w in mix], "kept_untrained": fell_back},
        "fit": {
            "epochs": fitted.epochs,
            "train_loss": fitted.train_losses[-1],
            "best_validation_loss": fitted.best_validation_loss,
            "stopped_early": fitted.stopped_early,
        },
        "decision": {
            "published": publish,
            "reason": reason,
            "compared_with": published.version if published else None,
        },
    }
    _log_figures(evaluation, published, publish, reason)
    if not publish:
        return TrainOutcome(
            None, reason, fitted, evaluation, published.version if published else None, metrics
        )
    # Step 5. Write the checkpoint and publish it in one step (validated by the one loader on the way; the
    # folder appears only together with LATEST).
    version = save_checkpoint(
        settings.checkpoints.dir,
        model,
        scaling,
        data=history.describe(),
        metrics=metrics,
        parent=published.version if published else None,
        extra={
            "training": {**train.model_dump(mode="json"), "season_used": season, "seed": settings.model.seed}
        },
        publish=True,
    )
    log.info("published checkpoint %s in %s", version, settings.checkpoints.dir)
    return TrainOutcome(
        version, reason, fitted, evaluation, published.version if published else None, metrics
    )


def _decide(evaluation: Evaluation, published: LoadedCheckpoint | None, train: Any) -> tuple[bool, str]:
    new = evaluation.mae("model")
    if published is None:
        return True, "first model"
    old = evaluation.mae("published")
    if not train.publish_only_if_better:
        return True, "publish_only_if_better is off"
    if not math.isfinite(new):
        return False, "no validation points to compare on"
    if not math.isfinite(old) or new < old * (1.0 - train.min_improvement):
        return True, f"validation MAE {new:.6g} < {old:.6g} of {published.version}"
    return False, f"validation MAE {new:.6g} is not better than {old:.6g} of {published.version}"


def _log_figures(
    evaluation: Evaluation, published: LoadedCheckpoint | None, publish: bool, reason: str
) -> None:
    figures = ", ".join(f"{name} {evaluation.mae(name):.6g}" for name in evaluation.errors)
    log.info(
        "validation MAE (season %d, %d points): %s",
        evaluation.season,
        int(evaluation.errors["model"].count.sum()),
        figures,
    )
    scores = evaluation.intervals.get("model")
    if scores is not None:  # coverage of the intervals the service would emit, h1 and the last step
        cov, last = scores.coverage(), scores.count.shape[0] - 1
        shown = ", ".join(
            f"{label}%: h1 {cov[i, 0]:.3f}, h{last + 1} {cov[i, last]:.3f}"
            for i, label in enumerate(scores.labels)
        )
        log.info("validation interval coverage: %s", shown)
    best_baseline = min(evaluation.mae(name) for name in BASELINES)
    if not evaluation.mae("model") < best_baseline:
        log.warning(
            "the model does not beat the best naive baseline on the validation data (%.6g vs %.6g)",
            evaluation.mae("model"),
            best_baseline,
        )
    log.info(
        "decision: %s (%s)",
        "publish" if publish else "keep %s" % (published.version if published else "-"),
        reason,
    )
