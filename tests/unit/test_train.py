"""The trainer: baselines and errors, history, truncated BPTT, evaluation, publish decisions, periodic runs."""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from prometheus_client import CollectorRegistry

from forecaster.checkpoints.store import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    latest_version,
    list_checkpoints,
    load_checkpoint,
)
from forecaster.cli import main
from forecaster.cli.train import apply_overrides
from forecaster.config import Settings, TrainSettings
from forecaster.engine.engine import reference_forecast
from forecaster.errors import ConfigError, DataError, NotEnoughHistory
from forecaster.metrics import TrainerMetrics
from forecaster.model import RecurrentForecaster
from forecaster.scaling import Scaling
from forecaster.tools.synthetic import SeriesShape, generate
from forecaster.train import choice as choice_module
from forecaster.train import run as train_module
from forecaster.train.baselines import (
    ForecastErrors,
    detect_season,
    insample_scale,
    last_value,
    relative_mae,
    score_with_baselines,
    seasonal_naive,
    targets,
)
from forecaster.train.evaluation import advantage, evaluate, model_forecasts
from forecaster.train.fit import chunk_targets, fit, make_batches, split_point
from forecaster.train.history import History, read_history_file
from forecaster.train.periodic import parse_duration, run_periodically
from forecaster.train.run import choose_baseline, train_once

# ---- baselines and errors ------------------------------------------------------------------------------


def test_baselines_by_hand() -> None:
    v = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    nan = np.nan
    np.testing.assert_array_equal(targets(v, 2), [[2, 3], [3, 4], [4, 5], [5, nan], [nan, nan]])
    np.testing.assert_array_equal(last_value(v, 2), [[1, 1], [2, 2], [3, 3], [4, 4], [5, 5]])
    # season 2, horizon 3: steps 1 and 2 look back one season, step 3 (same phase as step 1) too
    np.testing.assert_array_equal(
        seasonal_naive(v, 3, season=2), [[nan, 1, nan], [1, 2, 1], [2, 3, 2], [3, 4, 3], [4, 5, 4]]
    )
    np.testing.assert_array_equal(seasonal_naive(v, 2, season=1), last_value(v, 2))


def test_errors_and_mase_by_hand() -> None:
    forecast = np.array([[1.0, 2.0], [3.0, np.nan]])
    target = np.array([[2.0, 2.0], [1.0, 4.0]])
    errors = ForecastErrors.of(forecast, target)
    assert errors.count.tolist() == [2, 1]
    np.testing.assert_allclose(errors.mae(), [1.5, 0.0])
    np.testing.assert_allclose(errors.rmse(), [np.sqrt(2.5), 0.0])
    assert errors.overall_mae() == pytest.approx(1.0)
    baseline = ForecastErrors.of(np.array([[0.0, 0.0], [0.0, 0.0]]), target, np.isfinite(forecast))
    overall, per = relative_mae(errors, baseline)
    assert overall == pytest.approx(3.0 / 5.0)
    assert per == pytest.approx([1.5 / 1.5, 0.0 / 2.0])
    scaled = ForecastErrors.of(forecast, target, scale=0.5)  # MASE: each absolute error over the scale
    np.testing.assert_allclose(scaled.mase(), [3.0, 0.0])
    assert scaled.overall_mase() == pytest.approx(2.0)
    assert np.isnan(errors.overall_mase())  # no scale: no MASE


def test_mase_by_hand_uses_each_series_training_part() -> None:
    """Hyndman & Koehler: scale = in-sample seasonal-naive MAE of the training part of each series."""
    assert insample_scale(np.array([1.0, 2.0, 4.0, 3.0, 7.0]), season=2) == pytest.approx((3 + 1 + 3) / 3)
    assert insample_scale(np.array([1.0, 3.0]), season=4) == pytest.approx(2.0)  # shorter: last value
    assert np.isnan(insample_scale(np.ones(6), season=2))  # a flat history has no scale
    # Series 1, 2, 4, 3, 7, 5, 9 with season 2, one-step forecasts 8 after value 5 (index 4) and 6 after
    # value 7 (index 5): origins 4 and 5 are scored, the training part is the 5 values before index 5.
    v = np.array([1.0, 2.0, 4.0, 3.0, 7.0, 5.0, 9.0])
    forecast = np.full((7, 1), np.nan)
    forecast[4, 0], forecast[5, 0] = 8.0, 6.0
    errors = score_with_baselines({"model": forecast}, v, slice(4, 6), 1, 2)
    scale = 7.0 / 3.0  # |4-1|, |3-2|, |7-4| over the first five values
    assert errors["model"].overall_mae() == pytest.approx((3 + 3) / 2)
    assert errors["model"].overall_mase() == pytest.approx((3 + 3) / 2 / scale)
    # seasonal naive forecasts 3 (for 5) and 7 (for 9): errors 2 and 2
    assert errors["seasonal_naive"].overall_mase() == pytest.approx(2.0 / scale)
    # Two series pool their scaled errors point by point (equal test lengths: the mean of their MASEs).
    both = errors["model"] + score_with_baselines({"model": 2 * forecast}, 2 * v, slice(4, 6), 1, 2)["model"]
    assert both.overall_mase() == pytest.approx((3 + 3) / 2 / scale)
    assert both.unscaled_series == 0


def test_a_series_without_a_scale_is_left_out_of_mase_not_of_mae() -> None:
    """One flat series among others must not turn the pooled MASE into NaN: it is left out and counted."""
    v = np.array([1.0, 2.0, 4.0, 3.0, 7.0, 5.0, 9.0])
    forecast = np.full((7, 1), np.nan)
    forecast[4, 0], forecast[5, 0] = 8.0, 6.0
    scored = score_with_baselines({"model": forecast}, v, slice(4, 6), 1, 2)["model"]
    flat = score_with_baselines({"model": forecast}, np.full(7, 5.0), slice(4, 6), 1, 2)["model"]
    assert flat.unscaled_series == 1 and np.isnan(flat.overall_mase())
    both = scored + flat
    assert both.overall_mase() == pytest.approx(scored.overall_mase())  # the flat series' points left out
    np.testing.assert_allclose(both.mase(), scored.mase())
    assert both.overall_mae() == pytest.approx((3 + 3 + 3 + 1) / 4)  # ... but not out of MAE
    assert both.unscaled_series == 1 and both.summary()["mase_series_left_out"] == 1
    assert (both + ForecastErrors.empty(1)).unscaled_series == 1  # a series with no point scored adds none
    assert ForecastErrors.of(np.full((2, 1), np.nan), np.ones((2, 1))).unscaled_series == 0


@pytest.mark.parametrize("period", [7, 24])
def test_detect_season_finds_the_period(period: int) -> None:
    rng = np.random.default_rng(period)
    t = np.arange(40 * period)
    series = [
        10 + np.sin(2 * np.pi * t / period + p) + 0.2 * rng.normal(size=len(t)) + 0.01 * t for p in (0, 1, 2)
    ]
    assert detect_season(series) == period


def test_detect_season_without_a_period_is_one() -> None:
    rng = np.random.default_rng(1)
    assert detect_season([rng.normal(size=500) for _ in range(3)]) == 1
    assert detect_season([np.ones(3)]) == 1


# ---- history ----------------------------------------------------------------------------------------------


def test_history_orders_by_time_and_keeps_the_first_duplicate() -> None:
    h = History.from_long(
        ["b", "a", "a", "a", "b"], np.array([5, 3, 1, 3, 4]), np.array([5.0, 3.0, 1.0, 9.0, 4.0])
    )
    assert h.series == ["a", "b"]
    assert [t.tolist() for t in h.ts] == [[1, 3], [4, 5]]
    assert [v.tolist() for v in h.values] == [[1.0, 3.0], [4.0, 5.0]]
    assert h.dropped == {"duplicates": 1}
    assert h.time_range() == {"first_ts": 1, "last_ts": 5}


def test_long_and_wide_files_give_the_same_history() -> None:
    frame = generate(3, 20, seed=4)
    long_csv = frame.to_csv(index=False)
    wide_csv = frame.pivot(index="ts", columns="series", values="value").reset_index().to_csv(index=False)
    a, b = read_history_file(io.StringIO(long_csv)), read_history_file(io.StringIO(wide_csv))
    assert a.series == b.series == ["series-0", "series-1", "series-2"]
    for x, y in zip(a.values, b.values, strict=True):
        np.testing.assert_allclose(x, y)
    for x, y in zip(a.ts, b.ts, strict=True):
        np.testing.assert_array_equal(x, y)


def test_bad_rows_are_counted_not_trained_on() -> None:
    h = read_history_file(io.StringIO("series,ts,value\na,1,1.0\na,2,oops\na,3,3.0\n"))
    assert h.values[0].tolist() == [1.0, 3.0]
    assert h.dropped["bad_row_value_not_number"] == 1


def test_tail_keeps_the_most_recent_values() -> None:
    h = History.from_long(["a"] * 10 + ["b"] * 4, np.r_[np.arange(10), np.arange(4)], np.arange(14.0))
    t = h.tail(6)
    assert [v.tolist() for v in t.values] == [[7.0, 8.0, 9.0], [11.0, 12.0, 13.0]]


# ---- fitting ----------------------------------------------------------------------------------------------


def tiny(cell: str = "gru", seed: int = 0, **kwargs) -> RecurrentForecaster:
    torch.manual_seed(seed)
    options = dict(hidden_size=8, num_layers=1, horizon=3)
    options.update(kwargs)
    return RecurrentForecaster(cell, **options)


def test_targets_are_the_inverse_of_the_served_forecast() -> None:
    scaling = Scaling(halflife=5.0)
    values = [np.array([3.0, 5.0, 4.0, 8.0, 7.0, 9.0, 6.0, 10.0, 12.0, 11.0])]
    (batch,) = make_batches(values, scaling, 3, 4, validation_fraction=0.3)  # n_train = 7
    target, mask = chunk_targets(batch, 0, 9, 3, warmup=2, part="train")
    # A model output equal to the target is the forecast of exactly the next values, in data units.
    forecast = scaling.denormalize(batch.stats[0, :9], target[0].double()).numpy()  # (9, 3)
    expected = targets(values[0], 3)[:9]
    np.testing.assert_allclose(
        np.where(mask[0].numpy(), forecast, np.nan), np.where(mask[0].numpy(), expected, np.nan), rtol=1e-5
    )
    index = np.arange(9)[:, None] + np.arange(1, 4)[None, :]
    assert (mask[0].numpy() == ((index < 7) & (np.arange(9)[:, None] >= 2))).all()
    _, val_mask = chunk_targets(batch, 0, 9, 3, warmup=2, part="validation")
    assert (val_mask[0].numpy() == ((index >= 7) & (index < 10) & (np.arange(9)[:, None] >= 2))).all()


def test_batches_hold_the_values_as_the_engine_steps_them() -> None:
    """A glitch in the history is fitted as the service steps it: moved to ``clip`` scales (inputs,
    baselines and targets alike)."""
    rng = np.random.default_rng(0)
    values = [np.concatenate([10.0 + rng.normal(size=30), [1e29], 10.0 + rng.normal(size=10)])]
    scaling = Scaling(halflife=8.0)
    (batch,) = make_batches(values, scaling, 2, 4, validation_fraction=0.3)
    x, _, folded = scaling.transform_values(values[0])
    assert float(folded[30]) < 1e3  # moved
    np.testing.assert_array_equal(batch.values[0].numpy(), folded.numpy())
    np.testing.assert_array_equal(batch.v[0, :41].numpy(), folded.numpy())  # the targets read them too
    np.testing.assert_array_equal(batch.x[0, :, 0].numpy(), x.numpy())


def test_state_is_carried_across_chunks_and_detached(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny()
    seen = []
    forward = model.forward

    def recording(x, h=None, past=None, base=None):
        if model.training:
            seen.append((x.shape[1], None if h is None else h.requires_grad))
        return forward(x, h, past, base)

    monkeypatch.setattr(model, "forward", recording)
    fit(
        model,
        [np.sin(np.arange(50) / 2.0) + 3.0],
        Scaling(),
        epochs=1,
        chunk_length=10,
        validation_fraction=0.2,
        progress=False,
    )
    # 40 training values: origins 0..38 in chunks of 10; the first starts from zero, the rest carry it
    assert [length for length, _ in seen] == [10, 10, 10, 9]
    assert [grad for _, grad in seen] == [None, False, False, False]


def test_loss_decreases() -> None:
    values = [10 + np.sin(np.arange(120) * 2 * np.pi / 12 + p) for p in (0.0, 1.0, 2.0)]
    result = fit(
        tiny(), values, Scaling(), epochs=6, chunk_length=24, learning_rate=0.02, patience=6, progress=False
    )
    assert result.epochs == 6
    assert result.train_losses[-1] < 0.5 * result.train_losses[0]
    assert result.validation_losses[-1] < result.validation_losses[0]


@pytest.mark.parametrize("loss, low, high", [("mae", -0.5, 1.0), ("mse", 2.0, 4.0)])
def test_the_loss_fits_the_median_or_the_mean(loss: str, low: float, high: float) -> None:
    # Independent values, 0 seven times in ten and 10 otherwise: the median is 0, the mean 3.
    rng = np.random.default_rng(1)
    values = [np.where(rng.random(400) < 0.7, 0.0, 10.0) for _ in range(4)]
    torch.manual_seed(0)
    model = RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=1)
    fit(
        model,
        values,
        Scaling(kind="none"),
        epochs=15,
        chunk_length=50,
        learning_rate=0.05,
        patience=15,
        progress=False,
        loss=loss,
    )
    forecasts = model_forecasts(model, Scaling(kind="none"), values, batch_series=4, chunk_length=50)
    assert low < float(np.mean([f[20:, 0].mean() for f in forecasts])) < high


def test_an_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="loss must be one of"):
        fit(tiny(), [np.arange(30.0)], Scaling(), epochs=1, progress=False, loss="huber")
    with pytest.raises(ValueError):
        TrainSettings(loss="huber")


def test_batched_forecasts_equal_the_reference_path() -> None:
    model = tiny("lstm").eval()
    scaling = Scaling(halflife=6.0)
    rng = np.random.default_rng(0)
    values = [rng.normal(5.0, 2.0, n) for n in (1, 7, 30, 13)]
    got = model_forecasts(model, scaling, values, batch_series=3, chunk_length=8)
    for v, f in zip(values, got, strict=True):
        np.testing.assert_allclose(f, reference_forecast(model, v, scaling), rtol=1e-5, atol=1e-5)


def test_evaluation_scores_only_the_validation_part() -> None:
    v = np.arange(40.0) % 5
    result = evaluate({"model": (tiny(horizon=2), Scaling())}, [v], validation_fraction=0.25, season=5)
    # n_train = 30: forecasts made after values 29..38; the one made after 38 has no second target
    assert result.errors["model"].count.tolist() == [10, 9]
    assert result.mae("seasonal_naive") == 0.0
    assert result.mae("last_value") > 0.0
    assert split_point(40, 0.25) == 30


# ---- train, evaluate, publish ---------------------------------------------------------------------------


def synthetic_csv(path: Path, n_series: int = 16, n_values: int = 400) -> Path:
    frame = generate(n_series, n_values, seed=1, shape=SeriesShape(noise=2.0, shift_probability=0.0))
    frame.to_csv(path, index=False)
    return path


def trainer_settings(root: Path, **train) -> Settings:
    options = {
        "epochs": 15,
        "learning_rate": 0.01,
        "chunk_length": 32,
        "batch_series": 16,
        "season": 24,
        **train,
    }
    return Settings(
        model={"hidden_size": 32, "num_layers": 1, "horizon": 6}, train=options, checkpoints={"dir": root}
    )


# One pytest-xdist worker runs this file: its module fixture is set up once.
pytestmark = pytest.mark.xdist_group("train")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One training run on a small synthetic set, shared by the tests that read its results."""
    folder = tmp_path_factory.mktemp("train")
    history = read_history_file(synthetic_csv(folder / "data.csv"))
    settings = trainer_settings(folder / "checkpoints")
    return settings, history, train_once(settings, history, progress=False)


def test_training_learns_and_beats_seasonal_naive(trained) -> None:
    _, _, outcome = trained
    assert outcome.fit.train_losses[-1] < outcome.fit.train_losses[0]  # it starts at its baseline already
    assert outcome.evaluation.relative_mae("model", "seasonal_naive") < 1.0
    assert outcome.evaluation.relative_mae("model", "last_value") < 1.0
    assert outcome.evaluation.mase("model") < outcome.evaluation.mase("seasonal_naive")


def test_the_published_checkpoint_is_complete(trained) -> None:
    settings, history, outcome = trained
    root = settings.checkpoints.dir
    assert outcome.published and latest_version(root) == outcome.published
    assert sorted(p.name for p in (root / outcome.published).iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE]
    manifest = json.loads((root / outcome.published / MANIFEST_FILE).read_text())
    assert manifest["data"]["kind"] == "file" and manifest["data"]["series"] == 16
    assert manifest["data"]["values"] == 16 * 400
    assert manifest["data"]["first_ts"] == int(history.ts[0][0]) and manifest["data"]["last_ts"] == int(
        history.ts[0][-1]
    )
    validation = manifest["metrics"]["validation"]
    assert validation["model"]["mae"] == pytest.approx(outcome.evaluation.mae("model"))
    assert {"last_value", "seasonal_naive", "season"} <= set(validation)
    assert validation["model"]["relative_mae_vs_seasonal_naive"] < 1.0
    assert validation["model"]["mase"] == pytest.approx(outcome.evaluation.mase("model"))
    assert manifest["metrics"]["decision"] == {
        "published": True,
        "reason": "first model",
        "compared_with": None,
    }
    assert manifest["parent"] is None
    assert manifest["training"]["epochs"] == 15
    loaded = load_checkpoint(root)
    np.testing.assert_allclose(  # what is served is what was evaluated
        model_forecasts(loaded.model, loaded.scaling, history.values[:2])[1],
        reference_forecast(loaded.model, history.values[1], Scaling.from_settings(settings.scaling)),
        rtol=1e-5,
        atol=1e-4,
    )


def test_a_run_that_does_not_improve_publishes_nothing(trained) -> None:
    settings, history, first = trained
    again = train_once(settings, history, progress=False)  # same data, same seed: the same model
    assert again.published is None
    assert "not better" in again.reason
    assert latest_version(settings.checkpoints.dir) == first.published
    assert [c.version for c in list_checkpoints(settings.checkpoints.dir)] == [first.published]


def test_publishing_regardless_records_the_parent(tmp_path: Path) -> None:
    values = 10 + np.sin(np.arange(150) * 2 * np.pi / 12)
    history = History.from_long(["a"] * 150, np.arange(150), values)
    settings = trainer_settings(tmp_path, epochs=1, publish_only_if_better=False)
    first = train_once(settings, history, progress=False).published
    second = train_once(settings, history, progress=False)
    assert second.published and second.published != first and second.parent == first
    assert load_checkpoint(tmp_path / second.published).manifest["parent"] == first


def test_too_little_history_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="too short"):
        train_once(
            trainer_settings(tmp_path), History.from_long(["a"] * 4, np.arange(4), np.ones(4)), progress=False
        )
    with pytest.raises(DataError, match="no history"):
        train_once(
            trainer_settings(tmp_path), History.from_long([], np.zeros(0), np.zeros(0)), progress=False
        )


# ---- periodic runs and the command line -----------------------------------------------------------------


def test_parse_duration() -> None:
    assert parse_duration("15m") == 900 and parse_duration("2h") == 7200 and parse_duration("1d") == 86400
    assert parse_duration("1h30m") == 5400 and parse_duration(" 45s ") == 45
    for bad in ("", "15x", "m15", "1h-3m"):
        with pytest.raises(ConfigError):
            parse_duration(bad)


def test_periodic_runs_count_results_and_survive_failures() -> None:
    registry = CollectorRegistry()
    metrics = TrainerMetrics(registry)

    class Outcome:
        published = "v2"

        class fit:  # noqa: N801 - stands in for a FitResult
            train_losses = [0.5, 0.25]
            best_validation_loss = 0.3

    results = iter([DataError("broker empty"), Outcome(), None])
    stop = threading.Event()

    def once():
        result = next(results)
        if isinstance(result, Exception):
            raise result
        if result is None:
            stop.set()
        return result

    ticks = itertools.count(0.0, 2.5)  # each look at the clock is 2.5 s after the one before
    runs = run_periodically(once, 0.0, metrics, stop=stop, clock=lambda: next(ticks), wall=lambda: 1234.0)
    assert runs == 3
    sample = registry.get_sample_value
    assert sample("forecaster_trainer_runs_total", {"result": "failed"}) == 1
    assert sample("forecaster_trainer_runs_total", {"result": "published"}) == 1
    assert sample("forecaster_trainer_runs_total", {"result": "not_published"}) == 1
    assert sample("forecaster_trainer_loss", {"split": "train"}) == 0.25
    assert sample("forecaster_trainer_loss", {"split": "validation"}) == 0.3
    assert sample("forecaster_trainer_last_success_timestamp_seconds") == 1234.0
    assert sample("forecaster_trainer_published_version_info", {"version": "v2"}) == 1
    assert sample("forecaster_trainer_duration_seconds") == 2.5  # the last run: started, then one tick


def test_cli_train_list_and_promote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    data = synthetic_csv(tmp_path / "data.csv", n_series=2, n_values=120)
    for name, value in {
        "CHECKPOINTS__DIR": tmp_path / "ck",
        "MODEL__HIDDEN_SIZE": 4,
        "MODEL__NUM_LAYERS": 1,
        "MODEL__HORIZON": 2,
    }.items():
        monkeypatch.setenv(f"FORECASTER_{name}", str(value))
    assert main(["train", "--input", str(data), "--epochs", "1", "--no-progress"]) == 0
    first = json.loads(capsys.readouterr().out)["published"]
    assert (
        main(
            [
                "train",
                "--input",
                str(data),
                "--epochs",
                "1",
                "--no-progress",
                "--always-publish",
                "--learning-rate",
                "0.05",
            ]
        )
        == 0
    )
    second = json.loads(capsys.readouterr().out)["published"]
    assert latest_version(tmp_path / "ck") == second != first
    assert main(["checkpoints", "promote", first]) == 0
    assert latest_version(tmp_path / "ck") == first
    capsys.readouterr()
    assert main(["checkpoints", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("* " + first) for line in lines)
    assert any(line.startswith("  " + second) for line in lines)
    assert main(["checkpoints", "promote", "20990101T000000000Z-000000"]) == 1
    assert main(["train", "--input", str(tmp_path / "missing.csv"), "--no-progress"]) == 1


def test_log_scaling_trains_on_positive_history_and_refuses_the_rest(tmp_path: Path) -> None:
    t = np.arange(150)
    values = 100 * np.exp(0.01 * t + 0.3 * np.sin(2 * np.pi * t / 12))
    settings = Settings(
        **{**trainer_settings(tmp_path, season=12, epochs=2).model_dump(), "scaling": {"kind": "log"}}
    )
    outcome = train_once(settings, History.from_long(["a"] * 150, t, values), progress=False)
    assert outcome.published is not None
    assert load_checkpoint(tmp_path / outcome.published).scaling == Scaling("log")
    with pytest.raises(DataError, match="<= 0"):
        train_once(settings, History.from_long(["a"] * 150, t, values - 150), progress=False)
    glitch = values.copy()
    glitch[70] = 0.0  # one zero among 150: left out, as the service dead-letters it
    outcome = train_once(settings, History.from_long(["a"] * 150, t, glitch), progress=False)
    assert outcome.fit.epochs >= 1 and np.isfinite(outcome.evaluation.mae("model"))


def test_cli_train_seasons_option(tmp_path: Path) -> None:
    args = argparse.Namespace(
        seasons="168, 8766", epochs=None, learning_rate=None, season=24, metrics_port=None
    )
    settings = apply_overrides(args, Settings())
    assert (settings.train.season, settings.train.seasons) == (24, [168, 8766])
    with pytest.raises(ConfigError, match="seasons"):
        apply_overrides(argparse.Namespace(seasons="weekly"), Settings())


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [("season", 0, "--season"), ("epochs", 0, "--epochs"), ("learning_rate", -1.0, "--learning-rate")],
)
def test_cli_bad_options_are_one_line_naming_the_option(option: str, value: float, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        apply_overrides(argparse.Namespace(**{option: value}), Settings())
    message = str(caught.value)
    assert message.startswith(f"invalid option: {named}: ") and f"(got {value!r})" in message
    assert "\n" not in message and "pydantic" not in message


@pytest.mark.slow
def test_cli_every_serves_metrics_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = synthetic_csv(tmp_path / "data.csv", n_series=2, n_values=100)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "FORECASTER_CHECKPOINTS__DIR": str(tmp_path / "ck"),
        "FORECASTER_MODEL__HIDDEN_SIZE": "4",
        "FORECASTER_MODEL__NUM_LAYERS": "1",
        "FORECASTER_METRICS__HOST": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forecaster",
            "train",
            "--input",
            str(data),
            "--every",
            "1h",
            "--epochs",
            "1",
            "--metrics-port",
            str(port),
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        text, deadline = "", time.monotonic() + 60
        while 'forecaster_trainer_runs_total{result="published"} 1.0' not in text:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.3)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
                    text = answer.read().decode()
            except OSError:
                continue
        version = latest_version(tmp_path / "ck")
        assert f'forecaster_trainer_published_version_info{{version="{version}"}} 1.0' in text
        assert "forecaster_trainer_last_success_timestamp_seconds" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()


# ---- the baseline the model forecasts over ------------------------------------------------------------------


def test_model_forecasts_in_chunks_equal_the_reference_for_a_residual_model() -> None:
    torch.manual_seed(3)
    model = RecurrentForecaster("gru", hidden_size=5, num_layers=1, horizon=4, season=3, base_seasons=2)
    with torch.no_grad():
        model.head.bias.normal_()
    values = [np.random.default_rng(i).normal(5, 1, n) for i, n in enumerate((30, 17, 4))]
    chunked = model_forecasts(model, Scaling(), values, chunk_length=7)
    for v, f in zip(values, chunked, strict=True):
        np.testing.assert_allclose(f, reference_forecast(model, v, Scaling()), atol=1e-5, rtol=0)


def test_the_baseline_is_chosen_by_its_error_on_the_history(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(240)
    settings = trainer_settings(tmp_path, season=12)
    periodic = [
        50 + 10 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 3, 240) for _ in range(3)
    ]  # noisy season
    walks = [100 + np.cumsum(rng.normal(0, 1, 240)) for _ in range(3)]  # no season: the last value is best
    # averaging seasons cancels noise on a stable pattern; nothing beats the last value on a random walk
    assert choose_baseline(settings, periodic, Scaling(), 12)[0]["base_seasons"] > 1
    chosen, mix = choose_baseline(settings, walks, Scaling(), 12)
    assert chosen["season"] == 1 or mix.min() > 0.9  # the last value, or a baseline moved all the way to it
    # a trend under the season: seasonal naive plus the mean seasonal change (the change of two seasons'
    # means is less noisy than the level-moved pattern's change of two values)
    trending = [20 + 0.5 * t + 10 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 0.2, 240) for _ in range(3)]
    chosen = choose_baseline(settings, trending, Scaling(), 12)[0]
    assert chosen["season"] == 12 and chosen["base_level"] is False and chosen["trend_span"] in (12, 36)
    # a trend without a season: the last value with its local trend
    lines = [5 + (0.5 + 0.1 * i) * t + rng.normal(0, 0.5, 240) for i in range(3)]
    chosen = choose_baseline(settings, lines, Scaling(), 1)[0]
    assert (chosen["season"], chosen["base_seasons"]) == (1, 1) and chosen["trend_span"] > 0
    # a window too short for a season is never chosen
    short = Settings(model={"horizon": 6}, state={"window": 20})
    assert choose_baseline(short, periodic, Scaling(), 12)[0]["base_seasons"] == 1


def test_the_baseline_is_chosen_on_the_later_part_of_the_history(tmp_path: Path) -> None:
    """A series that wandered for years and then settled into a season: what happened lately decides."""
    rng = np.random.default_rng(5)
    settings = trainer_settings(tmp_path, season=12)
    series = []
    for _ in range(3):
        walk = 100 + np.cumsum(rng.normal(0, 5, 400))  # no season: the last value is best here
        t = np.arange(120)
        settled = walk[-1] + 20 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 0.5, 120)  # then a clean season
        series.append(np.concatenate([walk, settled]))  # the later 20% (104 values) is all season
    chosen, mix = choose_baseline(settings, series, Scaling(), 12)
    assert chosen["season"] == 12 and mix.max() < 0.5
    # over the whole history the last value would have won: check that it really is better there
    untrained = [
        RecurrentForecaster("rnn", hidden_size=1, num_layers=1, horizon=settings.model.horizon, **c)
        for c in ({"season": 1, "base_seasons": 1}, {**chosen})
    ]
    whole = [
        np.nanmean(
            np.abs(
                np.concatenate(
                    [
                        f - targets(v, settings.model.horizon)
                        for v, f in zip(series, model_forecasts(m, Scaling(), series), strict=True)
                    ]
                )
            )
        )
        for m in untrained
    ]
    assert whole[0] < whole[1]


def test_a_longer_season_is_tried_when_the_window_holds_it(tmp_path: Path, caplog) -> None:
    """Four values a "day", a pattern that repeats weekly (28 values) and not daily: the weekly season wins."""
    rng = np.random.default_rng(7)
    week = rng.normal(0, 10, 28)
    series = [100 + np.tile(week, 20) + rng.normal(0, 1, 560) for _ in range(2)]
    settings = trainer_settings(tmp_path, season=4)
    assert choose_baseline(settings, series, Scaling(), 4)[0]["season"] != 28  # not offered: daily or last
    weekly = Settings(**{**settings.model_dump(), "train": {**settings.train.model_dump(), "seasons": [28]}})
    assert choose_baseline(weekly, series, Scaling(), 4)[0]["season"] == 28
    short = Settings(**{**weekly.model_dump(), "state": {**weekly.state.model_dump(), "window": 20}})
    with caplog.at_level(logging.WARNING, logger="forecaster.train.run"):
        assert (
            choose_baseline(short, series, Scaling(), 4)[0]["season"] != 28
        )  # the window cannot hold a week
    assert "season 28 is not tried: its baseline reads 28 values, state.window is 20" in caplog.text


def test_an_elaborate_baseline_must_beat_the_plain_ones_by_more_than_chance(
    tmp_path: Path, monkeypatch
) -> None:
    rng = np.random.default_rng(6)
    t = np.arange(96)
    periodic = [50 + 10 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 3, 96) for _ in range(2)]
    settings = trainer_settings(tmp_path, season=12)
    monkeypatch.setattr(
        choice_module, "PLAIN_SE", 0.0
    )  # the lowest error wins: averaging seasons cancels noise
    assert choose_baseline(settings, periodic, Scaling(), 12)[0]["base_seasons"] > 1
    monkeypatch.setattr(choice_module, "PLAIN_SE", 1e9)  # nothing is ever sure enough: seasonal naive stays
    assert choose_baseline(settings, periodic, Scaling(), 12)[0] == {
        "season": 12,
        "base_seasons": 1,
        "base_level": False,
    }


def test_each_step_moves_toward_the_last_value_as_far_as_it_helps(tmp_path: Path) -> None:
    """A season under a slowly wandering disturbance: the next value is closest to the last one, values a
    season ahead to the same phase a season ago."""
    rng = np.random.default_rng(4)
    t = np.arange(480)
    values = []
    for _ in range(4):
        wander = np.zeros(480)
        for i in range(1, 480):
            wander[i] = 0.8 * wander[i - 1] + rng.normal(0, 1.0)
        values.append(50 + 10 * np.sin(2 * np.pi * t / 12) + wander)
    # a window of 12 leaves two candidates: the last value and one season back (no level, no average)
    settings = Settings(model={"horizon": 6}, state={"window": 12})
    chosen, mix = choose_baseline(settings, values, Scaling(), 12)
    assert chosen == {"season": 12, "base_seasons": 1, "base_level": False} and len(mix) == 6
    assert mix[0] > 0.15 and mix[0] > 3 * mix[-1] and ((mix >= 0) & (mix <= 1)).all()


def test_a_fitted_model_worse_than_its_baseline_is_not_published(tmp_path: Path, monkeypatch) -> None:
    values = 10 + np.sin(np.arange(200) * 2 * np.pi / 12) + np.random.default_rng(1).normal(0, 0.1, 200)
    history = History.from_long(["a"] * 200, np.arange(200), values)
    settings = trainer_settings(tmp_path, epochs=1, season=12)
    real_fit = train_module.fit

    def spoiled_fit(model, *args, **kwargs):
        result = real_fit(model, *args, **kwargs)
        with torch.no_grad():
            model.head.bias.fill_(3.0)  # every forecast three scale units off
        return result

    monkeypatch.setattr(train_module, "fit", spoiled_fit)
    outcome = train_once(settings, history, progress=False)
    chosen = outcome.metrics["baseline"]
    assert chosen["season"] == 12 and chosen["kept_untrained"] is True
    loaded = load_checkpoint(settings.checkpoints.dir)
    assert (loaded.model.season, loaded.model.base_seasons) == (12, chosen["base_seasons"])
    assert not loaded.model.head.weight.detach().any() and not loaded.model.head.bias.detach().any()
    assert outcome.evaluation.relative_mae("model", "seasonal_naive") < 1.5


def test_a_fitted_model_within_noise_of_its_baseline_is_not_trusted(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(2)
    values = [10 + np.sin(np.arange(200) * 2 * np.pi / 12) + rng.normal(0, 0.3, 200) for _ in range(3)]
    history = History.from_long(
        np.repeat(["a", "b", "c"], 200), np.tile(np.arange(200), 3), np.concatenate(values)
    )
    real_fit = train_module.fit

    def nudged_fit(model, *args, **kwargs):
        result = real_fit(model, *args, **kwargs)
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.fill_(0.002)  # the baseline moved by a hair: better or worse by chance alone
        return result

    monkeypatch.setattr(train_module, "fit", nudged_fit)
    kept = {}
    for trust_z in (1.0, 0.0):
        settings = trainer_settings(tmp_path / str(trust_z), epochs=1, season=12, trust_z=trust_z)
        chosen = train_once(settings, history, progress=False).metrics["baseline"]
        z = chosen["fitted_vs_baseline"]["z"]
        assert abs(z) < 1.0 and chosen["fitted_vs_baseline"]["origins"] > 100
        kept[trust_z] = chosen["kept_untrained"]
    assert kept[1.0] is True  # within a standard error: the baseline stays
    assert kept[0.0] is (z > 0)  # no margin: whichever has the lower MAE


def test_advantage_is_the_difference_in_standard_errors() -> None:
    rng = np.random.default_rng(3)
    values = [np.tile([1.0, 5.0, 2.0, 8.0], 30) + rng.normal(0, 0.1, 120) for _ in range(2)]
    seasonal = RecurrentForecaster("gru", hidden_size=2, num_layers=1, horizon=3, season=4, base_seasons=1)
    last = RecurrentForecaster("gru", hidden_size=2, num_layers=1, horizon=3, season=1, base_seasons=1)
    better = advantage(seasonal, last, Scaling(), values, validation_fraction=0.25)
    worse = advantage(last, seasonal, Scaling(), values, validation_fraction=0.25)
    assert better.mae < 0.2 < 2.0 < better.baseline_mae and better.z < -10.0
    assert worse.z == pytest.approx(-better.z) and worse.mae == pytest.approx(better.baseline_mae)
    assert better.origins == 2 * 30  # the forecasts from the last training value on, per series


@pytest.mark.parametrize("lengths", [[3], [1, 2] * 50, [11, 5]])
def test_a_history_too_short_to_train_is_refused_before_fitting(tmp_path: Path, lengths, monkeypatch) -> None:
    fits = []
    monkeypatch.setattr(train_module, "fit", lambda *a, **k: fits.append(a))
    names = [f"s{i}" for i, n in enumerate(lengths) for _ in range(n)]
    ts = [t for n in lengths for t in range(n)]
    history = History.from_long(names, ts, np.arange(len(ts), dtype=float) + 1.0)
    with pytest.raises(NotEnoughHistory, match="history too short to train"):
        train_once(trainer_settings(tmp_path, epochs=1, season=2), history, progress=False)
    assert fits == []  # said before any epoch


def test_nothing_is_published_without_a_validation_point(tmp_path: Path) -> None:
    values = 10 + np.sin(np.arange(200) / 3.0)
    settings = trainer_settings(tmp_path, epochs=1, season=500)  # seasonal naive never exists here
    with pytest.raises(NotEnoughHistory, match="no validation point to score"):
        train_once(settings, History.from_long(["a"] * 200, np.arange(200), values), progress=False)
    assert not (tmp_path / "LATEST").exists()


def test_a_step_a_whole_season_ahead_keeps_its_baseline(tmp_path: Path) -> None:
    """Steps 3 and 6 of a season-3 baseline are the last value already: no weight to fit there."""
    rng = np.random.default_rng(6)
    values = [20 + 5 * np.sin(2 * np.pi * np.arange(300) / 3) + rng.normal(0, 0.5, 300) for _ in range(3)]
    settings = Settings(model={"horizon": 6}, state={"window": 3})  # one season back, no level: reads 2 back
    chosen, mix = choose_baseline(settings, values, Scaling(), 3)
    assert chosen == {"season": 3, "base_seasons": 1, "base_level": False}
    assert mix[2] == 0.0 and mix[5] == 0.0


def test_a_trending_monthly_set_gets_a_yearly_season_from_the_calendar_and_a_trend(tmp_path: Path) -> None:
    """The issue's failure: 90 months of a trend with a yearly pattern. Autocorrelation alone saw no season;
    the calendar offers 12, and a baseline carrying the trend beats seasonal naive (MASE)."""
    rng = np.random.default_rng(3)
    t = np.arange(90)
    stamps = pd.date_range("2010-01-01", periods=90, freq="MS").astype("datetime64[ms]").astype(np.int64)
    frames = [
        pd.DataFrame(
            {
                "series": f"s{i}",
                "ts": stamps,
                "value": 100 + (2 + i) * t + 5 * np.sin(2 * np.pi * t / 12 + i) + rng.normal(0, 1, 90),
            }
        )
        for i in range(6)
    ]
    frame = pd.concat(frames)
    history = History.from_long(frame["series"].to_numpy(), frame["ts"].to_numpy(), frame["value"].to_numpy())
    settings = trainer_settings(tmp_path, season=None, epochs=2)
    outcome = train_once(settings, history, progress=False)
    seasons = load_checkpoint(settings.checkpoints.dir).manifest["training"]["seasons"]
    assert seasons["season"] == 12 and seasons["tried"]["12"] == "calendar (monthly)"
    chosen = outcome.metrics["baseline"]
    assert chosen.get("trend_span", 0) > 0 or chosen["base_level"] is True
    assert outcome.evaluation.mase("model") < 0.8 * outcome.evaluation.mase("seasonal_naive")


def test_a_periodic_run_without_enough_history_waits_and_is_not_a_failure() -> None:
    registry = CollectorRegistry()
    metrics = TrainerMetrics(registry)
    results = iter([NotEnoughHistory("no history to train on"), DataError("bad file")])
    waits: list[float] = []

    class Stop:
        def is_set(self) -> bool:
            return False

        def wait(self, seconds: float) -> None:
            waits.append(seconds)

    def once():
        raise next(results)

    runs = run_periodically(once, 900.0, metrics, stop=Stop(), max_runs=2, retry_seconds=30.0)
    assert runs == 2
    sample = registry.get_sample_value
    assert sample("forecaster_trainer_runs_total", {"result": "no_data"}) == 1
    assert sample("forecaster_trainer_runs_total", {"result": "failed"}) == 1
    assert waits and waits[0] <= 30.0  # the next try comes soon, as after a failure


def test_the_trainer_lowers_its_cpu_priority_by_its_niceness():
    # in a child process: a process cannot raise its priority back
    code = (
        "import os; from forecaster.cli.train import lower_priority;"
        " before = os.nice(0); print(lower_priority(3) - before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"
    assert TrainSettings().niceness == 10  # the default (the test session sets 0 for in-process runs)


def test_one_extreme_value_does_not_make_the_loss_overflow(tmp_path: Path, monkeypatch, capsys) -> None:
    # 1e29 among values of about 10 (within the service's limit): its target, in its series' scales,
    # would square past float32; it is left out of the loss, and training goes on
    frame = generate(2, 160, seed=3, shape=SeriesShape(noise=0.5, shift_probability=0.0))
    frame.loc[frame.index[100], "value"] = 1e29
    data = tmp_path / "outlier.csv"
    frame.to_csv(data, index=False)
    for name, value in {
        "CHECKPOINTS__DIR": tmp_path / "ck",
        "MODEL__HIDDEN_SIZE": 4,
        "MODEL__NUM_LAYERS": 1,
    }.items():
        monkeypatch.setenv(f"FORECASTER_{name}", str(value))
    assert main(["train", "--input", str(data), "--epochs", "1", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["published"]
