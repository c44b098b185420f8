"""RecurrentForecaster: shapes, the one-step path equals forward, warm-up over variable-length windows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forecaster.model import CELLS, RecurrentForecaster, build_model


def _state_close(a, b, atol: float = 1e-6) -> bool:
    if isinstance(a, tuple):
        return all(torch.allclose(x, y, atol=atol) for x, y in zip(a, b, strict=True))
    return torch.allclose(a, b, atol=atol)


@pytest.mark.parametrize("cell", CELLS)
def test_shapes(cell: str) -> None:
    model = RecurrentForecaster(cell, input_size=2, hidden_size=8, num_layers=3, horizon=5)
    y, h = model(torch.randn(4, 7, 2))
    assert y.shape == (4, 7, 5)
    h0 = h[0] if cell == "lstm" else h
    assert h0.shape == (3, 4, 8)
    y1, _ = model.step(torch.randn(4, 2), model.initial_state(4))
    assert y1.shape == (4, 5)


@pytest.mark.parametrize("cell", CELLS)
@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 5), steps=st.integers(1, 12), layers=st.integers(1, 3), seed=st.integers(0, 99))
def test_step_equals_forward(cell: str, batch: int, steps: int, layers: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = RecurrentForecaster(cell, hidden_size=8, num_layers=layers, horizon=3).eval()
    x = torch.randn(batch, steps, 1)
    with torch.inference_mode():
        y, h_full = model(x)
        h = model.initial_state(batch)
        for t in range(steps):
            y_t, h = model.step(x[:, t], h)
            assert torch.allclose(y_t, y[:, t], atol=1e-6)
    assert _state_close(h, h_full)


@pytest.mark.parametrize("cell", CELLS)
def test_step_continues_a_given_state(cell: str) -> None:
    torch.manual_seed(1)
    model = RecurrentForecaster(cell, hidden_size=8, num_layers=2, horizon=2).eval()
    x = torch.randn(3, 10, 1)
    y, _ = model(x)
    _, h = model(x[:, :6])
    y_step, _ = model.step(x[:, 6], h)
    assert torch.allclose(y_step, y[:, 6], atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_warm_equals_forward_over_each_rows_own_values(cell: str) -> None:
    torch.manual_seed(2)
    model = RecurrentForecaster(cell, hidden_size=8, num_layers=2, horizon=3).eval()
    window, lengths = 6, [6, 1, 3, 5, 2]
    series = [torch.randn(n, 1) for n in lengths]
    x = torch.zeros(len(lengths), window, 1)
    for i, s in enumerate(series):
        x[i, window - len(s) :] = s
    x[1, :3] = 99.0  # padding must be ignored whatever it holds
    y, h = model.warm(x, torch.tensor(lengths))
    for i, s in enumerate(series):
        y_ref, h_ref = model(s[None])
        assert torch.allclose(y[i], y_ref[0, -1], atol=1e-6)
        got = (h[0][:, i : i + 1], h[1][:, i : i + 1]) if cell == "lstm" else h[:, i : i + 1]
        assert _state_close(got, h_ref)


def test_config_rebuilds_the_same_module() -> None:
    model = RecurrentForecaster("lstm", input_size=1, hidden_size=16, num_layers=1, horizon=4, dropout=0.0)
    assert model.config.model_dump() == {
        "cell": "lstm",
        "input_size": 1,
        "hidden_size": 16,
        "num_layers": 1,
        "horizon": 4,
        "dropout": 0.0,
        "season": 1,
        "base_seasons": 0,
        "base_level": False,
        "trend_span": 0,
        "damping": 1.0,
        "period_ms": 0,
        "error_input": False,
    }
    twin = build_model(model.config)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 1)
    assert torch.equal(twin(x)[0], model(x)[0])


def test_step_in_eval_ignores_dropout() -> None:
    torch.manual_seed(3)
    model = RecurrentForecaster("gru", hidden_size=8, num_layers=2, horizon=2, dropout=0.5).eval()
    x = torch.randn(2, 1)
    y, _ = model(x[:, None])
    y_step, _ = model.step(x, model.initial_state(2))
    assert torch.allclose(y_step, y[:, 0], atol=1e-6)


def test_unknown_cell_is_refused() -> None:
    with pytest.raises(ValueError, match="cell"):
        RecurrentForecaster("transformer")


def test_step_follows_weights_loaded_or_moved_after_first_use() -> None:
    torch.manual_seed(4)
    model = RecurrentForecaster("gru", hidden_size=8, num_layers=2, horizon=2).eval()
    x = torch.randn(3, 1)
    model.step(x, model.initial_state(3))  # caches the weight list
    model.load_state_dict(RecurrentForecaster("gru", hidden_size=8, num_layers=2, horizon=2).state_dict())
    y, _ = model(x[:, None])
    assert torch.allclose(model.step(x, model.initial_state(3))[0], y[:, 0], atol=1e-6)
    model = model.double()
    y, _ = model(x.double()[:, None])
    y_step, _ = model.step(x.double(), model.initial_state(3).double())
    assert y_step.dtype == torch.float64 and torch.allclose(y_step, y[:, 0], atol=1e-12)


# ---- forecasting over a seasonal baseline ---------------------------------------------------------------


def _residual(
    cell: str,
    season: int,
    base_seasons: int,
    seed: int = 0,
    horizon: int = 5,
    base_level: bool = False,
    **trend,
) -> RecurrentForecaster:
    torch.manual_seed(seed)
    return RecurrentForecaster(
        cell,
        hidden_size=6,
        num_layers=2,
        horizon=horizon,
        season=season,
        base_seasons=base_seasons,
        base_level=base_level,
        **trend,
    ).eval()


def test_an_untrained_residual_model_forecasts_its_baseline_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])[..., None]  # (1, 7, 1)
    # season 3, one season: step k forecasts the input at t + k - 3 * ceil(k / 3); zeros before the start.
    y, _ = _residual("gru", 3, 1, horizon=4)(x)
    assert y[0, 6].tolist() == [5.0, 6.0, 7.0, 5.0]
    assert y[0, 0].tolist() == [1.0, 1.0, 1.0, 1.0]  # no season seen yet for steps 1, 2, 4: the last value
    assert y[0, 1].tolist() == [2.0, 1.0, 2.0, 2.0]
    # two seasons: the mean of the two values at that phase, 3 and 6 inputs back for step 1 after t = 6
    y, _ = _residual("gru", 3, 2, horizon=4)(x)
    assert y[0, 6].tolist() == [3.5, 4.5, 5.5, 3.5]
    assert y[0, 3].tolist() == [2.0, 3.0, 2.5, 2.0]  # a second season not seen yet is left out of the mean
    # mix moves each step's baseline toward the last value (7): none, all the way, half way, none
    model = _residual("gru", 3, 1, horizon=4)
    with torch.no_grad():
        model.mix.copy_(torch.tensor([0.0, 1.0, 0.5, 0.0]))
    y, _ = model(x)
    assert y[0, 6].tolist() == [5.0, 7.0, 7.0, 5.0]
    # season 1: the last value
    y, _ = _residual("rnn", 1, 1, horizon=3)(x)
    assert y[0, 4].tolist() == [5.0, 5.0, 5.0]
    # moved to the current level: seasonal naive (3, 6, 9, then 3 again) plus the newest input (9) minus
    # the one a whole cycle before it: 3 back (8) for steps 1-3, 6 back (5) for step 4
    x = torch.tensor([[1.0, 5.0, 2.0, 4.0, 8.0, 3.0, 6.0, 9.0]])[..., None]
    y, _ = _residual("gru", 3, 1, horizon=4, base_level=True)(x)
    assert y[0, 7].tolist() == [3 + 9 - 8, 6 + 9 - 8, 9 + 9 - 8, 3 + 9 - 5]


def test_trend_baselines_by_hand() -> None:
    # the last value with the drift of the last 2 steps: (7 - 2) / 2 = 2.5 per step
    x = torch.tensor([[1.0, 2.0, 4.0, 7.0]])[..., None]
    y, _ = _residual("gru", 1, 1, horizon=3, trend_span=2)(x)
    assert y[0, 3].tolist() == [9.5, 12.0, 14.5]
    # damped (phi 0.5): 7 + 2.5 * (0.5, 0.5 + 0.25, 0.5 + 0.25 + 0.125)
    y, _ = _residual("gru", 1, 1, horizon=3, trend_span=2, damping=0.5)(x)
    assert y[0, 3].tolist() == [8.25, 8.875, 9.1875]
    # seasonal naive (season 2: 6, 9, 6) plus the mean seasonal change: the newest season (6, 9) has mean
    # 7.5, the one two steps earlier (3, 5) 4: slope 1.75 per step; targets 2, 2, 4 steps past their value
    x = torch.tensor([[1.0, 2.0, 3.0, 5.0, 6.0, 9.0]])[..., None]
    model = _residual("gru", 2, 1, horizon=3, trend_span=2)
    assert model.context == 3
    y, _ = model(x)
    assert y[0, 5].tolist() == [6 + 3.5, 9 + 3.5, 6 + 7.0]
    # two seasons averaged: values one and a half seasons back on average, i.e. 3 steps for steps 1 and 2
    y, _ = _residual("gru", 2, 2, horizon=2, trend_span=2)(x)
    assert y[0, 5].tolist() == [(6 + 3) / 2 + 1.75 * 3, (9 + 5) / 2 + 1.75 * 3]
    # the slope is read once two seasons were seen; before, the plain baseline
    assert y[0, 1].tolist() == [1.0, 2.0]


def _past(model: RecurrentForecaster, x: torch.Tensor, start: int) -> torch.Tensor:
    """The ``context`` inputs of ``x`` (batch, T, 1) before ``start``, NaN before the first."""
    got = x[:, max(0, start - model.context) : start, 0]
    return torch.nn.functional.pad(got, (model.context - got.shape[1], 0), value=float("nan"))


def _randomize_head(model: RecurrentForecaster) -> RecurrentForecaster:
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(
    ("season", "base_seasons", "base_level"),
    [(1, 1, False), (3, 1, False), (4, 3, False), (3, 2, True), (2, 1, True)],
)
@pytest.mark.parametrize(("trend_span", "damping"), [(0, 1.0), (3, 0.9)])
@pytest.mark.parametrize("error_input", [False, True], ids=["value", "errors"])
def test_residual_step_chunks_and_warm_equal_forward(
    cell: str,
    season: int,
    base_seasons: int,
    base_level: bool,
    trend_span: int,
    damping: float,
    error_input: bool,
) -> None:
    """With ``error_input`` the net also reads the baseline's last one-step error, taken from the inputs
    before each step (``past``: one more than the baseline reads); inputs in one unit here, so a warm over
    a window equals forward over it as for the value alone."""
    model = _randomize_head(
        _residual(
            cell,
            season,
            base_seasons,
            seed=2,
            base_level=base_level,
            trend_span=trend_span,
            damping=damping,
            error_input=error_input,
        )
    )
    assert model.rnn.input_size == 1 + error_input
    x = torch.randn(3, 20, 1)
    y, _ = model(x)
    # forward in chunks, each given the inputs before it
    y1, h = model(x[:, :7])
    y2, _ = model(x[:, 7:], h, past=_past(model, x, 7))
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-5, rtol=0)
    # one step at a time
    h = model.initial_state(3)
    for t in range(20):
        y_t, h = model.step(x[:, t], h, past=_past(model, x, t))
        torch.testing.assert_close(y_t, y[:, t], atol=1e-5, rtol=0)
    # warm over a right-aligned window equals forward over those inputs alone
    window = torch.zeros(3, 16, 1)
    window[:, -12:] = x[:, -12:]
    y_w, h_w = model.warm(window, torch.tensor([12, 12, 12]))
    y_ref, _ = model(x[:, -12:])
    torch.testing.assert_close(y_w, y_ref[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.readout(h_w, window[..., 0]), y_w, atol=1e-6, rtol=0)


def test_residual_config_and_context() -> None:
    model = _residual("lstm", 12, 3)
    assert model.context == 35 and _residual("gru", 4, 0).context == 0
    # the baseline's error reads one input more; without a baseline there is no error to read
    assert _residual("lstm", 12, 3, error_input=True).context == 36
    assert not _residual("gru", 4, 0, error_input=True).error_input
    assert _residual("gru", 3, 2, horizon=5, base_level=True).context == 9  # 2 cycles for step 5, then 1 more
    rebuilt = build_model(model.config)
    assert (rebuilt.season, rebuilt.base_seasons, rebuilt.context) == (12, 3, 35)
    assert set(model.state_dict()) - set(_residual("lstm", 1, 0).state_dict()) == {"mix"}  # (horizon,)
    trended = build_model(_residual("gru", 12, 1, trend_span=24, damping=0.9).config)
    assert (trended.trend_span, trended.damping, trended.context) == (24, 0.9, 24 + 11)
    with pytest.raises(ValueError):
        RecurrentForecaster("gru", season=0)
    with pytest.raises(ValueError):
        RecurrentForecaster("gru", base_seasons=1, damping=0.0)
    with pytest.raises(ValueError):
        RecurrentForecaster("gru", input_size=2, season=3, base_seasons=1)
