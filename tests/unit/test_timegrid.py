"""A step is a period: the time grid, the engine on it, and the trainer's parity with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecaster.engine.engine import Engine, reference_forecast
from forecaster.engine.snapshot import FORMAT_VERSION
from forecaster.model import CELLS, RecurrentForecaster
from forecaster.records.output import encode_forecasts
from forecaster.scaling import Scaling
from forecaster.timegrid import (
    LEARN_SPACINGS,
    estimate_period,
    grid_steps,
    impute,
    parse_period,
    resolve_period,
    to_grid,
)

HOUR = 3_600_000
T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR


def _model(cell: str = "gru", season: int = 4, seed: int = 0) -> RecurrentForecaster:
    """A model over a seasonal baseline (season 4) with a random head: the net and the baseline both matter."""
    torch.manual_seed(seed)
    model = RecurrentForecaster(cell, hidden_size=8, num_layers=2, horizon=3, season=season, base_seasons=1)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def test_periods_are_read_from_spacings_robustly() -> None:
    hourly = T0 + np.arange(50) * HOUR
    assert estimate_period(hourly) == HOUR
    jitter = hourly + np.random.default_rng(0).integers(-60_000, 60_000, 50)  # a minute either way
    assert estimate_period(jitter) in range(HOUR - 120_000, HOUR + 120_000)
    gapped = np.delete(hourly, [3, 4, 5, 9, 20, 21, 30])  # gaps are whole multiples: still hourly
    assert estimate_period(gapped) == HOUR
    months = np.array(
        [np.datetime64(f"2020-{m:02d}-01").astype("datetime64[ms]").astype(np.int64) for m in range(1, 13)]
    )
    assert 28 * 86_400_000 <= estimate_period(months) <= 31 * 86_400_000  # 28 to 31 days: one period each
    irregular = np.cumsum(np.random.default_rng(1).exponential(1000.0, 40).astype(np.int64) + 1)
    assert estimate_period(irregular) == 0  # event times: no stable spacing
    assert estimate_period(np.array([5])) == 0


def test_durations_and_the_setting() -> None:
    assert parse_period("15m") == parse_period("15min") == 900_000
    assert parse_period("1d") == 86_400_000 and parse_period("250") == 250
    with pytest.raises(ValueError, match="duration"):
        parse_period("hourly")
    assert resolve_period("auto", HOUR) == HOUR and resolve_period("auto", 0) is None
    assert resolve_period("none", HOUR) == 0 and resolve_period("30min", HOUR) == 1_800_000


def test_grid_steps_snap_drop_and_restart() -> None:
    period = np.full(5, 100)
    # 100 later: next period; 149: snaps to one; 151: two (one missing); 40: same period; 1000: 9 missing
    steps, missing, restart = grid_steps(np.array([100, 149, 151, 40, 1000]), period, max_gap=4, season=4)
    assert steps.tolist() == [True, True, True, False, True]
    assert missing.tolist() == [0, 0, 1, 0, 9 % 4] and restart.tolist() == [False] * 4 + [True]
    # without a period a step is any later value
    steps, missing, _ = grid_steps(np.array([1, 0, -5]), np.zeros(3, np.int64), max_gap=4)
    assert steps.tolist() == [True, False, False] and missing.tolist() == [0, 0, 0]


def test_to_grid_fills_with_the_value_a_season_earlier_while_two_are_not_held() -> None:
    ts = np.array([0, 1, 2, 3, 4, 7, 8]) * 10  # 50 and 60 missing
    grid = to_grid(ts, np.array([1.0, 2.0, 3.0, 4.0, 5.0, 8.0, 9.0]), 10, season=4)
    assert grid.missing.tolist() == [False] * 5 + [True, True] + [False] * 2
    assert grid.values[5:7].tolist() == [2.0, 3.0]  # the values at positions 1 and 2, one season back
    assert grid.ts.tolist() == list(range(0, 90, 10)) and grid.position.tolist() == [0, 1, 2, 3, 4, 7, 8]


def test_a_trending_series_is_filled_at_its_level_and_a_flat_one_with_its_pattern() -> None:
    season = 4
    pattern = np.array([0.0, 3.0, 1.0, -2.0])
    flat = np.tile(pattern, 3)  # (12,)
    trend = flat + np.arange(12) * 0.5  # half a unit a period
    recent = np.stack([flat[-8:], trend[-8:]])  # two seasons before the missing period (position 12)
    filled = impute(recent, season)
    # The value a season back (position 8: pattern 0) moved by the change of level over a season (4 * 0.5).
    np.testing.assert_allclose(filled, [flat[8], trend[8] + 2.0])  # = the truth at 12 for both
    np.testing.assert_allclose(impute(torch.from_numpy(recent), season).numpy(), filled)  # torch: the same
    # One season held: the value a season back; none (or no season): the last value.
    np.testing.assert_allclose(impute(np.array([[np.nan] * 4 + [1.0, 2.0, 3.0, 4.0]]), season), [1.0])
    np.testing.assert_allclose(impute(np.array([[np.nan] * 7 + [5.0]]), season), [5.0])
    np.testing.assert_allclose(impute(np.array([[1.0, 2.0]]), 1), [2.0])


def test_a_falling_positive_series_is_filled_by_ratio_and_stays_positive() -> None:
    """With log scaling the level moves by a ratio: a series halving every season is filled at half its
    value a season back (a difference would take it below zero), in the engine as in the trainer."""
    season = 4
    pattern = np.array([1.0, 3.0, 2.0, 4.0])
    falling = np.concatenate([pattern * 400.0, pattern * 200.0])  # (8,) halves each season
    filled = impute(falling[None, :], season, positive=True)
    np.testing.assert_allclose(filled, [pattern[0] * 100.0], rtol=1e-9)  # exp(log 200 + log 1/2) * 1
    assert impute(falling[None, :], season)[0] < 0  # the additive move, for contrast
    model = _model(season=season)
    model.period_ms = HOUR
    engine = Engine(model, window=16, scaling=Scaling(kind="log"))
    ts = T0 + np.arange(len(falling) + 3) * HOUR
    values = np.concatenate([falling, [50.0, 150.0, 25.0]])
    keep = np.ones(len(ts), bool)
    keep[8] = False  # the period after the two seasons is missing
    out = engine.process(["s"] * int(keep.sum()), ts[keep], values[keep])
    assert out.imputed == 1 and np.isfinite(out.forecasts).all()
    (row,) = np.flatnonzero(engine.table.gaps[engine.table.slots["s"]])
    assert engine.table.values_flat[engine.table.slots["s"] * 16 + row] == np.float32(100.0)


@st.composite
def gapped_streams(draw):
    """Three hourly series with random missing hours (runs of 1-6), a few ms of jitter, duplicates within a
    period, interleaved and cut into shuffled batches."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = {}
    for name in ("a", "b", "c"):
        n = int(rng.integers(20, 60))
        keep = np.ones(n, bool)
        for _ in range(int(rng.integers(0, 6))):
            start = int(rng.integers(8, n - 1))  # eight values first: the extras below read ts[5]
            keep[start : start + int(rng.integers(1, 7))] = False
        keep[-1] = True
        hours = np.flatnonzero(keep)
        ts = T0 + hours * HOUR + rng.integers(-1000, 1000, len(hours))
        values = 10.0 + np.sin(hours / 2.0) * 3.0 + rng.normal(0.0, 0.2, len(hours))
        data[name] = (ts, values)
    rows = [(name, int(t), float(v)) for name, (ts, vs) in data.items() for t, v in zip(ts, vs, strict=True)]
    extra = [(name, int(ts[k]) + 60_000, 99.0) for name, (ts, _) in data.items() for k in (5, len(ts) - 3)]
    rows = sorted(rows + extra, key=lambda r: r[1])  # a second value in the same hour: dropped
    batches, i = [], 0
    while i < len(rows):
        size = int(rng.integers(1, 14))
        batch = rows[i : i + size]
        rng.shuffle(batch)
        batches.append(batch)
        i += size
    return data, batches


@pytest.mark.parametrize("host_views", [True, False])
@pytest.mark.parametrize("cell", CELLS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=gapped_streams())
def test_with_gaps_incremental_equals_full_on_the_grid(cell: str, host_views: bool, stream) -> None:
    """Invariants 1 and 8: whatever the batching, each value's forecast equals the full pass over its series
    on its time grid, the missing periods imputed as ``to_grid`` and ``transform_values`` do."""
    data, batches = stream
    model = _model(cell)
    scaling = Scaling(halflife=16.0)
    engine = Engine(model, window=16, capacity=2, scaling=scaling, host_views=host_views, period_ms=HOUR)
    got: dict[tuple[str, int], np.ndarray] = {}
    steps: dict[tuple[str, int], int] = {}
    for batch in batches:
        out = engine.process([r[0] for r in batch], [r[1] for r in batch], [r[2] for r in batch])
        for k, (name, t) in enumerate(zip(out.series, out.ts.tolist(), strict=True)):
            got[(name, t)] = out.forecasts[k]
            steps[(name, t)] = int(out.step_ms[k])
    assert engine.duplicates_total == 6  # the second value in an hour, twice per series
    assert set(steps.values()) == {HOUR}
    imputed = 0
    for name, (ts, values) in data.items():
        grid = to_grid(ts, values, HOUR, season=model.season)
        imputed += int(grid.missing.sum())
        expected = reference_forecast(model, grid.values, scaling, missing=grid.missing)
        mine = np.stack([got[(name, int(t))] for t in ts])
        # float32 steps against a float64 pass: a few units in the 6th digit at values near 10
        np.testing.assert_allclose(mine, expected[grid.position], atol=1e-4, rtol=1e-5)
    assert engine.imputed_total == imputed


def test_a_gapless_stream_forecasts_as_before() -> None:
    """A series without missing periods: on its grid (learnt, or the model's) it steps exactly as value by
    value did."""
    model = _model()
    ts = T0 + np.arange(40) * HOUR
    values = np.random.default_rng(3).normal(5.0, 1.0, 40)
    outs = []
    for period in (0, None, HOUR):
        engine = Engine(model, window=16, period_ms=period)
        outs.append(np.concatenate([engine.process(["a"] * 4, ts[i : i + 4], values[i : i + 4]).forecasts
                                    for i in range(0, 40, 4)]))  # fmt: skip
        assert engine.imputed_total == 0
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_a_series_learns_its_period_and_an_irregular_one_says_it_has_none() -> None:
    engine = Engine(_model(), window=16)  # the model has no period: each series learns its own
    n = LEARN_SPACINGS + 1
    regular = T0 + np.arange(n + 3) * 60_000
    irregular = T0 + np.cumsum(np.random.default_rng(4).exponential(50_000.0, n + 3).astype(np.int64) + 1)
    out = engine.process(["r"] * n, regular[:n], np.ones(n))
    assert out.step_ms.tolist() == [0] * n  # stepped value by value while learning...
    assert engine.period_counts() == {"period": 1, "learning": 0, "none": 0}
    out = engine.process(["r", "r"], [regular[n] + 60_000, regular[n + 1] + 60_000], [2.0, 3.0])
    assert out.step_ms.tolist() == [60_000, 60_000] and out.imputed == 1  # ...then on its grid
    engine.process(["i"] * (n + 3), irregular, np.ones(n + 3))
    assert engine.period_counts()["none"] == 1
    from forecaster.engine.view import series_state

    assert series_state(engine, "i").grid == "none" and series_state(engine, "r").period_ms == 60_000
    assert series_state(engine, "r").imputed[-4:] == [False, True, False, False]


def test_a_series_spaced_otherwise_than_the_checkpoint_takes_its_own_period() -> None:
    model = _model()
    model.period_ms = HOUR  # trained on hourly series (the manifest's period)
    engine = Engine(model, window=16)
    ts = T0 + np.arange(LEARN_SPACINGS + 2) * 86_400_000  # daily, against an hourly model
    out = engine.process(["d"] * len(ts), ts, np.arange(len(ts), dtype=float))
    assert engine.table.period[engine.table.slots["d"]] == 86_400_000
    assert out.imputed == 0  # while it checked its period, 23 missing hours a day were not filled
    engine.process(["h"] * 3, T0 + np.array([0, 1, 3]) * HOUR, [1.0, 2.0, 3.0])  # hourly: the model's grid
    assert engine.table.period[engine.table.slots["h"]] == HOUR and engine.imputed_total == 1


@pytest.mark.parametrize("model_period", [None, HOUR])
def test_learning_series_forecast_the_same_in_any_batching(model_period: int | None) -> None:
    """Series that learn their period in a batch step their later values in it on the settled grid, as
    they would one batch per value: hourly, daily and per-minute series, with gaps of 1 to 5 periods after
    their first values and same-period duplicates, in batches of 1, 7 and all the values."""
    rng = np.random.default_rng(11)
    names, ts, values = [], [], []
    for name, spacing in (("h", HOUR), ("d", 24 * HOUR), ("m", 60_000)):
        k = np.arange(40)
        k = np.where(k > LEARN_SPACINGS + 2, k + np.cumsum(rng.random(40) < 0.2) * rng.integers(1, 5), k)
        at = T0 + k * spacing
        at = np.insert(at, 20, at[19] + spacing // 10)  # a second value in one period: dropped
        names += [name] * len(at)
        ts += at.tolist()
        values += (np.sin(k / 3.0).tolist() + [0.5])[: len(at)]
    order = np.argsort(np.array(ts), kind="stable")  # interleaved in time, as a topic would hold them
    names, ts, values = [names[i] for i in order], np.array(ts)[order], np.array(values)[order]
    outputs = {}
    for batch in (1, 7, len(ts)):
        model = _model()
        model.period_ms = model_period
        engine = Engine(model, window=16)
        got = {}
        for start in range(0, len(ts), batch):
            part = slice(start, start + batch)
            out = engine.process(names[part], ts[part], values[part])
            for row, series in enumerate(out.series):
                got[(series, int(out.ts[row]))] = (out.forecasts[row].copy(), int(out.step_ms[row]))
        outputs[batch] = got, engine.imputed_total, engine.period_counts()
    one, *others = outputs.values()
    assert one[2] == {"period": 3, "learning": 0, "none": 0} and one[1] > 0
    for got, imputed, counts in others:
        assert (imputed, counts) == one[1:] and got.keys() == one[0].keys()
        for key, (forecast, step_ms) in got.items():
            assert step_ms == one[0][key][1]
            # float32 steps, batched gathers vs one at a time: equal to rounding.
            np.testing.assert_allclose(forecast, one[0][key][0], rtol=1e-5, atol=1e-5)


def test_a_long_gap_keeps_only_the_phase() -> None:
    engine = Engine(_model(season=4), window=16, period_ms=HOUR, max_gap_periods=10)
    ts = T0 + np.arange(LEARN_SPACINGS + 1) * HOUR
    engine.process(["a"] * len(ts), ts, np.ones(len(ts)))
    out = engine.process(["a"], [ts[-1] + 103 * HOUR], [1.0])  # 102 missing: 102 % 4 = 2 stepped
    assert (out.imputed, out.restarts, engine.restarts_total) == (2, 1, 1)


def test_snapshots_carry_the_grid() -> None:
    engine = Engine(_model(), window=16)
    ts = T0 + np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12]) * HOUR
    engine.process(["a"] * 9, ts[:9], np.arange(9, dtype=float))  # learnt: hourly
    engine.process(["a"] * 2, ts[9:], [9.0, 12.0])  # two missing hours
    data = engine.snapshot("a")
    assert data[7:9] == FORMAT_VERSION.to_bytes(2, "little")
    twin = Engine(_model(), window=16)
    twin.restore("a", data)
    a, b = engine.table.slots["a"], twin.table.slots["a"]
    assert twin.table.period[b] == engine.table.period[a] == HOUR
    assert (twin.table.gaps[b] == engine.table.gaps[a]).all() and engine.table.gaps[a].sum() == 2
    assert not twin.table.learning[b]
    more = (["a"], [ts[-1] + 2 * HOUR], [4.0])
    np.testing.assert_array_equal(engine.process(*more).forecasts, twin.process(*more).forecasts)


def test_forecast_records_say_when_each_step_is_for() -> None:
    raw = encode_forecasts(
        ["a", "b"], np.array([T0, T0]), "v1", np.ones((2, 3), np.float32), np.zeros(2, np.int64),
        np.arange(2), np.full(2, -1), step_ms=np.array([HOUR, 0]),
    )  # fmt: skip
    import json

    a, b = (json.loads(r) for r in raw)
    assert a["step_ms"] == HOUR and b["step_ms"] is None


def test_the_trainer_grids_gapped_history_and_records_its_period(tmp_path) -> None:
    from forecaster.config import Settings
    from forecaster.train.history import History
    from forecaster.train.run import train_once

    rng = np.random.default_rng(5)
    hours = np.arange(400)
    keep = rng.random(400) > 0.1
    keep[:2] = True
    ts = np.concatenate([T0 + hours[keep] * HOUR] * 2)
    values = np.concatenate(
        [np.sin(2 * np.pi * hours[keep] / 24) * 5 + 20 + rng.normal(0, 0.3, keep.sum())] * 2
    )
    names = ["x"] * keep.sum() + ["y"] * keep.sum()
    settings = Settings(
        model={"hidden_size": 4, "num_layers": 1, "horizon": 4},
        train={"epochs": 1},
        checkpoints={"dir": str(tmp_path)},
    )
    outcome = train_once(settings, History.from_long(names, ts, values), progress=False)
    assert outcome.published is not None
    from forecaster.checkpoints.store import load_checkpoint

    loaded = load_checkpoint(tmp_path / outcome.published)
    assert loaded.model.period_ms == HOUR
    grid = loaded.manifest["training"]["time_grid"]
    assert grid["period_ms"] == HOUR and grid["missing_periods"] == 2 * int((~keep).sum())
