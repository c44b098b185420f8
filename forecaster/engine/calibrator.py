"""Prediction intervals in the engine's step: each new value scores the forecasts its series made 1..H
values before it, folds the scores into the series' calibrator (``Intervals.update``), and the new
forecasts get their bounds.

What a series keeps for this lives in the state table (its ring of past forecast centres and scales, mean
errors and multipliers); ``Intervals`` holds the method, this module only the reads and writes around it.
A table on the host runs both halves as compiled loops (``forecaster.engine.fused``: the same arithmetic,
at a few series per round a tenth of the cost of numpy's forty operations); a table on a GPU as tensor
operations.

>>> from forecaster.engine.intervals import Intervals
>>> from forecaster.engine.state import StateTable
>>> table = StateTable(1, 4, 3, window=8, intervals=Intervals())
>>> lag_rows(3)  # ring rows of the forecasts 1..3 values back
array([[2, 1, 0],
       [0, 2, 1],
       [1, 0, 2]])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from forecaster.engine import fused
from forecaster.engine.intervals import WARMUP, Intervals, centers, half_offsets, lag_rows, units
from forecaster.engine.scores import CoverageAccumulator
from forecaster.engine.state import StateTable
from forecaster.scaling import Scaling


class Calibrator:
    """The calibrator's reads and writes of ``table`` for one round of distinct ``slots``: ``score``
    before the recurrent step, ``bounds`` after it."""

    def __init__(self, intervals: Intervals, table: StateTable, scaling: Scaling) -> None:
        self.intervals = intervals
        self.table = table
        self.scaling = scaling
        self._up = intervals.miss_step[:, 0].copy()  # (L,) float32: the step of a miss
        if table.host_views:  # compile both loops now, not in the first round
            none, h = np.zeros(0, np.int64), table.horizon
            steps = intervals.score_steps(h)
            self.score(
                none, none, none, np.zeros(0), lambda v: CoverageAccumulator(v, table.levels, h, steps)
            )
            f, stats = np.zeros((0, h), np.float32), np.zeros((0, Scaling.N_STATS))
            self.bounds(none, none, f, stats, np.zeros(0), None)

    def score(
        self,
        slots: np.ndarray,
        idx: Any,
        count: np.ndarray,
        v: Any,
        coverage: Callable[[Any], CoverageAccumulator],
    ) -> tuple[Any, Any] | None:
        """Score value ``v`` of each slot against the forecasts made 1..H values before it (those made
        since the slot's ``score_from``), update the calibrator and the coverage sums (``coverage(like)``:
        those of the serving version). Returns the new mean errors (n, H) and multipliers (n, L, H) (None
        on the host: ``bounds`` reads them from the table)."""
        tb, iv = self.table, self.intervals
        acc = coverage(v)
        if tb.host_views:
            fused.score_round(
                slots, count, tb.score_from, self.scaling.inner(v), tb.past_flat, tb.past_scale_flat,
                tb.past_half_flat, tb.mean_err_a, tb.mult_a, self._up, np.float32(iv.learning_rate),
                np.float32(iv.floor), acc.count, acc.sums,
            )  # fmt: skip
            return None
        horizon, device = tb.horizon, tb.device
        k = np.arange(1, horizon + 1)  # (H,) 1..H
        # Step 1. which past forecasts are scored: those made after ordinals score_from .. count - k
        n_errors = (count - tb.score_from[slots])[:, None] + (1 - k)  # (n, H)
        valid = None if len(slots) and n_errors[:, -1].min() > 0 else n_errors > 0  # None: all of them
        row = lag_rows(horizon)[count % horizon] + (slots * horizon)[:, None]  # (n, H) ring rows
        at = row * horizon + (k - 1)  # (n, H) flat positions of the k-step centres
        # (n, L, H) flat positions of the half-widths the k-step bounds were emitted with
        half_at = half_offsets(horizon, tb.levels)[count % horizon] + (slots * tb.half_size)[:, None, None]
        row, at, n_errors, half_at = (torch.from_numpy(a).to(device) for a in (row, at, n_errors, half_at))
        # Step 2. their normalised absolute errors
        inner_v = self.scaling.inner(v)  # (n,) float64
        score = (abs(inner_v[:, None] - tb.past_flat[at]) / tb.past_scale_flat[row]).float()  # (n, H)
        valid_d = None if valid is None else torch.from_numpy(valid).to(device)
        if valid is not None:
            score = torch.where(valid_d, score, 0.0)
        # Step 3. the calibrator's update
        mean_err, mult = tb.mean_err_a[idx], tb.mult_a[idx]  # (n, H), (n, L, H)
        emitted = tb.past_half_flat[half_at]  # (n, L, H)
        new_mean, new_mult, inside, half = iv.update(score, valid_d, n_errors, mean_err, mult, emitted)
        tb.mean_err_a[idx], tb.mult_a[idx] = new_mean, new_mult
        # Step 4. coverage per level and step (sums stay on the device)
        acc.count += len(slots) if valid is None else valid.sum(axis=0)
        acc.sums[0] += inside.sum(0)  # (L, H)
        acc.sums[1] += (half if valid is None else half * valid_d[:, None, :]).sum(0)  # (L, H) half-widths
        return new_mean, new_mult

    def bounds(
        self,
        slots: np.ndarray,
        count: np.ndarray,
        f: Any,
        stats: Any,
        scale: Any,
        calibrated: tuple[Any, Any] | None,
    ) -> tuple[Any, Any]:
        """Bounds (n, L, H) around the new forecasts ``f`` (n, H) made at ordinals ``count``, with the
        calibrator ``calibrated`` (``score``'s answer); keeps their centres, scales and half-widths for
        the next scores."""
        tb, scaling = self.table, self.scaling
        center = centers(scaling, f)  # (n, H) float32
        unit = units(scaling, stats) if scaling.kind == "none" else scale  # (n,)
        if tb.host_views:
            lo, hi = np.empty((2, len(slots), tb.levels, tb.horizon), np.float32)
            fused.bounds_round(
                slots, count, center, unit.astype(np.float32), tb.mean_err_a, tb.mult_a, tb.past_rows,
                tb.past_scale_flat, tb.past_half_rows, np.int64(WARMUP - 1), lo, hi,
            )  # fmt: skip
            if scaling.kind == "log":  # back to data units, capped as Intervals.bounds does
                for b in (lo, hi):
                    np.exp(np.minimum(b, 88.0, out=b), out=b)
            return lo, hi
        unit = unit.float()
        at = torch.from_numpy(slots * tb.horizon + count % tb.horizon).to(tb.device)  # (n,) ring rows
        lo, hi = self.intervals.bounds(center, unit, *calibrated, scaling)
        tb.past_rows[at] = center
        tb.past_scale_flat[at] = unit
        mean_err, mult = calibrated
        tb.past_half_rows[at] = mult * mean_err[:, None, :]  # (n, L, H) what these bounds were made with
        young = count < WARMUP - 1  # (n,) made after fewer than WARMUP values: no interval yet (null)
        if young.any():
            young = torch.from_numpy(young).to(tb.device)
            lo[young], hi[young] = float("nan"), float("nan")
        return lo, hi
