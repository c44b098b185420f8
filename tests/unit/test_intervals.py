"""Prediction intervals: the calibrator's arithmetic, parity with the per-series reference whatever the
batching, snapshots, re-warm, the off switch, and coverage on a stationary series."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecaster.config import Settings
from forecaster.engine.engine import Engine
from forecaster.engine.intervals import WARMUP, Intervals, reference_intervals
from forecaster.errors import StateError
from forecaster.model import RecurrentForecaster
from forecaster.records import Bounds, encode_forecast_groups, encode_forecasts
from forecaster.scaling import Scaling


def model(horizon: int = 3, seed: int = 0, **baseline: int) -> RecurrentForecaster:
    torch.manual_seed(seed)
    return RecurrentForecaster("gru", hidden_size=8, num_layers=1, horizon=horizon, **baseline)


def test_update_and_bounds_match_hand_computed_values() -> None:
    iv = Intervals(levels=(80.0, 95.0), learning_rate=0.1, halflife=64.0)
    prior = iv.prior  # z * sqrt(pi / 2)
    assert prior == pytest.approx([1.2815516 * 1.2533141, 1.9599640 * 1.2533141], rel=1e-6)
    score = np.array([[0.5, 2.0]], np.float32)  # step 1 inside both, step 2 outside the 80% one only
    valid = np.array([[True, True]])
    start = np.repeat(prior.astype(np.float32)[None, :, None], 2, axis=2)  # (1, L, H)
    mean, mult, inside, half = iv.update(score, valid, np.array([[1, 3]]), np.ones((1, 2), np.float32), start)
    assert inside.tolist() == [[[True, False], [True, True]]]  # (n, L, H)
    np.testing.assert_allclose(half[0], start[0], rtol=1e-6)  # mean error 1: the multipliers
    # miss: + lr * (1 - alpha); inside: - lr * alpha
    assert mult[0, :, 0] == pytest.approx(prior - 0.1 * np.array([0.2, 0.05]), rel=1e-6)
    assert mult[0, :, 1] == pytest.approx(prior + 0.1 * np.array([0.8, -0.05]), rel=1e-6)
    assert mean[0] == pytest.approx([0.5, 1.0 + (2.0 - 1.0) / 3])  # cumulative mean while n < halflife
    none_scored = iv.update(score, np.zeros((1, 2), bool), np.array([[0, 0]]), mean, mult)
    np.testing.assert_array_equal(none_scored[0], mean)
    np.testing.assert_array_equal(none_scored[1], mult)
    center = np.array([[10.0, 20.0]], np.float32)
    lower, upper = iv.bounds(center, np.array([2.0], np.float32), np.array([[1.0, 0.5]], np.float32), mult)
    assert upper[0, 0, 0] == pytest.approx(10.0 + 2.0 * mult[0, 0, 0], rel=1e-6)
    assert lower[0, 1, 1] == pytest.approx(20.0 - 2.0 * 0.5 * mult[0, 1, 1], rel=1e-6)
    log_lower, log_upper = iv.bounds(
        np.log(center), np.array([0.1], np.float32), np.ones((1, 2), np.float32), mult, Scaling(kind="log")
    )
    assert log_lower[0, 0, 0] * log_upper[0, 0, 0] == pytest.approx(100.0, rel=1e-5)  # symmetric in ratios


def run_stream(engine: Engine, rows: list[tuple[str, int, float]], rng: np.random.Generator) -> dict:
    """Feed ``rows`` in random batch sizes; collect each series' forecasts and bounds in time order."""
    got: dict[str, list] = {}
    i = 0
    while i < len(rows):
        n = int(rng.integers(1, 9))
        batch = rows[i : i + n]
        i += n
        out = engine.process([r[0] for r in batch], [r[1] for r in batch], [r[2] for r in batch])
        for j, name in enumerate(out.series):
            got.setdefault(name, []).append((out.ts[j], out.forecasts[j], out.lower[j], out.upper[j]))
    return {name: sorted(items, key=lambda x: x[0]) for name, items in got.items()}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["ewm", "log", "none"]),
    host_views=st.sampled_from([None, False]),
)
def test_engine_intervals_equal_the_per_series_reference_whatever_the_batching(
    seed: int, kind: str, host_views: bool | None
) -> None:
    rng = np.random.default_rng(seed)
    iv = Intervals()
    scaling = Scaling(kind=kind, halflife=16.0)
    engine = Engine(model(), window=8, scaling=scaling, host_views=host_views, intervals=iv)
    values = {s: rng.lognormal(size=int(rng.integers(5, 40))) for s in "abcd"}
    values["a"][rng.integers(len(values["a"])) :] *= 1e8  # a glitch or a shift: values moved by the clip
    starts = {s: int(rng.integers(0, 20)) for s in values}  # series arrive mid-stream
    rows = [(s, starts[s] + t, float(v)) for s, vs in values.items() for t, v in enumerate(vs)]
    rows.sort(key=lambda r: (r[1], rng.random()))  # event-time order, series interleaved at random
    got = run_stream(engine, rows, rng)
    for s, vs in values.items():
        forecasts = np.array([g[1] for g in got[s]])
        lower, upper = reference_intervals(forecasts, vs, iv, scaling)
        # float32 steps in another order than the reference's: equal to rounding. Log scaling's bounds are
        # exp of a float32 log-space bound, whose rounding (eps ~6e-8 times a log value up to ~88 near
        # float32's largest) becomes a relative error of up to ~5e-6 per operation: 1e-4 there.
        rtol = 1e-4 if kind == "log" else 1e-5
        np.testing.assert_allclose(np.array([g[2] for g in got[s]]), lower, rtol=rtol, atol=1e-5)
        np.testing.assert_allclose(np.array([g[3] for g in got[s]]), upper, rtol=rtol, atol=1e-5)


def test_intervals_cover_a_stationary_series_and_are_scale_free() -> None:
    rng = np.random.default_rng(1)
    engine = Engine(model(horizon=4), window=16, scaling=Scaling(kind="none"))
    values = 5.0 + rng.normal(size=3000)
    out = engine.process(["a"] * len(values), np.arange(len(values)), values)
    # coverage of the emitted intervals after a warm-up of 500 values
    lower, upper = out.lower[500:-4], out.upper[500:-4]
    for k in (0, 3):
        y = values[501 + k : len(values) - 3 + k]
        inside = (lower[:, :, k] <= y[:, None]) & (y[:, None] <= upper[:, :, k])
        assert inside.mean(0) == pytest.approx([0.80, 0.95], abs=0.03)
    cov = engine.coverage["init"]
    assert cov.steps == [1, 4] and cov.levels == ["80", "95"]
    assert cov.count.tolist() == [len(values) - WARMUP, len(values) - WARMUP - 3]
    # scale-free: the same series in other units gets the same intervals in those units
    scaled = Engine(model(horizon=4), window=16, scaling=Scaling(halflife=32.0))
    base = Engine(model(horizon=4), window=16, scaling=Scaling(halflife=32.0))
    small = base.process(["a"] * 300, np.arange(300), values[:300])
    large = scaled.process(["a"] * 300, np.arange(300), 1000.0 * values[:300])
    np.testing.assert_allclose(large.upper - large.lower, 1000.0 * (small.upper - small.lower), rtol=1e-4)


def test_snapshot_restores_the_calibrator_exactly_and_refuses_format_2() -> None:
    rng = np.random.default_rng(2)
    values = rng.normal(size=40)
    a, b = Engine(model(), window=8), Engine(model(), window=8)
    a.process(["s"] * 30, np.arange(30), values[:30])
    data = a.snapshot("s")
    b.restore("s", data)
    rest_a = a.process(["s"] * 10, np.arange(30, 40), values[30:])
    rest_b = b.process(["s"] * 10, np.arange(30, 40), values[30:])
    np.testing.assert_array_equal(rest_a.lower, rest_b.lower)
    np.testing.assert_array_equal(rest_a.upper, rest_b.upper)
    body = bytearray(data[:-4])
    body[7:9] = (2).to_bytes(2, "little")  # the format before the calibrator, with a valid checksum
    with pytest.raises(StateError, match="format version 2"):
        b.restore("t", bytes(body) + zlib.crc32(body).to_bytes(4, "little"))
    off = Engine(model(), window=8, intervals=None)
    with pytest.raises(StateError, match="shape"):  # a table without intervals is another shape
        off.restore("s", data)


@pytest.mark.parametrize("kind", ["ewm", "log", "none"])
@pytest.mark.parametrize("host_views", [None, False])
def test_rewarm_replays_the_window_through_the_new_model_and_the_calibrator(
    kind: str, host_views: bool | None
) -> None:
    """A re-warm over windows that hold the whole history gives the calibrator the new model's engine
    would hold had it served those series from the start, and the same intervals from then on."""
    rng = np.random.default_rng(3)
    values = rng.lognormal(size=(3, 30)).astype(np.float32).astype(np.float64)  # as the ring keeps them
    values[0, 20] = 1e20  # a glitch, moved by the clip: the re-warm rewinds the value as it was stepped
    lengths = [30, 12, 2]
    options = dict(window=32, scaling=Scaling(kind=kind, halflife=16.0), host_views=host_views)
    new = Engine(model(seed=1, season=4, base_seasons=2), version="v2", **options)
    swapped = Engine(model(seed=2, season=4, base_seasons=2), **options)
    for i, n in enumerate(lengths):
        for engine in (new, swapped):
            engine.process([f"s{i}"] * n, np.arange(n), values[i, :n])
    swapped.rewarm(model(seed=1, season=4, base_seasons=2), "v2")
    a, b = new.table, swapped.table
    for name in ("mean_err", "mult", "past", "past_scale", "past_half"):
        np.testing.assert_allclose(
            getattr(a, name)[[a.slots[f"s{i}"] for i in range(3)]].numpy(),
            getattr(b, name)[[b.slots[f"s{i}"] for i in range(3)]].numpy(),
            rtol=1e-5,
            atol=1e-6,
            err_msg=name,
        )
    nxt = rng.lognormal(size=9)
    names, ts = ["s0", "s1", "s2"] * 3, np.repeat([40, 41, 42], 3)
    before = new.coverage["v2"].count
    out_new, out_swapped = new.process(names, ts, nxt), swapped.process(names, ts, nxt)
    np.testing.assert_allclose(out_swapped.lower, out_new.lower, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out_swapped.upper, out_new.upper, rtol=1e-4, atol=1e-5)
    # h1: 3 + 3 + 1 (s2's first forecasts are warm-up); h3: 3 + 3 + 0
    assert swapped.coverage["v2"].count.tolist() == (new.coverage["v2"].count - before).tolist() == [7, 6]


def test_background_swap_scores_only_the_new_models_forecasts() -> None:
    from forecaster.engine.rewarm import RewarmJob

    engine = Engine(model(), window=8)
    engine.process(["s"] * 12, np.arange(12), np.linspace(0.0, 1.0, 12))
    job = RewarmJob(model(seed=3), "v2", engine)
    assert job.wait(30.0)
    assert job.at_boundary(engine) == {"caught_up": 1, "rewarmed": 0, "copies": 1, "passes": 0}
    assert engine.table.score_from[engine.table.slots["s"]] == 11  # its last (re-warmed) forecast on
    engine.process(["s"] * 2, [12, 13], [1.1, 1.2])
    assert engine.coverage["v2"].count.tolist() == [2, 0]  # h1 of the two new values; h3 needs three


def test_intervals_off() -> None:
    settings_off = Settings(intervals={"enabled": False})
    engine = Engine.from_settings(model(), settings_off)
    out = engine.process(["a", "a"], [1, 2], [1.0, 2.0])
    assert out.lower is None and out.upper is None and engine.coverage == {}
    on = Engine.from_settings(model(), Settings(intervals={"levels": [95, 50]}))
    assert on.intervals.labels == ["50", "95"]
    # per series: centres H x H, scales H, spreads H, multipliers L x H, emitted half-widths H x L x H, int64
    assert on.table.state_bytes - engine.table.state_bytes == 1024 * (
        4 * (3 * 3 + 2 * 3 + 3 * 2 + 3 * 2 * 3) + 8
    )
    with pytest.raises(ValueError):
        Settings(intervals={"levels": [80, 100]})


@pytest.mark.parametrize("host_views", [None, False])
def test_a_new_series_first_forecasts_have_no_bounds(host_views: bool | None) -> None:
    """The first forecast's scale is the floor (a thousandth of the level): its bounds were +-0.1 % wide.
    The first WARMUP - 1 forecasts carry none (NaN, written as null); the next ones do, in one call or
    value by value alike."""
    values = [100.0, 104.0, 97.0, 101.0, 99.0, 103.0]
    whole = Engine(model(), window=8, host_views=host_views).process(["s"] * 6, np.arange(6), values)
    single = Engine(model(), window=8, host_views=host_views)
    parts = [single.process(["s"], [t], [v]) for t, v in enumerate(values)]
    for lower, upper in ((whole.lower, whole.upper), (np.concatenate([p.lower for p in parts]), None)):
        assert np.isnan(lower[: WARMUP - 1]).all() and np.isfinite(lower[WARMUP - 1 :]).all()
        assert upper is None or (np.isnan(upper[: WARMUP - 1]).all() and (upper[3:] > lower[3:]).all())
    record = json.loads(
        encode_forecasts(
            ["s"],
            np.array([0]),
            "v1",
            whole.forecasts[:1],
            np.array([0]),
            np.array([0]),
            np.array([-1]),
            intervals=Bounds(["80", "95"], whole.lower[:1], whole.upper[:1]),
        )[0]
    )
    assert record["lower"] == {"80": [None] * 3, "95": [None] * 3} and None not in record["forecast"]


def test_forecast_records_carry_the_bounds_in_both_layouts() -> None:
    lower = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    bounds = Bounds(["80", "95"], lower, lower + 100.0)
    forecasts = np.ones((2, 3), np.float32)
    args = (
        ["a", "a"],
        np.array([1, 2]),
        "v1",
        forecasts,
        np.array([0, 0]),
        np.array([7, 7]),
        np.array([0, 1]),
    )
    one = [json.loads(r) for r in encode_forecasts(*args, intervals=bounds)]
    assert one[1]["lower"] == {"80": [6.0, 7.0, 8.0], "95": [9.0, 10.0, 11.0]}
    assert one[0]["upper"]["95"] == [103.0, 104.0, 105.0] and one[0]["forecast"] == [1.0, 1.0, 1.0]
    assert "lower" not in json.loads(encode_forecasts(*args)[0])
    _, grouped = encode_forecast_groups(*args, np.array([0, 0]), intervals=bounds)
    record = json.loads(grouped[0])
    assert record["lower"]["80"] == [[0.0, 1.0, 2.0], [6.0, 7.0, 8.0]]
    assert record["upper"]["95"][1] == [109.0, 110.0, 111.0]


def test_trainer_evaluation_scores_the_intervals_the_service_would_emit() -> None:
    from forecaster.train.evaluation import evaluate, model_forecasts

    rng = np.random.default_rng(4)
    values = [10.0 + np.sin(np.arange(200) / 3.0) + 0.3 * rng.normal(size=200) for _ in range(3)]
    net, scaling, iv = model(), Scaling(halflife=32.0), Intervals()
    result = evaluate({"model": (net, scaling)}, values, validation_fraction=0.25, season=19, intervals=iv)
    scores = result.intervals["model"]
    assert scores.count.tolist() == [3 * 50, 3 * 49, 3 * 48]  # origins 149..198, each target that exists
    # the same as scoring reference_intervals of the same forecasts by hand
    forecasts = model_forecasts(net, scaling, values)
    inside = 0
    for f, v in zip(forecasts, values, strict=True):
        lower, upper = reference_intervals(f.astype(np.float32), v, iv, scaling)
        inside += int(((lower[149:199, 0, 0] <= v[150:]) & (v[150:] <= upper[149:199, 0, 0])).sum())
    assert scores.inside[0, 0] == inside
    assert set(result.summary()["intervals"]["model"]) == {"80", "95"}


def test_coverage_counters_follow_the_engine() -> None:
    from prometheus_client import CollectorRegistry

    from forecaster.metrics.coverage import IntervalCoverage

    registry = CollectorRegistry()
    counters = IntervalCoverage(registry)
    engine = Engine(model(), window=8, scaling=Scaling(kind="none"))
    values = np.random.default_rng(5).normal(size=60)
    engine.process(["a"] * 30, np.arange(30), values[:30])
    counters.update(engine.coverage)
    engine.process(["a"] * 30, np.arange(30, 60), values[30:])
    counters.update(engine.coverage)
    stats = engine.coverage["init"]

    def sample(name: str, level: str, step: str) -> float | None:
        labels = {"model_version": "init", "level": level, "step": step}
        return registry.get_sample_value(f"forecaster_interval_{name}_total", labels)

    assert sample("scored", "80", "h1") == 60 - WARMUP and sample("scored", "95", "h3") == 60 - WARMUP - 2
    assert sample("inside", "95", "h3") == stats.inside[1, 1]
    assert sample("width", "80", "h1") == pytest.approx(stats.width[0, 0])
    assert stats.inside[0, 0] <= stats.inside[1, 0] <= stats.count[0]  # the 95% interval holds the 80% one
    counters.update(Engine(model(), window=8).coverage)  # a new engine: totals go on from where they were
    assert sample("scored", "80", "h1") == 60 - WARMUP


@pytest.mark.parametrize("kind", ["ewm", "log"])
def test_host_and_device_style_tables_agree_on_bounds_and_coverage(kind: str) -> None:
    # the host table runs the compiled loop (forecaster.engine.fused), the torch-indexed one the tensor
    # arithmetic: same bounds, same coverage counts, same width sums; and the counts are those of the
    # emitted bounds, scored by hand
    rng = np.random.default_rng(11)
    names = [f"s{i}" for i in range(7)]
    values = rng.lognormal(size=(50, len(names)))
    engines = {
        hv: Engine(model(), window=8, scaling=Scaling(kind=kind), host_views=hv) for hv in (None, False)
    }
    outs: dict[bool | None, list] = {hv: [] for hv in engines}
    for t in range(50):
        live = [i for i in range(len(names)) if t >= 3 * i]  # series join at different times
        for hv, engine in engines.items():
            out = engine.process([names[i] for i in live], np.full(len(live), t), values[t, live])
            outs[hv].append(out)
    for a, b in zip(outs[None], outs[False], strict=True):
        np.testing.assert_allclose(a.lower, b.lower, rtol=1e-5, equal_nan=True)
        np.testing.assert_allclose(a.upper, b.upper, rtol=1e-5, equal_nan=True)
    host, device = engines[None].coverage["init"], engines[False].coverage["init"]
    assert host.count.tolist() == device.count.tolist() and host.count[0] > 0
    np.testing.assert_array_equal(host.inside, device.inside)
    np.testing.assert_allclose(host.width, device.width, rtol=1e-5)
    # by hand: a value within the level-80 bounds its series' 1-step forecast was emitted with
    inside = scored = 0
    for t in range(1, 50):
        prev = {n: j for j, n in enumerate(outs[None][t - 1].series)}
        for name in outs[None][t].series:
            if name in prev and np.isfinite(outs[None][t - 1].lower[prev[name], 0, 0]):
                v = values[t, names.index(name)]
                scored += 1
                lo, hi = outs[None][t - 1].lower[prev[name], 0, 0], outs[None][t - 1].upper[prev[name], 0, 0]
                inside += bool(lo * (1 - 1e-6) <= v <= hi * (1 + 1e-6))
    assert host.count[0] == scored and host.inside[0, 0] == inside


def test_background_swap_to_another_horizon_restarts_the_calibrator() -> None:
    from forecaster.engine.rewarm import RewarmJob

    engine = Engine(model(horizon=3), window=8)
    engine.process(["s"] * 12, np.arange(12), np.linspace(0.0, 1.0, 12))
    job = RewarmJob(model(horizon=5, seed=3), "v2", engine)
    assert job.wait(30.0)
    job.at_boundary(engine)
    out = engine.process(["s"] * 6, np.arange(12, 18), np.linspace(1.0, 2.0, 6))
    assert out.lower.shape == (6, 2, 5) and (out.lower <= out.forecasts[:, None]).all()
    assert engine.coverage["v2"].steps == [1, 5]
    assert engine.coverage["v2"].count.tolist() == [6, 2]  # from the re-warmed forecast (ordinal 11) on


def test_the_compiled_loops_need_no_writable_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # numba refuses cache=True where it finds nowhere writable (a read-only install, no home folder)
    import numba

    from forecaster.engine import fused

    njit = numba.njit

    def refusing(*args: object, cache: bool = False, **kwargs: object) -> object:
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'f.py'")
        return njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", refusing)

    def twice(x: int) -> int:
        return 2 * x

    assert fused._compiled(twice)(21) == 42
