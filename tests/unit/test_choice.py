"""The per-series choice: each series emits, per step, the model's forecast or the naive one its own
recent errors favour; the engine's choice equals the reference over each series alone, whatever the
batching, on both table paths, and lives in snapshots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forecaster.config import Settings
from forecaster.engine import Engine, reference_forecast
from forecaster.engine.choice import Choice, averaged_seasons, naive_reach, reference_choice
from forecaster.errors import StateError
from forecaster.metrics.service import ServiceMetrics
from forecaster.model import RecurrentForecaster
from forecaster.scaling import Scaling
from forecaster.train.baselines import last_value, seasonal_naive, targets

CHOICE = Choice(halflife=16.0, margin=0.1, min_errors=8)


def seasonal_model(
    season: int = 4, horizon: int = 5, seed: int = 0, residual: float = 0.0
) -> RecurrentForecaster:
    """The seasonal naive baseline of ``season``, plus a random residual of about ``residual`` scales."""
    torch.manual_seed(seed)
    model = RecurrentForecaster(
        "gru", hidden_size=8, num_layers=1, horizon=horizon, season=season, base_seasons=1
    )
    with torch.no_grad():
        model.head.weight.normal_(0.0, residual)
        model.head.bias.normal_(0.0, residual)
    return model


def noisy_model(horizon: int = 5, seed: int = 0) -> RecurrentForecaster:
    """A model whose forecasts are far off: random head weights, no baseline."""
    torch.manual_seed(seed)
    model = RecurrentForecaster("gru", hidden_size=8, num_layers=1, horizon=horizon)
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    return model


def streams(n: int = 120, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return {
        "walk": 50.0 + np.cumsum(rng.normal(size=n)),  # the last value is hard to beat
        "season": 10.0 + 3.0 * np.sin(2 * np.pi * t / 4) + rng.normal(scale=0.1, size=n),
        "phases": 10.0
        + np.tile([0.0, 5.0, -3.0, 9.0], n // 4)
        + rng.normal(scale=0.1, size=n),  # seasonal naive
        "short": 5.0 + rng.normal(size=n // 3),  # ends early: rounds of different sizes
    }


def run(engine: Engine, data: dict[str, np.ndarray], seed: int = 2) -> dict[str, np.ndarray]:
    """Feed the series interleaved in batches of random sizes; the forecasts per series, (T, H)."""
    rng = np.random.default_rng(seed)
    rows = [(name, t, float(v[t])) for name, v in data.items() for t in range(len(v))]
    rows.sort(key=lambda r: (r[1], r[0]))
    got: dict[str, list[np.ndarray]] = {name: [] for name in data}
    at = 0
    while at < len(rows):
        n = int(rng.integers(1, 9))
        batch = rows[at : at + n]
        at += n
        out = engine.process([r[0] for r in batch], [r[1] for r in batch], [r[2] for r in batch])
        for name, f in zip(out.series, out.forecasts, strict=True):
            got[name].append(f)
    return {name: np.stack(f) for name, f in got.items()}


@pytest.mark.parametrize("host_views", [None, False], ids=["numpy", "torch"])
@pytest.mark.parametrize(
    "season,window", [(4, 32), (1, 32), (4, 6)], ids=["seasonal", "season-1", "short-window"]
)
def test_the_engine_emits_the_reference_choice_of_each_series_whatever_the_batching(
    host_views, season, window
):
    model = seasonal_model(season, residual=3.0) if season > 1 else noisy_model()
    data = streams()
    engine = Engine(model, window=window, choice=CHOICE, host_views=host_views, scaling=Scaling())
    got = run(engine, data)
    sources = engine.choice_sources()
    assert sources[(1, "last_value")] >= 1  # the random walk
    if engine.table.candidates == 3:
        assert sources[(5, "seasonal_naive")] >= 1  # the series that repeats every 4 values
    switched = 0
    for name, values in data.items():
        raw = reference_forecast(model, values, Scaling()).astype(np.float32)
        want = reference_choice(raw, values, CHOICE, season, window)
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(
            got[name], reference_forecast(model, values, Scaling(), CHOICE, window), rtol=1e-5, atol=1e-4
        )
        switched += int((np.abs(want - raw) > 1e-6).sum())
    assert switched > 0  # the choice did something on these series


@pytest.mark.parametrize("host_views", [None, False], ids=["numpy", "torch"])
def test_a_long_horizon_switches_early_steps_on_few_errors_as_the_reference(host_views):
    # min_errors below the horizon: at the far steps a mean is worth fewer than one independent error,
    # and is counted as one (Choice.decide); the seasonal mean candidate takes part (window 64)
    choice = Choice(halflife=16.0, margin=0.1, z=1.0, min_errors=2)
    model = seasonal_model(season=4, horizon=12, residual=3.0)
    data = streams(n=96)
    engine = Engine(model, window=64, choice=choice, host_views=host_views, scaling=Scaling())
    assert engine.table.candidates == 4
    got = run(engine, data, seed=5)
    switched = 0
    for name, values in data.items():
        raw = reference_forecast(model, values, Scaling()).astype(np.float32)
        want = reference_choice(raw, values, choice, 4, 64)
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-4, err_msg=name)
        switched += int((np.abs(want[:, 8:] - raw[:, 8:]) > 1e-6).sum())
    assert switched > 0


def test_the_seasonal_candidate_needs_a_season_and_a_window_that_holds_it():
    assert naive_reach(1, 12, 256) == 2
    assert naive_reach(12, 12, 256) == 4  # the seasonal mean of four years too
    assert averaged_seasons(12, 12, 256) == 4 and averaged_seasons(12, 12, 36) == 3
    assert naive_reach(12, 13, 23) == 2  # step 13 reads 24 values back
    assert naive_reach(12, 13, 24) == 3  # seasonal naive only: a mean of two seasons needs 48
    assert naive_reach(12, 13, 48) == 4
    assert Engine(seasonal_model(4), window=32, choice=CHOICE).table.candidates == 4
    assert Engine(seasonal_model(4), window=32).table.candidates == 0  # off by default in the library


def test_a_bad_model_falls_back_to_the_best_naive_forecast_per_series_and_step():
    """The guard: a model far worse than the naive forecasts is replaced by them, per step, once a series
    has min_errors errors, and the emitted errors come within the margin (plus noise) of the best naive."""
    model = noisy_model(horizon=3)
    rng = np.random.default_rng(5)
    values = 100.0 + np.cumsum(rng.normal(size=400))
    raw = reference_forecast(model, values, Scaling()).astype(np.float32)
    emitted = reference_choice(raw, values, CHOICE, 1, 256)
    target = targets(values, 3)
    later = slice(100, 396)  # past the first errors
    mae = lambda f: np.nanmean(np.abs(f[later] - target[later]), axis=0)  # noqa: E731
    assert (mae(raw) > 2.0 * mae(last_value(values, 3))).all()  # the model is much worse
    assert (mae(emitted) <= 1.15 * mae(last_value(values, 3))).all()
    # before min_errors k-step errors a series emits the model's forecasts
    np.testing.assert_array_equal(emitted[: CHOICE.min_errors], raw[: CHOICE.min_errors])


def test_a_good_model_keeps_its_forecasts_and_a_noisy_season_takes_the_seasonal_mean():
    """Where no naive forecast beats the model, nothing switches: a model whose baseline is the mean of
    the last four seasons keeps its forecasts on a noisy seasonal series; one that forecasts seasonal naive
    (the noise of one season) gives way to the seasonal mean of four."""
    rng = np.random.default_rng(6)
    t = np.arange(300)
    values = 20.0 + 5.0 * np.sin(2 * np.pi * t / 4) + rng.normal(scale=1.0, size=300)
    torch.manual_seed(0)
    mean_model = RecurrentForecaster("gru", hidden_size=8, num_layers=1, horizon=4, season=4, base_seasons=4)
    raw = reference_forecast(mean_model, values, Scaling()).astype(np.float32)
    np.testing.assert_array_equal(reference_choice(raw, values, CHOICE, 4, 256), raw)
    naive_model = seasonal_model(season=4, horizon=4)
    raw = reference_forecast(naive_model, values, Scaling()).astype(np.float32)
    np.testing.assert_allclose(
        raw[8:], seasonal_naive(values, 4, 4)[8:], atol=1e-3
    )  # untrained: the baseline
    emitted = reference_choice(raw, values, Choice(), 4, 256)
    later = slice(100, 296)
    # at step 1 (later steps count their overlapping errors as fewer, 1/k, so need more to switch): the
    # seasonal mean whenever its lead over the running means is clear, and a lower error overall
    taken = np.isclose(emitted[later, 0], _seasonal_mean(values, 4, 4)[later, 0], atol=1e-3)
    assert taken.mean() > 0.3 and (taken | (emitted[later, 0] == raw[later, 0])).all()
    target = targets(values, 4)[later, 0]
    assert np.abs(emitted[later, 0] - target).mean() < 0.95 * np.abs(raw[later, 0] - target).mean()


def _seasonal_mean(values: np.ndarray, season: int, seasons: int) -> np.ndarray:
    """Mean of ``seasons`` seasonal naive forecasts, each a season further back: (T, H) (NaN before)."""
    from forecaster.train.baselines import seasonal_naive

    shifted = [np.roll(seasonal_naive(values, season, season), season * i, axis=0) for i in range(seasons)]
    for i, s in enumerate(shifted):
        s[: season * i] = np.nan
    return np.mean(shifted, axis=0)


def test_a_naive_forecast_must_beat_the_model_by_the_margin_and_by_more_than_noise():
    choice = Choice(halflife=4.0, margin=0.5, z=2.0, min_errors=1)
    model, naive = np.array([[3.0]], np.float32), np.array([[[7.0]]], np.float32)
    one = np.ones((1, 1), np.float32)
    mean = np.array([[[1.2], [1.0]]], np.float32)  # model 1.2, last value 1.0: within the 50 % margin
    steady = (mean[:, :1] - mean[:, 1:]) ** 2  # a difference that never varied
    assert choice.pick(model, naive, mean, steady, one).tolist() == [[3.0]]
    mean[0, 0, 0] = 1.6  # now beyond it
    steady = (mean[:, :1] - mean[:, 1:]) ** 2
    assert choice.pick(model, naive, mean, steady, one).tolist() == [[7.0]]
    assert choice.pick(model, naive, mean, steady, 0 * one).tolist() == [[3.0]]  # no errors yet
    # a difference of 0.6 on average that swings by +-3 is noise, even over many errors
    noisy = steady + 9.0
    assert choice.pick(model, naive, mean, noisy, 1000 * one).tolist() == [[3.0]]
    assert Choice(halflife=1e6, margin=0.5, z=2.0).pick(model, naive, mean, noisy, 1e5 * one).tolist() == [
        [7.0]
    ]
    # at step k the same errors count as 1/k as many: what is clear at step 1 is not at step 9
    mean9 = np.repeat(mean, 9, axis=2)
    switch, _ = Choice(halflife=1e6, margin=0.0, z=2.0).decide(
        mean9, np.repeat(steady + 1.0, 9, axis=2), np.full((1, 9), 40.0, np.float32)
    )
    assert switch[0].tolist() == [True] * 3 + [False] * 6  # noise 2 * sqrt(k / 40) < 0.6 up to k = 3.6


def test_update_keeps_plain_means_first_and_skips_what_is_not_scored():
    choice = Choice(halflife=4.0)
    n, m, sq = choice.update(
        np.array([[[4.0], [1.0]]], np.float32),
        None,
        np.zeros((1, 1), np.float32),
        np.zeros((1, 2, 1), np.float32),
        np.zeros((1, 1, 1), np.float32),
    )
    assert n.tolist() == [[1.0]] and m[0, :, 0].tolist() == [4.0, 1.0] and sq.tolist() == [[[9.0]]]
    n, m, sq = choice.update(np.array([[[2.0], [2.0]]], np.float32), None, n, m, sq)
    assert n.tolist() == [[2.0]] and m[0, :, 0].tolist() == [3.0, 1.5] and sq.tolist() == [[[4.5]]]
    skipped = choice.update(np.full((1, 2, 1), 100.0, np.float32), np.array([[False]]), n, m, sq)
    assert (
        skipped[0].tolist() == [[2.0]]
        and skipped[1].tolist() == m.tolist()
        and skipped[2].tolist() == sq.tolist()
    )


@pytest.mark.parametrize("host_views", [None, False], ids=["numpy", "torch"])
def test_the_choice_lives_in_snapshots_and_a_restored_series_continues_the_same(host_views):
    model = noisy_model()
    data = {"walk": streams()["walk"]}
    whole = Engine(model, window=32, choice=CHOICE, host_views=host_views)
    first = Engine(model, window=32, choice=CHOICE, host_views=host_views)
    values = data["walk"]
    full = [whole.process(["walk"], [t], [values[t]]).forecasts[0] for t in range(len(values))]
    for t in range(60):
        first.process(["walk"], [t], [values[t]])
    snapshot = first.snapshot("walk")
    assert snapshot == first.snapshot_many(["walk"])[0]
    second = Engine(model, window=32, choice=CHOICE, host_views=host_views)
    second.restore("walk", snapshot)
    rest = [second.process(["walk"], [t], [values[t]]).forecasts[0] for t in range(60, len(values))]
    np.testing.assert_allclose(np.stack(rest), np.stack(full[60:]), rtol=1e-6, atol=1e-6)
    assert (np.abs(np.stack(full[60:]) - reference_forecast(model, values)[60:]) > 1e-3).any()  # switched
    # A table without the choice (or with another candidate count) refuses such a snapshot.
    with pytest.raises(StateError, match="shape"):
        Engine(model, window=32).restore("walk", snapshot)


def test_a_swap_starts_the_choice_over_with_the_new_models_own_errors():
    model, newer = noisy_model(seed=0), noisy_model(seed=1)
    values = streams()["walk"]
    engine = Engine(model, window=32, choice=CHOICE)
    twin = Engine(model, window=32)  # the same swap without the choice: the new model's own forecasts
    for t in range(80):
        engine.process(["walk"], [t], [values[t]])
        twin.process(["walk"], [t], [values[t]])
    assert engine.choice_sources()[(1, "last_value")] == 1  # switched before the swap
    engine.rewarm(newer, "v2")
    twin.rewarm(newer, "v2")
    assert engine.choice_sources()[(1, "model")] == 1
    got = np.stack([engine.process(["walk"], [t], [values[t]]).forecasts[0] for t in range(80, 120)])
    raw = np.stack([twin.process(["walk"], [t], [values[t]]).forecasts[0] for t in range(80, 120)])
    # the new model's forecasts until it has min_errors errors of its own (the first scores the forecast
    # the swap made), then the choice again
    np.testing.assert_array_equal(got[: CHOICE.min_errors - 1], raw[: CHOICE.min_errors - 1])
    assert (np.abs(got[CHOICE.min_errors + 2 :] - raw[CHOICE.min_errors + 2 :]) > 1e-3).any()


def test_settings_turn_the_choice_off_and_the_metrics_count_series_by_source(monkeypatch):
    model = noisy_model()
    values = streams()["walk"]
    monkeypatch.setenv("FORECASTER_CHOICE__ENABLED", "false")
    off = Engine.from_settings(model, Settings())
    assert off.chooser is None and off.choice_sources() == {}
    monkeypatch.setenv("FORECASTER_CHOICE__ENABLED", "true")
    monkeypatch.setenv("FORECASTER_CHOICE__MIN_ERRORS", "4")
    on = Engine.from_settings(model, Settings())
    assert on.choice == Choice(64.0, 0.05, 2.0, 4)
    for t in range(60):
        off.process(["walk"], [t], [values[t]])
        on.process(["walk", "flat"], [t, t], [values[t], 3.0])
    np.testing.assert_allclose(
        off.process(["walk"], [60], [values[60]]).forecasts,
        reference_forecast(model, values[:61])[-1:],
        atol=1e-4,
    )
    metrics = ServiceMetrics(registry=None)
    metrics.update_choice(on.choice_sources())
    sample = metrics.registry.get_sample_value
    assert sample("forecaster_series_choice", {"step": "1", "source": "last_value"}) == 2
    assert sample("forecaster_series_choice", {"step": "1", "source": "model"}) == 0
    # the flat series' last value is exact at every step; the random walk's wins clearly at step 1 only
    assert sample("forecaster_series_choice", {"step": "5", "source": "last_value"}) >= 1
    assert (
        sum(sample("forecaster_series_choice", {"step": "5", "source": s}) for s in ("model", "last_value"))
        == 2
    )


@pytest.mark.parametrize("kind", ["ewm", "log"])
def test_intervals_sit_around_the_emitted_forecasts(kind):
    """The calibrator scores what was emitted: with the choice on, the bounds are the reference calibrator's
    over the chosen forecasts of each series alone."""
    from forecaster.engine.intervals import Intervals, reference_intervals

    model, scaling = noisy_model(), Scaling(kind)
    data = {name: np.abs(v) + 1.0 for name, v in streams().items()}
    engine = Engine(model, window=32, choice=CHOICE, scaling=scaling, intervals=Intervals())
    rows = sorted(
        ((name, t, float(v[t])) for name, v in data.items() for t in range(len(v))), key=lambda r: r[1]
    )
    got: dict[str, list] = {name: [] for name in data}
    for lo in range(0, len(rows), 5):
        batch = rows[lo : lo + 5]
        out = engine.process([r[0] for r in batch], [r[1] for r in batch], [r[2] for r in batch])
        for j, name in enumerate(out.series):
            got[name].append((out.forecasts[j], out.lower[j]))
    for name, values in data.items():
        emitted = np.stack([f for f, _ in got[name]])
        np.testing.assert_allclose(
            emitted, reference_forecast(model, values, scaling, CHOICE, 32), rtol=1e-5, atol=1e-4
        )
        lower, _ = reference_intervals(emitted, values, Intervals(), scaling)
        np.testing.assert_allclose(np.stack([lo for _, lo in got[name]]), lower, rtol=1e-4, atol=1e-3)
