"""Re-warm of the interval calibrator: the retained window through a new model and the calibrator.

A swapped-in model makes other errors than the one before it, so the calibrator of each re-warmed series
starts again from its prior and is replayed over the series' retained window, as if the new model had
served those values: the statistics after each retained value are recovered by rewinding the scaling
(``Scaling.rewind``) from the current ones, one forward pass of the new model from the zero state gives
its forecast after each retained value, and the calibrator scores and updates value by value exactly as
``Engine._step`` does. When the window holds a series' whole history the result equals what the new
model's engine would hold had it served the series from the start (tested). A baseline that reads
further back than the window's first values sees NaN there, as for a young series.

Where rewinding a window would amplify rounding too much (a scaling half-life far shorter than the
window: ``Scaling.rewind_gain`` above ``MAX_REWIND_GAIN``) the calibrator keeps its spreads and scores from
the re-warmed forecast on (``StateTable.reset_pending``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from forecaster.engine.intervals import WARMUP, centers, units
from forecaster.model import RecurrentForecaster
from forecaster.scaling import Scaling

MAX_REWIND_GAIN = 1e6


@torch.inference_mode()
def recalibrate(table: Any, model: RecurrentForecaster, scaling: Scaling, slots: np.ndarray) -> None:
    """Replay the retained windows of ``slots`` (each with at least one value) through ``model`` and the
    calibrator of ``table`` (a ``StateTable`` with intervals), from the calibrator's prior. Callers pass
    ``slots`` in chunks of ``rows_per_call`` (it holds a few (n, W, H) arrays)."""
    if not table.levels or not len(slots):
        return
    if scaling.rewind_gain(table.window_size) > MAX_REWIND_GAIN:
        table.reset_pending(slots, scaling)
        return
    iv, dev, w, horizon = table.intervals, table.device, table.window_size, table.horizon
    idx = torch.as_tensor(slots, dtype=torch.long, device=dev)
    count = torch.as_tensor(table.count[slots], device=dev)  # (n,)
    lengths = count.clamp(max=w)  # (n,)
    # Step 1. The retained inputs and values, left-aligned (position j: the j-th oldest retained value).
    cols = (count[:, None] - lengths[:, None] + torch.arange(w, device=dev)) % w  # (n, W) ring positions
    held = torch.arange(w, device=dev) < lengths[:, None]  # (n, W) positions holding a value
    x = table.ring.index_select(0, idx).gather(1, cols)  # (n, W) model inputs as stepped
    v = table.values.index_select(0, idx).gather(1, cols).double()  # (n, W) data units
    v = torch.where(held, v, v.gather(1, (lengths - 1)[:, None]))  # padding: the newest value (finite)
    # Step 2. The statistics after each retained value: rewind the current ones, newest first.
    stats = torch.zeros(len(slots), w, Scaling.N_STATS, dtype=torch.float64, device=dev)  # (n, W, N_STATS)
    current = table.stats.index_select(0, idx)  # (n, N_STATS) after the newest value
    rows = torch.arange(len(slots), device=dev)
    for back in range(w):
        at = (lengths - 1 - back).clamp(min=0)  # (n,) position of the value folded in last
        stats[rows, at] = torch.where((back < lengths)[:, None], current, stats[rows, at])
        current = scaling.rewind(current, v[rows, at])
    # Step 3. The new model's forecasts after each retained value, from the zero state.
    base = model.scaled_baseline(v.masked_fill(~held, float("nan")), stats, scaling, 0, w)  # (n, W, H)
    y, _ = model(x[..., None], base=base)  # (n, W, H) scaled
    f = scaling.denormalize(stats.reshape(-1, Scaling.N_STATS), y.reshape(-1, horizon)).float()  # as emitted
    center = centers(scaling, f).reshape(len(slots), w, horizon)  # (n, W, H) float32
    unit = units(scaling, stats.reshape(-1, Scaling.N_STATS)).reshape(len(slots), w)  # (n, W) float32
    # Step 4. The calibrator from its prior, value by value (ordinal of position j: count - length + j).
    first = torch.clamp(count - lengths, min=WARMUP - 1)  # (n,) first forecast scored
    ordinal0 = count - lengths  # (n,)
    mean_err = torch.ones(len(slots), horizon, device=dev)  # (n, H)
    prior = torch.as_tensor(iv.prior, dtype=torch.float32, device=dev)  # (L,)
    mult = prior[:, None].expand(len(slots), -1, horizon)  # (n, L, H)
    # the half-widths each of the last H forecasts' bounds were made with, by position mod H
    halves = torch.zeros(len(slots), horizon, len(iv.levels), horizon, device=dev)  # (n, H, L, H)
    halves[:, 0] = mult * mean_err[:, None, :]  # the forecast after position 0, before any score
    k = torch.arange(1, horizon + 1, device=dev)
    levels = torch.arange(len(iv.levels), device=dev)
    inner_v = scaling.inner(v)  # (n, W)
    for j in range(1, w):
        made = j - k  # (H,) position of the forecast made k values before position j
        valid = (
            (made >= 0)[None] & (j < lengths)[:, None] & (ordinal0[:, None] + made[None] >= first[:, None])
        )
        mk = made.clamp(min=0)
        past = center[:, mk, k - 1]  # (n, H)
        score = (inner_v[:, j, None] - past).abs() / unit[:, mk]  # (n, H) float64, as the engine
        score = torch.where(valid, score.float(), 0.0)  # (n, H) float32
        n_errors = ordinal0[:, None] + made[None] - first[:, None] + 1  # (n, H)
        emitted = halves[:, (mk % horizon)[None, :], levels[:, None], (k - 1)[None, :]]  # (n, L, H)
        mean_err, mult, _, _ = iv.update(score, valid, n_errors, mean_err, mult, emitted)
        held_j = (j < lengths)[:, None, None]  # (n, 1, 1) past a series' last value: padding, kept out
        halves[:, j % horizon] = torch.where(held_j, mult * mean_err[:, None, :], halves[:, j % horizon])
    # Step 5. The calibrator's state, and the last H forecasts awaiting their values.
    table.mean_err.index_copy_(0, idx, mean_err)
    table.mult.index_copy_(0, idx, mult.contiguous())
    table.score_from[slots] = first.cpu().numpy()
    for back in range(min(horizon, w)):
        pos = (lengths - 1 - back).clamp(min=0)  # (n,)
        ok = back < lengths  # (n,)
        row = (count - 1 - back) % horizon  # (n,)
        sel, prow = idx[ok], row[ok]
        table.past[sel, prow] = center[rows, pos][ok].float()
        table.past_scale[sel, prow] = unit[rows, pos][ok].float()
        table.past_half[sel, prow] = halves[rows, pos % horizon][ok]
