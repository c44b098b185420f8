"""Engine: incremental equals full (invariant 1), duplicates, eviction and restore, re-warm, online error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecaster.engine.engine import Engine, reference_forecast
from forecaster.errors import StateError
from forecaster.model import CELLS, RecurrentForecaster
from forecaster.scaling import Scaling

# "clipped" moves many values (more than 1.5 scales out, once a series has 8): parity holds through them
SCALINGS = {"none": None, "ewm": Scaling(halflife=6.0), "clipped": Scaling(halflife=6.0, clip=1.5)}


def _model(cell: str = "gru", seed: int = 0, **kwargs) -> RecurrentForecaster:
    torch.manual_seed(seed)
    options = dict(hidden_size=8, num_layers=2, horizon=3)
    options.update(kwargs)
    return RecurrentForecaster(cell, **options).eval()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@st.composite
def streams(draw, max_series: int = 6, max_len: int = 14):
    """Per-series values with increasing ts, interleaved at random and cut into batches; rows of a batch
    are shuffled (the engine must order them)."""
    n_series = draw(st.integers(1, max_series))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = {}
    for i in range(n_series):
        n = draw(st.integers(1, max_len))
        ts = np.cumsum(rng.integers(1, 1000, size=n)) + 1_700_000_000_000
        data[f"series-{i}"] = (ts, rng.normal(loc=rng.uniform(-3, 3), scale=rng.uniform(0.1, 3), size=n))
    events = []
    cursors = {s: 0 for s in data}
    while cursors:  # random interleaving that keeps each series' order: new series appear mid-stream
        s = list(cursors)[rng.integers(len(cursors))]
        k = cursors[s]
        events.append((s, int(data[s][0][k]), float(data[s][1][k])))
        cursors[s] += 1
        if cursors[s] == len(data[s][0]):
            del cursors[s]
    batches, i = [], 0
    while i < len(events):
        size = int(rng.integers(1, 12))
        batch = events[i : i + size]
        rng.shuffle(batch)
        batches.append(batch)
        i += size
    return data, batches


def _run(engine: Engine, batches) -> dict[str, list]:
    got: dict[str, list] = {}
    for batch in batches:
        names, ts, values = zip(*batch, strict=True)
        out = engine.process(list(names), list(ts), list(values))
        for j, (s, t, f) in enumerate(zip(out.series, out.ts, out.forecasts, strict=True)):
            assert names[out.index[j]] == s and ts[out.index[j]] == t
            got.setdefault(s, []).append((int(t), f))
    return got


@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize("cell", CELLS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams())
def test_incremental_equals_full(cell: str, scaling: str, stream) -> None:
    data, batches = stream
    model = _model(cell)
    engine = Engine(model, period_ms=0, window=4, capacity=2, scaling=SCALINGS[scaling])
    _check_incremental_equals_full(engine, model, data, batches, SCALINGS[scaling])


@pytest.mark.parametrize("cell", CELLS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams())
def test_incremental_equals_full_on_the_device_path(cell: str, stream) -> None:
    """The torch-indexed path a GPU table takes, run on the CPU."""
    data, batches = stream
    model = _model(cell)
    scaling = SCALINGS["ewm"]
    engine = Engine(model, period_ms=0, window=4, capacity=2, scaling=scaling, host_views=False)
    _check_incremental_equals_full(engine, model, data, batches, scaling)
    engine.rewarm(_model(cell, seed=3), "v2")  # and the re-warm / snapshot paths through it
    assert engine.errors["init"].count == sum(len(ts) - 1 for ts, _ in data.values())
    name = next(iter(data))
    twin = Engine(model, period_ms=0, window=4, scaling=scaling, host_views=False)
    twin.restore(name, engine.snapshot(name))  # another version's snapshot: re-warmed with this model
    twin.rewarm(model, "init")
    engine.rewarm(model, "init")
    nxt = int(data[name][0][-1]) + 1
    np.testing.assert_allclose(
        twin.process([name], [nxt], [0.5]).forecasts,
        engine.process([name], [nxt], [0.5]).forecasts,
        atol=1e-5,
    )


def _residual_model(cell: str, seed: int = 0, **baseline) -> RecurrentForecaster:
    """A model forecasting over a seasonal baseline (default season 2, two seasons: three inputs back), head
    random."""
    model = _model(cell, seed=seed, **{"season": 2, "base_seasons": 2, **baseline})
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize(
    "baseline",
    [
        {"base_level": False},
        {"base_level": True},
        {"trend_span": 3, "damping": 0.9},
        {"base_level": True, "error_input": True},
    ],
    ids=["seasonal", "level", "trend", "level+errors"],
)
@pytest.mark.parametrize("host_views", [True, False])
@pytest.mark.parametrize("cell", CELLS)
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams())
def test_incremental_equals_full_over_a_seasonal_baseline(
    cell: str, host_views: bool, baseline: dict, stream
) -> None:
    """The baseline's inputs come from the ring buffer; the window is shorter than most series (with the
    level moved, the baseline reads 6 inputs back: window 7; with a trend over 3 values, 4 back)."""
    data, batches = stream
    model = _residual_model(cell, **baseline)
    window = model.context + 1
    engine = Engine(
        model, period_ms=0, window=window, capacity=2, scaling=SCALINGS["ewm"], host_views=host_views
    )
    _check_incremental_equals_full(engine, model, data, batches, SCALINGS["ewm"])


@pytest.mark.parametrize("host_views", [True, False])
def test_the_baseline_is_computed_in_data_units_under_moving_scaling(host_views: bool) -> None:
    """A linear trend plus an exact season: the level-moved seasonal naive forecast is exact in data units.
    An untrained model (zero head) must forecast it while the running mean and deviation move under it
    (read in each value's own scaled units, the baseline would be off by the drift of the statistics)."""
    model = _model("gru", season=12, base_seasons=1, base_level=True, horizon=12)  # zero head: the baseline
    t = np.arange(120, dtype=np.float64)
    values = 1000.0 + 25.0 * t + 40.0 * np.sin(2 * np.pi * t / 12)
    engine = Engine(model, window=64, scaling=Scaling(halflife=8.0), host_views=host_views)
    got = np.stack(
        [engine.process(["a"], [int(k)], [v]).forecasts[0] for k, v in zip(t, values, strict=True)]
    )
    future = np.stack([values[k + 1 : k + 13] for k in range(24, 100)])  # (76, 12) after value 24 .. 99
    np.testing.assert_allclose(got[24:100], future, rtol=2e-6)
    np.testing.assert_allclose(
        reference_forecast(model, values, Scaling(halflife=8.0))[24:100], future, rtol=2e-6
    )
    # after a swap to the same model the re-warmed last forecast reads the same baseline
    engine.rewarm(model, "again")
    np.testing.assert_allclose(engine.table.forecast[engine.table.slot_of("a")].numpy(), got[-1], rtol=2e-6)


@pytest.mark.parametrize("host_views", [True, False])
def test_log_scaling_moves_the_season_by_ratios_and_refuses_values_that_are_not_positive(
    host_views: bool,
) -> None:
    """Exponential growth with a seasonal swing proportional to the level: on logarithms the level-moved
    seasonal naive forecast is exact."""
    model = _model("gru", season=12, base_seasons=1, base_level=True, horizon=12)  # zero head: the baseline
    t = np.arange(100, dtype=np.float64)
    values = 50.0 * np.exp(0.02 * t + 0.2 * np.sin(2 * np.pi * t / 12))
    engine = Engine(model, window=64, scaling=Scaling("log", halflife=8.0), host_views=host_views)
    got = np.stack(
        [engine.process(["a"], [int(k)], [v]).forecasts[0] for k, v in zip(t, values, strict=True)]
    )
    future = np.stack([values[k + 1 : k + 13] for k in range(24, 80)])
    np.testing.assert_allclose(got[24:80], future, rtol=1e-5)
    np.testing.assert_allclose(
        reference_forecast(model, values, Scaling("log", halflife=8.0))[24:80], future, rtol=1e-5
    )
    before = engine.table.snapshot("a")
    with pytest.raises(ValueError, match="> 0"):
        engine.process(["a", "b"], [200, 200], [3.0, 0.0])
    assert engine.table.snapshot("a") == before and engine.table.slot_of("b") is None


@pytest.mark.parametrize("host_views", [True, False])
def test_a_window_shorter_than_the_baseline_leaves_out_what_it_no_longer_retains(host_views: bool) -> None:
    """The trainer never picks such a baseline and the service refuses one; a library user gets the
    baseline over what the window retains, not values that were overwritten."""
    model = _residual_model("gru")  # reads 3 inputs before the current one
    window, values = 3, np.random.default_rng(2).normal(4.0, 1.0, 12)
    engine = Engine(model, window=window, scaling=SCALINGS["ewm"], host_views=host_views)
    got = np.stack([engine.process(["a"], [t], [v]).forecasts[0] for t, v in enumerate(values)])
    scaling = SCALINGS["ewm"]
    x, stats = scaling.transform(values)
    v = torch.from_numpy(values)
    with torch.no_grad():
        base = model.scaled_baseline(v[None], stats[None], scaling, 0, len(values))  # (1, T, H) whole history
        y, _ = model(x[None, :, None], base=base)  # (1, T, H)
        kept = torch.stack(
            [
                torch.cat(
                    [
                        torch.full((max(0, window - t - 1),), torch.nan, dtype=v.dtype),
                        v[max(0, t - window + 1) : t + 1],
                    ]
                )
                for t in range(len(values))
            ]
        )  # (T, window) what the ring holds after value t
        y = y[0] - base[0] + model.baseline(scaling.rescale(stats, kept))
    expected = scaling.denormalize(stats, y.double()).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert (
        np.abs(got[window + 1 :] - reference_forecast(model, values, SCALINGS["ewm"])[window + 1 :]).max()
        > 1e-3
    )


def _check_incremental_equals_full(engine, model, data, batches, scaling) -> None:
    got = _run(engine, batches)
    assert engine.duplicates_total == 0
    assert set(got) == set(data)
    for s, (ts, values) in data.items():
        assert [t for t, _ in got[s]] == ts.tolist()  # every value stepped once, in ts order
        expected = reference_forecast(model, values, scaling)
        np.testing.assert_allclose(np.stack([f for _, f in got[s]]), expected, atol=1e-5, rtol=0)


def _expected_kept(batches):
    """Oracle for duplicates: per batch and series, values in ts order newer than everything before."""
    last: dict[str, int] = {}
    kept: dict[str, list] = {}
    dropped = 0
    for batch in batches:
        fresh: dict[str, int] = {}
        for s, t, v in sorted(batch, key=lambda e: (e[0], e[1])):  # stable: first given of a ts wins
            if t <= last.get(s, -(2**63)) or t <= fresh.get(s, -(2**63)):
                dropped += 1
                continue
            fresh[s] = t
            kept.setdefault(s, []).append((t, v))
        last.update(fresh)
    return kept, dropped


@settings(max_examples=15, deadline=None)
@given(stream=streams(max_series=3, max_len=10), seed=st.integers(0, 1000))
def test_duplicates_and_out_of_order_values_are_counted_never_stepped(stream, seed: int) -> None:
    _, batches = stream
    rng = np.random.default_rng(seed)
    noisy = []
    seen = []
    for batch in batches:
        batch = list(batch)
        for _ in range(int(rng.integers(0, 3))):  # replays of earlier rows, with other values
            if seen:
                s, t, _v = seen[rng.integers(len(seen))]
                batch.insert(int(rng.integers(len(batch) + 1)), (s, t, float(rng.normal())))
        seen.extend(batch)
        noisy.append(batch)
    model = _model("gru")
    engine = Engine(model, window=4, scaling=None)
    got = _run(engine, noisy)
    kept, dropped = _expected_kept(noisy)
    assert engine.duplicates_total == dropped
    for s, rows in kept.items():
        assert [t for t, _ in got[s]] == [t for t, _ in rows]
        expected = reference_forecast(model, [v for _, v in rows], None)
        np.testing.assert_allclose(np.stack([f for _, f in got[s]]), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("host_views", [True, False])
def test_a_glitch_does_not_ruin_its_series(host_views: bool) -> None:
    """1e29 among values near 5: counted in the one-step error as it came, stepped as a value 100 scales
    out; forecasts stay in the series' range (without the clip they stayed near -1e26 for good)."""
    rng = np.random.default_rng(4)
    values = np.concatenate([5.0 + rng.normal(size=300), [1e29], 5.0 + rng.normal(size=40)])
    ts = np.arange(len(values))
    out = {}
    for clip in (100.0, 0.0):
        engine = Engine(_model(), window=16, scaling=Scaling(halflife=64.0, clip=clip), host_views=host_views)
        with np.errstate(over="ignore"):  # without the clip the intervals overflow float32
            first = engine.process(["a"] * 300, ts[:300], values[:300])
            glitch = engine.process(["a"], ts[300:301], values[300:301])
            rest = engine.process(["a"] * 40, ts[301:], values[301:])
        assert first.clipped == rest.clipped == 0 and glitch.clipped == engine.clipped_total == (clip > 0)
        assert engine.errors["init"].mae > 1e26  # the error saw the value as it came
        out[clip] = rest.forecasts
    assert np.isfinite(out[100.0]).all() and np.abs(out[100.0] - 5.0).max() < 50.0
    assert np.abs(out[0.0]).min() > 1e20
    np.testing.assert_allclose(
        out[100.0], reference_forecast(_model(), values, Scaling(halflife=64.0))[301:], rtol=1e-4, atol=1e-4
    )


def test_duplicates_within_and_across_calls() -> None:
    engine = Engine(_model(), scaling=None)
    out = engine.process(["a", "a", "a", "b"], [5, 5, 3, 1], [1.0, 2.0, 3.0, 4.0])
    assert out.duplicates == 1 and sorted(out.index.tolist()) == [0, 2, 3]
    out = engine.process(["a", "a", "b"], [5, 4, 2], [1.0, 1.0, 1.0])
    assert out.duplicates == 2 and out.series == ["b"]
    assert engine.duplicates_total == 3 and engine.values_total == 4


def test_non_finite_values_are_refused_before_any_change() -> None:
    engine = Engine(_model(), scaling=None)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="finite"):
            engine.process(["a", "b"], [1, 1], [1.0, bad])
    for bad in (1e300, -2e30):  # finite, but a series' scale would overflow float32 for good
        with pytest.raises(ValueError, match="within"):
            engine.process(["a", "b"], [1, 1], [1.0, bad])
    assert engine.resident == 0
    assert np.isfinite(engine.process(["a"], [1], [-1e30]).forecasts).all()  # the bound itself is served
    with pytest.raises(ValueError, match="length"):
        engine.process(["a"], [1, 2], [1.0])
    assert len(engine.process([], [], [])) == 0


@pytest.mark.parametrize("cell", CELLS)
def test_evict_snapshot_restore_continues_exactly(cell: str) -> None:
    rng = np.random.default_rng(3)
    values = {s: rng.normal(size=20) for s in ("a", "b", "c")}
    model = _model(cell)

    def feed(engine, lo, hi):
        outs = []
        for t in range(lo, hi):
            out = engine.process(list(values), [t] * 3, [values[s][t] for s in values])
            outs.append(out.forecasts)
        return np.concatenate(outs)

    straight = Engine(model, window=8)
    expected = feed(straight, 0, 20)
    clock = Clock()
    saved: dict[str, bytes] = {}
    first = Engine(model, window=8, clock=clock, ttl_seconds=10.0, on_evict=saved.__setitem__)
    head = feed(first, 0, 12)
    clock.now = 100.0
    assert sorted(first.evict_idle()) == ["a", "b", "c"] and first.evictions_total == 3
    second = Engine(model, window=8, capacity=1)
    for s, data in saved.items():
        second.restore(s, data)
    tail = feed(second, 12, 20)
    assert np.array_equal(np.concatenate([head, tail]), expected)


def test_growth_past_initial_capacity_loses_nothing() -> None:
    rng = np.random.default_rng(4)
    model = _model()
    engine = Engine(model, window=4, capacity=1)
    series = [f"s{i}" for i in range(40)]
    values = rng.normal(size=(40, 6))
    outs = [engine.process(series, [t] * 40, values[:, t]) for t in range(6)]
    assert engine.table.capacity >= 40 and engine.resident == 40
    for i, s in enumerate(series):
        got = np.stack([out.forecasts[out.series.index(s)] for out in outs])
        np.testing.assert_allclose(got, reference_forecast(model, values[i]), atol=1e-5, rtol=0)


def test_lru_and_ttl_eviction_through_the_engine() -> None:
    clock = Clock()
    evicted: list[str] = []
    engine = Engine(
        _model(), max_series=2, ttl_seconds=5.0, clock=clock, on_evict=lambda s, _: evicted.append(s)
    )
    for t, s in enumerate(["a", "b", "a", "c"]):
        clock.now = float(t)
        engine.process([s], [t], [1.0])
    assert evicted == ["b"] and engine.resident == 2
    clock.now = 7.5  # a seen at 2, c at 3
    assert engine.evict_idle() == ["a"] and engine.evictions_total == 2
    # an evicted series that comes back starts from scratch
    out = engine.process(["b"], [0], [2.0])
    assert out.duplicates == 0 and len(out) == 1


@pytest.mark.parametrize("host_views", [True, False])
def test_online_error_matches_a_hand_computation(host_views: bool) -> None:
    engine = Engine(_model(), version="v1", scaling=None, host_views=host_views)
    a, b = [1.0, 2.0, 4.0], [0.5, -1.0]
    out1 = engine.process(["a", "b", "a"], [1, 1, 2], [a[0], b[0], a[1]])  # rounds: (a0, b0), (a1)
    out2 = engine.process(["a", "b"], [3, 2], [a[2], b[1]])
    forecast = {
        (s, int(t)): f
        for out in (out1, out2)
        for s, t, f in zip(out.series, out.ts, out.forecasts, strict=True)
    }
    errors = [a[1] - forecast["a", 1][0], a[2] - forecast["a", 2][0], b[1] - forecast["b", 1][0]]
    stats = engine.errors["v1"]
    assert stats.count == 3
    assert stats.sum_abs == pytest.approx(sum(abs(e) for e in errors), rel=1e-6)
    assert stats.sum_sq == pytest.approx(sum(e * e for e in errors), rel=1e-6)
    engine.set_model(_model(seed=9), "v2")
    out3 = engine.process(["b"], [3], [7.0])
    assert out3.version == "v2"
    assert engine.errors["v2"].count == 1
    assert engine.errors["v2"].sum_abs == pytest.approx(abs(7.0 - float(out2.forecasts[1][0])), rel=1e-6)
    assert engine.errors["v1"].count == 3


@pytest.mark.parametrize("host_views", [True, False])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rewarm_equals_the_new_models_forward_over_the_retained_window(
    cell: str, scaling: str, host_views: bool
) -> None:
    window = 6
    rng = np.random.default_rng(5)
    lengths = {"short": 3, "exact": 6, "long": 15}
    values = {s: rng.normal(size=n) + 2 for s, n in lengths.items()}
    engine = Engine(_model(cell, seed=1), window=window, scaling=SCALINGS[scaling], host_views=host_views)
    for s, v in values.items():
        engine.process([s] * len(v), list(range(len(v))), v)
    new = _model(cell, seed=2)
    engine.rewarm(new, "v2")
    sc = SCALINGS[scaling] or Scaling(kind="none")
    for s, v in values.items():
        x, stats = sc.transform(v)
        y_ref, h_ref = new(x[-window:][None, :, None])  # the new model from zero over the last W inputs
        slot = engine.table.slots[s]
        h = engine.table.h[:, slot]
        h_expected = h_ref[0][:, 0] if cell == "lstm" else h_ref[:, 0]
        torch.testing.assert_close(h, h_expected, atol=1e-6, rtol=0)
        if cell == "lstm":
            torch.testing.assert_close(engine.table.c[:, slot], h_ref[1][:, 0], atol=1e-6, rtol=0)
        forecast = sc.denormalize(stats[-1:], y_ref[0, -1:].double())[0]
        torch.testing.assert_close(engine.table.forecast[slot].double(), forecast, atol=1e-5, rtol=0)
    out = engine.process(["short"], [100], [1.0])
    assert out.version == "v2"


def test_rewarm_to_a_different_shape_and_set_model_refuses_one() -> None:
    engine = Engine(_model("gru"), window=4, scaling=None)
    engine.process(["a", "a"], [1, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="shape"):
        engine.set_model(_model("lstm"), "v2")
    bigger = _model("lstm", hidden_size=16, horizon=5)
    engine.rewarm(bigger, "v2")
    out = engine.process(["a"], [3], [3.0])
    np.testing.assert_allclose(
        out.forecasts[0], reference_forecast(bigger, [1.0, 2.0, 3.0], None)[-1], atol=1e-5
    )


def test_restore_of_another_versions_snapshot_is_rewarmed() -> None:
    old, new = _model(seed=1), _model(seed=2)
    source = Engine(old, version="v1", window=8, scaling=None)
    values = [0.5, 1.5, -0.5, 2.0]
    source.process(["a"] * 4, [1, 2, 3, 4], values)
    target = Engine(new, version="v2", window=8, scaling=None)
    target.restore("a", source.snapshot("a"))
    out = target.process(["a"], [5], [1.0])
    np.testing.assert_allclose(out.forecasts[0], reference_forecast(new, values + [1.0], None)[-1], atol=1e-5)
    with pytest.raises(StateError):
        target.restore("b", b"not a snapshot")


def test_take_dirty_lists_stepped_series() -> None:
    engine = Engine(_model())
    engine.process(["a", "b"], [1, 1], [1.0, 2.0])
    assert engine.take_dirty() == {"a", "b"}
    engine.process(["a", "b"], [2, 1], [1.0, 2.0])  # b's value is a duplicate
    assert engine.take_dirty() == {"a"}


def test_from_settings_uses_the_state_and_scaling_sections() -> None:
    from forecaster.config import Settings

    settings = Settings(
        state={"device": "cpu", "window": 7, "initial_capacity": 3, "max_series": 5, "ttl_seconds": 9.0},
        scaling={"kind": "none"},
    )
    engine = Engine.from_settings(_model(), settings, version="v3")
    assert engine.table.window_size == 7 and engine.table.capacity == 3 and engine.table.max_series == 5
    assert engine.ttl_seconds == 9.0 and engine.scaling == Scaling(kind="none") and engine.version == "v3"


def test_more_new_series_than_max_series_in_one_batch_still_steps_all() -> None:
    engine = Engine(_model(), max_series=2, scaling=None)
    out = engine.process(["a", "b", "c"], [1, 1, 1], [1.0, 2.0, 3.0])
    assert len(out) == 3 and engine.resident == 3  # a batch's own series are never evicted mid-batch
    engine.process(["d"], [1], [1.0])
    assert engine.resident == 2 and engine.evictions_total == 2


def test_accepts_arrays_and_pandas_columns() -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {"series": ["b", "a", "b"], "ts": [2, 1, 1], "value": [1.0, 2.0, 3.0]}, index=[7, 3, 5]
    )
    out = Engine(_model(), scaling=None).process(frame["series"], frame["ts"], frame["value"])
    assert sorted(zip(out.series, out.ts.tolist(), strict=True)) == [("a", 1), ("b", 1), ("b", 2)]
    out = Engine(_model(), scaling=None).process(np.array(["x", "y"]), np.array([1, 1]), np.array([0.5, 0.5]))
    assert out.series == ["x", "y"] and out.index.tolist() == [0, 1]
