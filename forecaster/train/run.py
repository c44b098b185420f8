"""The offline trainer: history in, a validated and (if better) published checkpoint out.

``train_once`` first finds the seasons to try (the calendar of the timestamps, autocorrelation, or
``train.season``: ``forecaster.train.seasons``), picks the baseline the model forecasts over (seasonal
naive, level-moved, with a trend, or the last value, each step possibly moved toward the last value: the
one with the lowest error on the later part of the history, ``forecaster.train.choice``), fits the
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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forecaster.checkpoints.promotion import propose
from forecaster.checkpoints.store import (
    LoadedCheckpoint,
    latest_version,
    load_checkpoint,
    save_checkpoint,
)
from forecaster.engine.intervals import Intervals
from forecaster.errors import CheckpointError, DataError, NotEnoughHistory
from forecaster.model import RecurrentForecaster, build_model
from forecaster.scaling import Scaling
from forecaster.timegrid import estimate_period, history_period, to_grid
from forecaster.train.choice import choose_baseline
from forecaster.train.evaluation import BASELINES, Evaluation, advantage, evaluate
from forecaster.train.fit import FitResult, fit, split_point
from forecaster.train.history import History
from forecaster.train.seasons import SeasonPlan, plan_seasons

log = logging.getLogger(__name__)
# With log scaling, values <= 0 are left out when they are at most this share of the history (the service
# dead-letters them); more, and the data is not positive: the run is refused.
MAX_SKIPPED_SHARE = 0.01


@dataclass
class TrainOutcome:
    """What one training run did: the version published (None if nothing), why, and the figures."""

    published: str | None
    reason: str
    fit: FitResult
    evaluation: Evaluation
    parent: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    proposed: bool = False  # shadow promotion: ``published`` is on trial (CANDIDATE), not in LATEST


def baseline_model(settings: Any, baseline: dict[str, Any], mix: np.ndarray) -> RecurrentForecaster:
    """A fresh model over ``baseline`` with its per-step ``mix`` set (untrained: it forecasts the baseline)."""
    config = settings.model.config.model_copy(update=baseline)
    model = build_model(config, seed=settings.model.seed)
    with torch.no_grad():
        model.mix.copy_(torch.as_tensor(mix, dtype=model.mix.dtype))
    return model


def resolve_seasons(settings: Any, history: History) -> SeasonPlan:
    """The seasons to try (``forecaster.train.seasons.plan_seasons``): ``settings.train.season``, or those
    of the calendar plus the one autocorrelation finds on the training parts; and ``train.seasons``."""
    fraction, horizon = settings.train.validation_fraction, settings.model.horizon
    return plan_seasons(
        history.ts,
        [v[: split_point(len(v), fraction)] for v in history.values],
        declared=settings.train.season,
        longer=settings.train.seasons,
        reach=lambda s: RecurrentForecaster(hidden_size=1, horizon=horizon, season=s, base_seasons=1).context,
        window=settings.state.window,
    )


def on_grid(series: list[tuple[np.ndarray, np.ndarray]], max_gap: int) -> tuple[list[np.ndarray], dict]:
    """Each series' values on its own time grid (``forecaster.timegrid.to_grid`` with the period its
    spacing shows, NaN where a period is missing; a series without a stable period as it is), and what the
    manifest says of it: the period most series have (``period_ms``, what the service starts series with)."""
    values, missing, without = [], 0, 0
    for ts, v in series:
        period = estimate_period(ts)
        if period == 0:
            values.append(np.asarray(v, np.float64))
            without += len(ts) > 2
            continue
        grid = to_grid(ts, v, period, max_gap=max_gap)
        out = grid.values.copy()
        out[grid.missing] = np.nan
        values.append(out)
        missing += int(grid.missing.sum())
    period = history_period([ts for ts, _ in series])
    if missing:
        log.info(
            "history on its time grid (period %d ms): %d missing periods stepped through", period, missing
        )
    return values, {"period_ms": period, "missing_periods": missing, "series_without_period": without}


def _too_short(values: list[np.ndarray], train: Any) -> NotEnoughHistory:
    return NotEnoughHistory(
        f"history too short to train: {len(values)} series, longest {max(len(v) for v in values)} values "
        f"(need more than warmup={train.warmup} + validation)"
    )


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
    series = [(t, v) for t, v in zip(history.ts, history.values, strict=True) if len(v) > 0]
    if not series:
        raise NotEnoughHistory("no history to train on")
    scaling = Scaling.from_settings(settings.scaling)
    if scaling.positive and any((v <= 0).any() for _, v in series):
        bad, total = sum(int((v <= 0).sum()) for _, v in series), sum(len(v) for _, v in series)
        if bad > MAX_SKIPPED_SHARE * total:
            raise DataError(
                f"{bad} of {total} values are <= 0: scaling.kind={scaling.kind} needs positive values (use ewm)"
            )
        # A few, as the service dead-letters them (and replay skips them): left out, as the service would.
        log.warning("%d of %d values are <= 0: left out (scaling.kind=%s)", bad, total, scaling.kind)
        series = [(t[v > 0], v[v > 0]) for t, v in series if (v > 0).any()]
    # Each series on its time grid, as the service steps it: a missing period is NaN (stepped, never scored).
    values, grid = on_grid(series, settings.state.max_gap_periods)
    # A forecast made after value t >= warmup with its next value in the training part: none, nothing to fit.
    if not any(split_point(len(v), train.validation_fraction) >= train.warmup + 2 for v in values):
        raise _too_short(values, train)
    # Step 1. The seasons to try, the baseline the model forecasts over, then fit the model on the training
    # part of every series.
    seasons = resolve_seasons(settings, history)
    season = seasons.season
    baseline, mix = choose_baseline(settings, values, scaling, season, seasons.more)
    baseline = {**baseline, "period_ms": grid["period_ms"]}  # a step of the model is this period
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
        loss=train.loss,
    )
    if fitted.train_losses and math.isinf(fitted.train_losses[0]):
        raise DataError(
            "training diverged: the loss overflowed (values far larger than their series' usual ones?);"
            " nothing was published"
        )
    if not fitted.train_losses or not math.isfinite(fitted.train_losses[0]):
        raise _too_short(values, train)
    # Step 2. An untrained model forecasts its baseline: keep that unless the fitted model beats it on the
    # validation part by more than noise (``train.trust_z`` standard errors of the difference).
    untrained = baseline_model(settings, baseline, mix)
    trust = advantage(model, untrained, scaling, values, validation_fraction=train.validation_fraction)
    fell_back = not trust.z <= -train.trust_z
    if fell_back:
        log.warning(
            "the fitted model does not beat its baseline on the validation data by more than noise (MAE %.6g "
            "vs %.6g, %.2f standard errors, %s needed): keeping the baseline",
            trust.mae,
            trust.baseline_mae,
            -trust.z,
            train.trust_z,
        )
        model = untrained.eval()
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
    if not evaluation.errors["model"].count.sum():
        raise NotEnoughHistory(
            f"no validation point to score: the last {train.validation_fraction:g} of the series holds no "
            f"forecast whose target and seasonal-naive forecast (season {season}) both exist; nothing was "
            "published (longer history, or a shorter season)"
        )
    # Step 4. Decide.
    publish, reason = _decide(evaluation, published, train)
    summary = evaluation.summary()
    metrics = {
        "validation": summary,
        "baseline": {
            **baseline,
            "mix": [round(float(w), 4) for w in mix],
            "kept_untrained": fell_back,
            "fitted_vs_baseline": {
                "mae": trust.mae,
                "baseline_mae": trust.baseline_mae,
                "z": trust.z,
                "origins": trust.origins,
            },
        },
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
    # folder appears only together with LATEST). In shadow promotion a model that has a champion to beat
    # is proposed instead (CANDIDATE): the services score it on live values before it serves.
    on_trial = settings.checkpoints.promotion == "shadow" and published is not None
    version = save_checkpoint(
        settings.checkpoints.dir,
        model,
        scaling,
        data=history.describe(),
        metrics=metrics,
        parent=published.version if published else None,
        extra={
            "training": {
                **train.model_dump(mode="json"),
                "season_used": season,
                "time_grid": grid,
                "seasons": seasons.describe(),
                "seed": settings.model.seed,
            }
        },
        publish=not on_trial,
    )
    if on_trial:
        load_checkpoint(Path(settings.checkpoints.dir) / version)  # the one loader, before it is proposed
        propose(settings.checkpoints.dir, version)
        log.info(
            "proposed checkpoint %s in %s (CANDIDATE): the services compare it with %s on live values",
            version,
            settings.checkpoints.dir,
            published.version,
        )
        return TrainOutcome(version, reason, fitted, evaluation, published.version, metrics, proposed=True)
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
