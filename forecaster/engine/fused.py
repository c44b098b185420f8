"""The calibrator's and the per-series choice's steps on a CPU table, fused: one compiled loop per round
and part instead of some forty numpy operations each (at a few series per round each operation costs more
than its arithmetic; at thousands each reads and writes (n, C or L, H) temporaries).

The same arithmetic as ``Intervals.update`` / ``Intervals.bounds`` and ``Choice.update`` / ``Choice.decide``,
in the same float32 order: the engine's bounds and choices equal the per-series references
(``reference_intervals``, ``reference_choice``: numpy) and those of a GPU table (torch), which the tests hold
them to.

Compiled on first use (numba, about a second; the engine compiles them when it is made), cached on disk
where numba finds a writable place (next to this file, the user's cache folder, or ``NUMBA_CACHE_DIR``);
compiled in each process where none is.
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


@_compiled
def _naive_value(values: np.ndarray, base: int, window: int, ordinal: int, back: int) -> np.float32:
    """The ring's value ``back`` values before ``ordinal`` (a slot's ring starts at ``base``)."""
    return values[base + (ordinal - back) % window]


@_compiled
def _seasonal_mean(
    values: np.ndarray, base: int, window: int, ordinal: int, back: int, season: int, seasons: int
) -> np.float32:
    """Mean of the values ``back``, ``back + season``, ... (``seasons`` of them) before ``ordinal``, over
    those at ordinals >= 0 (0 where none is), summed in order as ``choice.seasonal_mean``."""
    total = np.float32(0.0)
    seen = 0
    for i in range(seasons):
        b = back + season * i
        if ordinal - b >= 0:
            total += values[base + (ordinal - b) % window]
            seen += 1
    return total / np.float32(max(seen, 1))


@_compiled
def choose_score(  # noqa: PLR0913
    slots: np.ndarray,  # (n,) int64 distinct
    count: np.ndarray,  # (n,) int64 ordinals of the new values (not yet in the ring)
    choose_from: np.ndarray,  # (capacity,) int64
    v: np.ndarray,  # (n,) float64 the new values
    model_past_flat: np.ndarray,  # (capacity * H * H,) float32 the model's last H forecasts
    values_flat: np.ndarray,  # (capacity * W,) float32 ring of values
    window: int,
    season: int,
    seasons: int,  # the seasonal mean's (0: no such candidate)
    n_err: np.ndarray,  # (capacity, H) float32, updated in place
    mean: np.ndarray,  # (capacity, C, H) float32, updated in place
    sq: np.ndarray,  # (capacity, C - 1, H) float32, updated in place
    floor: np.float32,
    max_count: np.float32,
) -> None:
    """``Chooser.score`` and ``Choice.update`` for one round: every candidate's k-step forecast scored where
    all of them exist, the running means and squared differences updated."""
    candidates, horizon = mean.shape[1], mean.shape[2]
    one = np.float32(1.0)
    errors = np.empty(candidates, np.float32)
    for i in range(slots.shape[0]):
        s, c = slots[i], count[i]
        v32 = np.float32(v[i])
        base = s * window
        lag = c % horizon
        mean_at, seasonal = -1, np.float32(0.0)  # the seasonal mean read ``mean_at`` values back
        for j in range(horizon):
            k = j + 1
            cycles = season * ((k + season - 1) // season) if candidates > 2 else 0
            reach = max(k, cycles)
            if c - k < choose_from[s] or reach > window or c - reach < 0:
                continue  # some candidate's forecast does not exist
            back = lag - k
            row = back if back >= 0 else back + horizon
            errors[0] = abs(v32 - model_past_flat[(s * horizon + row) * horizon + j])
            errors[1] = abs(v32 - _naive_value(values_flat, base, window, c, k))
            if candidates > 2:
                errors[2] = abs(v32 - _naive_value(values_flat, base, window, c, cycles))
            if candidates > 3:
                if cycles != mean_at:  # the same mean for every step within one season ahead
                    mean_at = cycles
                    seasonal = _seasonal_mean(values_flat, base, window, c, cycles, season, seasons)
                errors[3] = abs(v32 - seasonal)
            count_now = min(n_err[s, j] + one, max_count)
            n_err[s, j] = count_now
            weight = one / max(count_now, one)
            weight = weight if weight > floor else floor
            for cand in range(1, candidates):
                diff = errors[0] - errors[cand]
                diff = diff * diff
                old = sq[s, cand - 1, j]
                sq[s, cand - 1, j] = (diff - old) * weight + old
            for cand in range(candidates):
                old = mean[s, cand, j]
                mean[s, cand, j] = (errors[cand] - old) * weight + old


@_compiled
def choose_pick(  # noqa: PLR0913
    slots: np.ndarray,  # (n,) int64
    count: np.ndarray,  # (n,) int64 ordinals of the new values (now in the ring)
    f: np.ndarray,  # (n, H) float32 the model's forecasts: kept, and replaced in place where a series switches
    model_past_rows: np.ndarray,  # (capacity * H, H) float32, written
    values_flat: np.ndarray,  # (capacity * W,) float32
    window: int,
    season: int,
    seasons: int,
    n_err: np.ndarray,  # (capacity, H) float32
    mean: np.ndarray,  # (capacity, C, H) float32
    sq: np.ndarray,  # (capacity, C - 1, H) float32
    min_errors: np.float32,
    margin: np.float32,
    z2: np.float32,
    effective: np.float32,
) -> None:
    """``Chooser.pick`` and ``Choice.decide`` for one round: the model's forecasts kept for the next scores,
    and per step the naive forecast emitted instead where it wins by the margin and by more than noise."""
    candidates, horizon = mean.shape[1], mean.shape[2]
    one = np.float32(1.0)
    inf = np.float32(np.inf)
    for i in range(slots.shape[0]):
        s, c = slots[i], count[i]
        at = s * horizon + c % horizon
        for j in range(horizon):
            model_past_rows[at, j] = f[i, j]
        base = s * window
        for j in range(horizon):
            n = n_err[s, j]
            if n < min_errors:
                continue  # fewer than min_errors: the model's
            k = j + 1
            worth = min(n, effective) / np.float32(k)
            worth = worth if worth > one else one
            weight = worth + z2
            cycles = season * ((k + season - 1) // season) if candidates > 2 else 0
            best_err = inf
            best = 0
            for cand in range(1, candidates):
                if cand > 1 and c - (cycles - k) < 0:
                    continue  # a young series' seasonal forecast reads before its first value
                m = mean[s, cand, j]
                gain = mean[s, 0, j] - m
                if gain > m * margin and gain * gain * weight > sq[s, cand - 1, j] * z2 and m < best_err:
                    best_err, best = m, cand
            if best == 1:
                f[i, j] = values_flat[base + c % window]
            elif best == 2:
                f[i, j] = _naive_value(values_flat, base, window, c, cycles - k)
            elif best == 3:
                f[i, j] = _seasonal_mean(values_flat, base, window, c, cycles - k, season, seasons)
