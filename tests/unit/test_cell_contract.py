"""One contract over every cell in ``forecaster.model.CELLS``: a new cell gets every check by being added there.

Each cell is checked plain and as a residual over a seasonal baseline: shapes, ``step`` equals
``forward``, ``warm`` equals ``forward`` over the window alone, a checkpoint round trip, incremental
equals full through the engine (invariant 1), snapshot/restore and re-warm.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forecaster.checkpoints.store import load_checkpoint, save_checkpoint
from forecaster.engine import Engine, reference_forecast
from forecaster.model import CELLS
from forecaster.scaling import Scaling

SHAPES = {"plain": {}, "residual": {"season": 4, "base_seasons": 2, "base_level": True}}
SCALING = Scaling(halflife=6.0)

pytestmark = [pytest.mark.parametrize("cell", list(CELLS)), pytest.mark.parametrize("shape", list(SHAPES))]


def _values(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 10.0 + 0.05 * t + np.sin(2 * np.pi * t / 4) + rng.normal(0.0, 0.2, n)


def test_shapes(make_model, cell: str, shape: str) -> None:
    model = make_model(cell, **SHAPES[shape])
    y, h = model(torch.zeros(4, 10, 1))
    assert tuple(y.shape) == (4, 10, 3)
    states = h if cell == "lstm" else (h,)
    assert len(states) == (2 if cell == "lstm" else 1)
    assert all(tuple(s.shape) == (2, 4, 8) for s in states)  # (layers, batch, hidden)
    y1, _ = model.step(torch.zeros(4, 1), model.initial_state(4), past=torch.zeros(4, model.context))
    assert tuple(y1.shape) == (4, 3)


def test_step_equals_forward_and_warm_equals_forward_over_the_window(
    make_model, cell: str, shape: str
) -> None:
    model = make_model(cell, **SHAPES[shape])
    x = torch.randn(3, 20, 1)
    y, _ = model(x)
    h = model.initial_state(3)
    for t in range(20):
        past = x[:, max(0, t - model.context) : t, 0]
        past = torch.cat(
            [torch.full((3, model.context - past.shape[1]), torch.nan), past], 1
        )  # NaN: before the first
        y_t, h = model.step(x[:, t], h, past=past)
        torch.testing.assert_close(y_t, y[:, t], atol=1e-5, rtol=0)
    window = torch.zeros(3, 16, 1)
    window[:, -12:] = x[:, -12:]
    y_w, _ = model.warm(window, torch.tensor([12, 12, 12]))
    torch.testing.assert_close(y_w, model(x[:, -12:])[0][:, -1], atol=1e-5, rtol=0)


def test_checkpoint_round_trip(make_model, cell: str, shape: str, tmp_path) -> None:
    model = make_model(cell, **SHAPES[shape])
    loaded = load_checkpoint(tmp_path / save_checkpoint(tmp_path, model, SCALING))
    assert loaded.model.config == model.config and loaded.scaling == SCALING
    x = torch.randn(2, 9, 1)
    assert torch.equal(loaded.model(x)[0], model(x)[0])


def test_incremental_equals_full_through_the_engine(make_model, cell: str, shape: str) -> None:
    model = make_model(cell, **SHAPES[shape])
    a, b = _values(30, seed=1), _values(17, seed=2)
    engine = Engine(model, window=32, capacity=1, scaling=SCALING)  # capacity 1: the table grows
    got: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    for t in range(0, 30, 3):  # several values of a series per batch, series arriving late
        names = ["a"] * 3 + (["b"] * 2 if 10 <= t < 10 + 17 // 2 * 3 else [])
        rows = [a[t + k] for k in range(3)] + [b[len(got["b"]) + k] for k in range(names.count("b"))]
        ts = [t + k for k in range(3)] + [len(got["b"]) + k for k in range(names.count("b"))]
        out = engine.process(names, ts, rows)
        for name, forecast in zip(out.series, out.forecasts, strict=True):
            got[name].append(forecast)
    np.testing.assert_allclose(np.stack(got["a"]), reference_forecast(model, a, SCALING), atol=1e-5)
    n = len(got["b"])
    np.testing.assert_allclose(np.stack(got["b"]), reference_forecast(model, b[:n], SCALING), atol=1e-5)


def test_snapshot_restore_and_rewarm_continue_exactly(make_model, cell: str, shape: str) -> None:
    model, newer = make_model(cell, **SHAPES[shape]), make_model(cell, seed=5, **SHAPES[shape])
    values = _values(24)
    engine = Engine(model, window=32, scaling=SCALING)
    engine.process(["s"] * 23, list(range(23)), values[:23])
    twin = Engine(model, window=32, scaling=SCALING)
    twin.restore("s", engine.snapshot("s"))
    step = ["s"], [23], [values[23]]
    np.testing.assert_array_equal(twin.process(*step).forecasts, engine.process(*step).forecasts)
    # A new model re-warmed over the retained window forecasts as its own full pass over those values.
    engine.rewarm(newer, "v2")
    out = engine.process(["s"], [24], [9.5])
    want = reference_forecast(newer, np.append(values, 9.5), SCALING)[-1]
    assert out.version == "v2"
    np.testing.assert_allclose(out.forecasts[0], want, atol=1e-5)
