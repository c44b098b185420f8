"""The calibrator's step on a CPU table, fused: one compiled loop per round instead of some forty numpy
operations (at a few series per round each costs more than its arithmetic; at thousands each reads and
writes (n, L, H) temporaries). The same arithmetic as ``Intervals.update`` and ``Intervals.bounds``, in the
same float32 order: the engine's bounds equal the per-series reference (``reference_intervals``, numpy)
and the GPU table's (torch), which the tests hold it to.

Compiled on first use (numba, about a second), cached on disk where numba finds a writable place (next to
this file, the user's cache folder, or ``NUMBA_CACHE_DIR``); compiled in each process where none is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # nowhere to cache ("no locator available"): compiled in each process
        return numba.njit(nogil=True)(fn)


@_compiled
def score_round(  # noqa: PLR0913 - a kernel: every array it reads and writes
    slots: np.ndarray,  # (n,) int64 distinct
    count: np.ndarray,  # (n,) int64 values each slot stepped before this one
    score_from: np.ndarray,  # (capacity,) int64
    inner_v: np.ndarray,  # (n,) float64 the new values in ``inner`` units
    past_flat: np.ndarray,  # (capacity * H * H,) float32 centres
    past_scale_flat: np.ndarray,  # (capacity * H,) float32
    past_half_flat: np.ndarray,  # (capacity * H * L * H,) float32 emitted half-widths
    mean_err: np.ndarray,  # (capacity, H) float32, updated in place
    mult: np.ndarray,  # (capacity, L, H) float32, updated in place
    up: np.ndarray,  # (L,) float32 lr * (1 - alpha)
    lr: np.float32,
    floor: np.float32,
    cover_count: np.ndarray,  # (H,) int64, added to
    cover_sums: np.ndarray,  # (2, L, H) float64, added to: inside, half-widths
) -> None:
    n = slots.shape[0]
    levels, horizon = mult.shape[1], mult.shape[2]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for i in range(n):
        s = slots[i]
        c = count[i]
        first = c - score_from[s]  # errors at step 1 with this one
        base = s * horizon
        lag = c % horizon  # ring row of the forecast made at ordinal c; j + 1 values before it: lag - j - 1
        for j in range(min(horizon, first)):  # n_err > 0: the forecasts made since score_from
            n_err = first - j
            back = lag - j - 1
            row = base + (back if back >= 0 else back + horizon)
            score = np.float32(abs(inner_v[i] - past_flat[row * horizon + j]) / past_scale_flat[row])
            cover_count[j] += 1
            for lv in range(levels):
                half = past_half_flat[(row * levels + lv) * horizon + j]
                m = mult[s, lv, j] + up[lv]
                if score <= half:
                    m = m - lr
                    cover_sums[0, lv, j] += 1.0
                cover_sums[1, lv, j] += half
                mult[s, lv, j] = m if m > zero else zero
            weight = one / np.float32(n_err)
            weight = weight if weight > floor else floor
            mean = mean_err[s, j]
            mean_err[s, j] = mean + weight * (score - mean)


@_compiled
def bounds_round(  # noqa: PLR0913
    slots: np.ndarray,  # (n,) int64
    count: np.ndarray,  # (n,) int64 ordinals of the new forecasts
    center: np.ndarray,  # (n, H) float32 in ``inner`` units
    unit: np.ndarray,  # (n,) float32 scales
    mean_err: np.ndarray,  # (capacity, H) float32
    mult: np.ndarray,  # (capacity, L, H) float32
    past_rows: np.ndarray,  # (capacity * H, H) float32, written
    past_scale_flat: np.ndarray,  # (capacity * H,) float32, written
    past_half_rows: np.ndarray,  # (capacity * H, L, H) float32, written
    young: np.int64,  # forecasts made at ordinals below this have no bounds (NaN)
    lower: np.ndarray,  # (n, L, H) float32, written: in ``inner`` units
    upper: np.ndarray,  # (n, L, H) float32, written
) -> None:
    n = slots.shape[0]
    levels, horizon = mult.shape[1], mult.shape[2]
    nan = np.float32(np.nan)
    for i in range(n):
        s = slots[i]
        at = s * horizon + count[i] % horizon
        scale = unit[i]
        past_scale_flat[at] = scale
        for j in range(horizon):
            past_rows[at, j] = center[i, j]
        for lv in range(levels):
            for j in range(horizon):
                m = mult[s, lv, j]
                mean = mean_err[s, j]
                past_half_rows[at, lv, j] = m * mean
                half = m * (mean * scale)
                lower[i, lv, j] = center[i, j] - half
                upper[i, lv, j] = center[i, j] + half
        if count[i] < young:  # made after fewer than WARMUP values: no interval yet (null)
            lower[i] = nan
            upper[i] = nan


def compile_for(table: Any) -> None:
    """Compile (or load from the cache) both loops for ``table``'s arrays now, with no series: the first
    round then does not wait for it."""
    none = np.zeros(0, np.int64)
    levels, horizon = table.levels, table.horizon
    score_round(
        none, none, table.score_from, np.zeros(0), table.past_flat, table.past_scale_flat,
        table.past_half_flat, table.mean_err_a, table.mult_a, np.zeros(levels, np.float32), np.float32(0.0),
        np.float32(0.0), np.zeros(horizon, np.int64), np.zeros((2, levels, horizon)),
    )  # fmt: skip
    out = np.zeros((0, levels, horizon), np.float32)
    bounds_round(
        none, none, np.zeros((0, horizon), np.float32), np.zeros(0, np.float32), table.mean_err_a,
        table.mult_a, table.past_rows, table.past_scale_flat, table.past_half_rows, np.int64(0), out, out,
    )  # fmt: skip
