"""Re-warm off the hot path: copy the retained windows at one batch boundary, run the new model over the
copy on another thread, and at a later boundary catch up the values stepped meanwhile.

A series' state after the swap is the new model's pass, from the zero state, over the inputs it had
retained when the windows were copied followed by every input stepped since: one contiguous run of its
inputs, none skipped or used twice. The ring buffer's per-slot count says how many were stepped since
(the newest ``delta`` entries of the ring). Series that cannot be caught up that way (more than W values
since, evicted and replaced, new since the copy) are re-warmed over their current window at the swap.

>>> from forecaster.engine import Engine
>>> from forecaster.model import RecurrentForecaster
>>> engine = Engine(RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2), window=4)
>>> _ = engine.process(["a", "a", "b"], [1, 2, 1], [1.0, 2.0, 3.0])
>>> copied = copy_windows(engine.table)
>>> new = RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2)
>>> warmed = warm_windows(new, copied)
>>> _ = engine.process(["a"], [3], [4.0])          # the old model keeps serving meanwhile
>>> apply_warmed(engine, new, "v2", warmed)
{'caught_up': 2, 'rewarmed': 0, 'values_caught_up': 1}
>>> engine.version
'v2'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from forecaster.model import RecurrentForecaster, State

CHUNK = 65_536  # series per batched call (bounds the (chunk, W) window copies)


@dataclass
class WindowCopy:
    """The retained inputs of every resident series at one batch boundary."""

    slots: np.ndarray  # (n,) int64
    names: list[str]
    counts: np.ndarray  # (n,) int64 values ever stepped, at the copy
    x: torch.Tensor  # (n, W, 1) right-aligned inputs
    lengths: torch.Tensor  # (n,) int64 min(count, W)


@dataclass
class Warmed:
    """The new model's state and forecast (scaled) after each copied window."""

    copy: WindowCopy
    state: State  # (layers, n, hidden), or (h, c)
    y: torch.Tensor  # (n, horizon)


def copy_windows(table: Any) -> WindowCopy:
    """Copy every resident series' window (call at a batch boundary, on the service thread)."""
    slots = table.occupied()
    slots = slots[table.count[slots] > 0]
    with torch.inference_mode():
        x, lengths = table.window(slots)  # (n, W, 1), (n,) — a gathered copy, not a view
    return WindowCopy(slots, table.series_at(slots.tolist()), table.count[slots].copy(), x, lengths)


def warm_windows(model: RecurrentForecaster, copy: WindowCopy) -> Warmed:
    """Run ``model`` from the zero state over each copied window (safe on any thread: touches no table)."""
    hs, cs, ys = [], [], []
    with torch.inference_mode():
        for lo in range(0, len(copy.slots), CHUNK):
            y, h = model.warm(copy.x[lo : lo + CHUNK], copy.lengths[lo : lo + CHUNK])  # (n, horizon)
            ys.append(y)
            if isinstance(h, tuple):
                hs.append(h[0])
                cs.append(h[1])
            else:
                hs.append(h)
        if not ys:
            empty = model.initial_state(0, copy.x.device)
            return Warmed(copy, empty, torch.zeros(0, model.horizon, device=copy.x.device))
        state: State = (torch.cat(hs, 1), torch.cat(cs, 1)) if cs else torch.cat(hs, 1)  # (layers, n, hidden)
    return Warmed(copy, state, torch.cat(ys))


def apply_warmed(engine: Any, model: RecurrentForecaster, version: str, warmed: Warmed) -> dict[str, int]:
    """Swap ``model`` into ``engine`` with the warmed states, stepping the inputs that arrived since the
    copy (call at a batch boundary, on the service thread). Returns how many series took each path."""
    table, copy = engine.table, warmed.copy
    model = model.to(engine.device).eval()
    window = table.window_size
    # Step 1. Which copied series can be caught up: same series in the same slot, at most W values since.
    now_names = table.series_at(copy.slots.tolist())
    delta = table.count[copy.slots] - copy.counts  # (n,)
    same = np.array([a == b for a, b in zip(now_names, copy.names, strict=True)], dtype=bool)
    ok = same & (delta >= 0) & (delta <= window)
    rows = np.flatnonzero(ok)
    # Step 2. The engine takes the new model (the table is reshaped first if the new shape differs).
    if (model.num_layers, model.hidden_size, model.horizon, model.is_lstm) != (
        table.num_layers, table.hidden_size, table.horizon, table.lstm
    ):
        table.reshape_model(model.num_layers, model.hidden_size, model.horizon, model.is_lstm)
    engine.set_model(model, version)
    with torch.inference_mode():
        # Step 3. Catch up: round k steps the k-th input stepped since the copy, for every series that has one.
        device = table.device
        row_idx = torch.as_tensor(rows, device=device)
        state = _select(warmed.state, row_idx)  # (layers, m, hidden)
        y = warmed.y.index_select(0, row_idx)  # (m, horizon)
        slots = copy.slots[rows]
        slot_idx = torch.as_tensor(slots, device=device)
        start = torch.as_tensor(copy.counts[rows], device=device)  # (m,) ordinal of the first input since
        pending = delta[rows]
        for k in range(int(pending.max()) if len(rows) else 0):
            active = np.flatnonzero(pending > k)
            a = torch.as_tensor(active, device=device)
            x = table.ring[slot_idx[a], (start[a] + k) % window]  # (b,) inputs, in stepped order
            y_k, s_k = model.step(x[:, None].to(torch.float32), _select(state, a))  # (b, horizon)
            state = _put(state, a, s_k)
            y[a] = y_k
        if len(rows):
            stats = table.stats.index_select(0, slot_idx)  # (m, N_STATS): statistics as they are now
            table.write_states(slots, state, engine.scaling.denormalize(stats, y))
        # Step 4. Everything else resident re-warms over its current window, now.
        rest = np.setdiff1d(table.occupied(), slots)
        rest = rest[table.count[rest] > 0]
        for lo in range(0, len(rest), CHUNK):
            chunk = rest[lo : lo + CHUNK]
            x, lengths = table.window(chunk)  # (n, W, 1), (n,)
            y_r, h_r = model.warm(x, lengths)  # (n, horizon)
            stats = table.stats.index_select(0, torch.as_tensor(chunk, device=device))
            table.write_states(chunk, h_r, engine.scaling.denormalize(stats, y_r))
    return {"caught_up": len(rows), "rewarmed": len(rest), "values_caught_up": int(pending.sum()) if len(rows) else 0}


def _select(state: State, idx: torch.Tensor) -> State:
    if isinstance(state, tuple):
        return state[0].index_select(1, idx), state[1].index_select(1, idx)
    return state.index_select(1, idx)


def _put(state: State, idx: torch.Tensor, new: State) -> State:
    if isinstance(state, tuple):
        state[0][:, idx] = new[0]
        state[1][:, idx] = new[1]
        return state
    state[:, idx] = new
    return state
