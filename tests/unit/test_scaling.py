"""Scaling: causal, equal to its own stepwise update, hand-checked statistics, safe on flat series."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from forecaster.config import ScalingSettings
from forecaster.scaling import Scaling

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


def test_first_values_are_a_cumulative_mean_and_variance() -> None:
    x, stats = Scaling(halflife=1e9).transform(np.array([1.0, 2.0, 3.0]))
    assert stats[-1, 0] == 3
    assert stats[-1, 1] == pytest.approx(2.0)
    assert stats[-1, 2] == pytest.approx(2.0 / 3.0)  # population variance of 1, 2, 3
    assert float(x[-1]) == pytest.approx(1.0 / math.sqrt(2.0 / 3.0), rel=1e-6)
    assert float(x[0]) == 0.0  # the first value is its own mean


def test_mean_follows_an_ewm_with_the_half_life() -> None:
    values = np.random.default_rng(0).normal(size=50)
    _, stats = Scaling(halflife=1.0).transform(values)  # alpha = 0.5 from the second value on
    expected = pd.Series(values).ewm(alpha=0.5, adjust=False).mean().to_numpy()
    np.testing.assert_allclose(stats[:, 1].numpy(), expected, rtol=1e-12)


def test_variance_matches_a_hand_written_recursion() -> None:
    values = [3.0, -1.0, 4.0, 1.5]
    alpha_long = 1 - 0.5 ** (1 / 2.0)
    mean = var = 0.0
    for n, v in enumerate(values, start=1):
        a = max(1 / n, alpha_long)
        d = v - mean
        mean += a * d
        var = (1 - a) * (var + a * d * d)
    _, stats = Scaling(halflife=2.0).transform(np.array(values))
    assert stats[-1, 1] == pytest.approx(mean, rel=1e-12)
    assert stats[-1, 2] == pytest.approx(var, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    values=arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 30)), elements=finite),
    halflife=st.floats(0.5, 100.0),
)
def test_transform_equals_stepwise_update(values: np.ndarray, halflife: float) -> None:
    scaling = Scaling(halflife=halflife)
    x_seq, stats_seq = scaling.transform(values)
    stats = scaling.initial_stats(values.shape[0]).numpy()
    for t in range(values.shape[1]):
        v, _ = scaling.winsorize(stats, values[:, t])  # the engine's path on a CPU table
        stats = scaling.update(stats, v)
        assert np.array_equal(stats, stats_seq[:, t].numpy())
        assert np.array_equal(scaling.normalize(stats, v), x_seq[:, t].numpy())


@settings(max_examples=20, deadline=None)
@given(values=arrays(np.float64, st.integers(2, 30), elements=finite), cut=st.integers(1, 29))
def test_causal_future_values_do_not_change_the_past(values: np.ndarray, cut: int) -> None:
    cut = min(cut, len(values) - 1)
    scaling = Scaling(halflife=4.0)
    x, _ = scaling.transform(values)
    changed = values.copy()
    changed[cut:] += 100.0
    x2, _ = scaling.transform(changed)
    assert torch.equal(x[:cut], x2[:cut])


def test_flat_series_never_divides_by_zero() -> None:
    scaling = Scaling(min_scale=1e-3)
    x, stats = scaling.transform(np.full(20, 5.0))
    assert torch.isfinite(x).all() and (x == 0).all()
    assert scaling.scale(stats[-1:]).item() == pytest.approx(5e-3)  # min_scale * |mean|
    _, zero_stats = scaling.transform(np.zeros(5))
    assert scaling.scale(zero_stats[-1:]).item() == pytest.approx(1e-3)  # min_scale * 1


@settings(max_examples=20, deadline=None)
@given(values=arrays(np.float64, st.integers(1, 20), elements=finite))
def test_denormalize_inverts_normalize(values: np.ndarray) -> None:
    scaling = Scaling(halflife=3.0)
    x, stats, folded = scaling.transform_values(values)
    back = scaling.denormalize(stats, x.double()[:, None])[:, 0]
    np.testing.assert_allclose(back.numpy(), folded.numpy(), atol=1e-4 * (1 + np.abs(values).max()))
    np.testing.assert_array_equal(folded[: Scaling.MIN_CLIP_COUNT].numpy(), values[: Scaling.MIN_CLIP_COUNT])


def test_numpy_and_torch_paths_agree() -> None:
    # torch's vectorised float64 sqrt may differ from numpy's by one ulp; nothing more.
    scaling = Scaling(halflife=7.0)
    rng = np.random.default_rng(1)
    stats_np = np.zeros((6, Scaling.N_STATS))
    stats_t = scaling.initial_stats(6)
    for _ in range(10):
        v = rng.normal(size=6) * 10
        stats_np = scaling.update(stats_np, v)
        stats_t = scaling.update(stats_t, torch.from_numpy(v))
        np.testing.assert_allclose(stats_np, stats_t.numpy(), rtol=1e-13)
        x_t = scaling.normalize(stats_t, torch.from_numpy(v)).numpy()
        np.testing.assert_allclose(scaling.normalize(stats_np, v), x_t, rtol=1e-6)
        y = rng.normal(size=(6, 3)).astype(np.float32)
        f_t = scaling.denormalize(stats_t, torch.from_numpy(y)).numpy()
        np.testing.assert_allclose(scaling.denormalize(stats_np, y), f_t, rtol=1e-13)


def test_none_is_the_identity() -> None:
    scaling = Scaling(kind="none")
    values = np.array([3.0, -2.5, 100.0])
    x, stats = scaling.transform(values)
    assert np.array_equal(x.numpy(), values.astype(np.float32))
    y = torch.tensor([[1.5, 2.0]])
    assert torch.equal(scaling.denormalize(stats[:1], y), y.double())


def test_from_settings() -> None:
    scaling = Scaling.from_settings(ScalingSettings(kind="ewm", halflife=12.0, min_scale=0.01))
    assert scaling == Scaling("ewm", 12.0, 0.01, 100.0)
    assert scaling.settings == {"kind": "ewm", "halflife": 12.0, "min_scale": 0.01, "clip": 100.0}
    assert Scaling.from_settings(ScalingSettings(clip=0)).clip == 0.0
    with pytest.raises(ValueError, match="clip"):
        Scaling(clip=-1.0)
    with pytest.raises(ValueError):
        Scaling(kind="zscore")


def test_log_kind_scales_the_logarithm_and_forecasts_by_exp() -> None:
    values = np.array([3.0, 6.0, 12.0, 24.0, 48.0])
    log, ewm = Scaling("log", halflife=4.0), Scaling("ewm", halflife=4.0)
    x, stats = log.transform(values)
    x_ref, stats_ref = ewm.transform(np.log(values))
    torch.testing.assert_close(x, x_ref)
    torch.testing.assert_close(stats, stats_ref)
    back = log.denormalize(stats, x[:, None])  # the input itself, back in data units
    np.testing.assert_allclose(back[:, 0].numpy(), values, rtol=1e-6)
    # an earlier value in the units of the current input, as a baseline reads it
    np.testing.assert_allclose(
        log.rescale(stats[-1:], torch.tensor([[values[0]]], dtype=torch.float64)).numpy(),
        ewm.rescale(stats_ref[-1:], torch.tensor([[math.log(values[0])]], dtype=torch.float64)).numpy(),
        rtol=1e-6,
    )
    assert log.positive and not ewm.positive and not Scaling("none").positive
    assert math.isfinite(float(log.denormalize(stats[-1:], torch.full((1, 1), 1e6))[0, 0]))  # capped, not inf
    assert Scaling.from_settings(ScalingSettings(kind="log")) == log.__class__("log")


def _glitch(n_before: int = 300, after: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([5.0 + rng.normal(size=n_before), [1e29], 5.0 + rng.normal(size=after)])


def test_a_glitch_is_folded_in_at_clip_scales_and_the_scale_recovers() -> None:
    values = _glitch()
    clipped, plain = Scaling(halflife=64.0), Scaling(halflife=64.0, clip=0.0)
    x, stats, folded = clipped.transform_values(values)
    before = stats[299]
    reach = 100.0 * float(clipped.scale(before[None])[0])
    assert float(folded[300]) == pytest.approx(float(before[1]) + reach)  # moved to 100 scales out
    np.testing.assert_array_equal(np.delete(folded.numpy(), 300), np.delete(values, 300))  # only it
    assert abs(float(x[300])) < 100.0  # the model's input stays in range
    # the scale grows by sqrt(1 + alpha * 100**2) at most, not to 1e26
    grown = float(clipped.scale(stats[300][None])[0]) / float(clipped.scale(before[None])[0])
    assert 1.0 < grown <= math.sqrt(1.0 + clipped.alpha * 100.0**2)
    _, plain_stats = plain.transform(values)
    assert float(plain.scale(plain_stats[-1][None])[0]) > 1e25  # what it did before: the series ruined
    # folding the moved value in is exact to undo (the engine keeps it in its ring; a re-warm rewinds it)
    back = clipped.rewind(stats[300][None].numpy(), folded[300:301].numpy())
    np.testing.assert_allclose(back[0], before.numpy(), rtol=1e-9)


def test_a_level_shift_is_followed_within_a_few_values() -> None:
    rng = np.random.default_rng(2)
    values = np.concatenate([100.0 + 0.5 * rng.normal(size=200), 1e5 + 0.5 * rng.normal(size=200)])
    _, stats, folded = Scaling().transform_values(values)
    moved = np.flatnonzero(folded.numpy() != values)
    assert 1 <= len(moved) <= 6 and moved.min() == 200  # the first values after the shift, then none
    _, unclipped = Scaling(clip=0.0).transform(values)  # the running mean as it would be without clip
    assert float(stats[-1, 1]) == pytest.approx(float(unclipped[-1, 1]), rel=0.05)


def test_clip_waits_for_the_first_values_and_acts_on_the_logarithm_with_log() -> None:
    early = np.array([1.0, 2.0, 1.0, 1e6, 1.0])  # a series' 4th value is never moved
    _, _, folded = Scaling().transform_values(early)
    np.testing.assert_array_equal(folded.numpy(), early)
    flat = np.concatenate([np.zeros(50), [30.0], np.zeros(30), [40.0]])  # intermittent: a flat start
    _, _, folded = Scaling().transform_values(flat)
    np.testing.assert_array_equal(folded.numpy(), flat)  # its first rise is how its range is learnt
    # a high level with little noise (its deviation under the scale's floor, a thousandth of the level)
    calm = np.concatenate([1e6 + 0.01 * np.random.default_rng(5).normal(size=20), [1e29]])
    _, _, folded = Scaling().transform_values(calm)
    assert float(folded[20]) == pytest.approx(1e6 + 100 * 1e3, rel=1e-6)  # 100 floors out
    values = np.concatenate([np.full(20, 10.0) * np.exp(0.01 * np.arange(20)), [1e29]])
    log = Scaling("log", halflife=8.0, clip=10.0)
    _, stats, folded = log.transform_values(values)
    expected = math.exp(float(stats[19, 1]) + 10.0 * float(log.scale(stats[19][None])[0]))
    assert float(folded[20]) == pytest.approx(expected) and 0.0 < float(folded[20]) < 1e3
    assert Scaling("none").winsorize(np.zeros((1, 3)), np.array([1e29]))[1] is None


def test_winsorize_agrees_on_numpy_and_torch() -> None:
    scaling = Scaling(halflife=8.0, clip=2.0)
    _, stats = scaling.transform(np.random.default_rng(3).normal(size=(4, 12)))
    last = stats[:, -1]  # (4, N_STATS)
    v = np.array([0.0, 50.0, -50.0, 1.0])
    got_np, moved_np = scaling.winsorize(last.numpy(), v)
    got_t, moved_t = scaling.winsorize(last, torch.from_numpy(v))
    np.testing.assert_allclose(got_np, got_t.numpy(), rtol=1e-12)
    assert moved_np.tolist() == moved_t.tolist() and moved_np[1] and moved_np[2]
