"""A step is a period: where each value of a series falls on its time grid, written once for the engine,
the trainer and replay.

A series with a period ``P`` (epoch ms) advances one step per period. A value that arrives ``dt`` after the
newest value seen of its series (a late one aside) is ``k = round(dt / P)`` periods on (``grid_steps``):
``k = 0`` is the same period again, dropped as a duplicate (the value stepped first keeps its period: a
forecast was already emitted from it); ``k > 1`` leaves ``k - 1`` missing periods, stepped through with
imputed values (``impute``) before the value itself. Values off the grid by less than half a period snap
to it, and each spacing is measured from the newest value seen, so calendar months (28 to 31 days) stay
one period each without drifting. A gap of more than ``max_gap_periods`` missing periods is not stepped
through period by period: only ``(k - 1) mod season`` of it is, which keeps the season's phase at a bounded
cost, and the gap counts as a restart.

A series without a stable spacing has no period (``0``): each value is one step, as it comes.

>>> ts = np.array([0, 10, 20, 50, 61, 70])  # 30 and 40 are missing; 61 snaps to 60
>>> estimate_period(ts)
10
>>> grid = to_grid(ts, np.array([1.0, 2.0, 3.0, 6.0, 7.0, 8.0]), 10, season=1)
>>> grid.values.tolist(), grid.missing.tolist()
([1.0, 2.0, 3.0, 3.0, 3.0, 6.0, 7.0, 8.0], [False, False, False, True, True, False, False, False])
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Spacings a series shows before its own period is settled (the median of these).
LEARN_SPACINGS = 8
# A spacing counts as whole periods when it is within this fraction of a period of a whole number of them
# (two values each off the grid by up to a twentieth of a period; wider, and event times look periodic).
TOLERANCE = 0.1
# Share of spacings that must be whole periods for the series to have a period at all.
STABLE_SHARE = 0.75
# A period under which most periods would be missing explains nothing (every spacing is a multiple of 1 ms):
# at most this many periods per spacing on average.
MAX_MEAN_STEPS = 2.0
DEFAULT_MAX_GAP = 256

_UNITS = {"ms": 1, "s": 1_000, "min": 60_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_period(text: str) -> int:
    """A duration (``"1h"``, ``"30min"``, ``"15m"``, ``"1d"``, ``"500ms"``, or whole milliseconds) in ms.

    >>> parse_period("30min"), parse_period("1h"), parse_period("3600000")
    (1800000, 3600000, 3600000)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d|w)?\s*", text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (e.g. 1h, 30min, 15m, 1d, or milliseconds)")
    ms = float(match.group(1)) * _UNITS[match.group(2) or "ms"]
    if not 1 <= ms < 2**62:
        raise ValueError(f"a period must be at least 1 ms: {text!r}")
    return int(round(ms))


def resolve_period(setting: str, manifest_period: int | None) -> int | None:
    """What an engine's ``period_ms`` is for ``state.period``: ``"auto"`` the checkpoint's period (None:
    each series learns its own), ``"none"`` 0 (value by value), else the duration given.

    >>> resolve_period("auto", 3600000), resolve_period("auto", None), resolve_period("none", 60000)
    (3600000, None, 0)
    """
    if setting == "auto":
        return manifest_period if manifest_period and manifest_period > 0 else None
    if setting == "none":
        return 0
    return parse_period(setting)


def whole_periods(dt: np.ndarray, period: np.ndarray) -> np.ndarray:
    """``round(dt / period)`` for int64 ``dt`` >= 0 and ``period`` > 0 (halves round up), exactly."""
    return (2 * dt + period) // (2 * period)


def estimate_period(ts: np.ndarray) -> int:
    """The period of a series from its (increasing) timestamps: the median spacing (else, where gaps
    outnumber the rest, the lower quartile or the shortest spacing), when at least ``STABLE_SHARE`` of the
    spacings are whole multiples of it (gaps are) and at least half its periods hold a value; else 0 (no
    stable period).

    >>> estimate_period(np.array([0, 5, 17, 18, 40])), estimate_period(np.array([0, 3600, 10800]))
    (0, 3600)
    """
    dt = np.diff(np.asarray(ts, dtype=np.int64))
    dt = dt[dt > 0]
    if len(dt) == 0:
        return 0
    for candidate in (np.median(dt), np.percentile(dt, 25, method="lower"), dt.min()):
        period = int(candidate)
        if period <= 0:
            continue
        ratio = dt / period
        steps = np.round(ratio)
        whole = (np.abs(ratio - steps) <= TOLERANCE) & (steps >= 1)
        if whole.mean() >= STABLE_SHARE and steps.mean() <= MAX_MEAN_STEPS:
            return period
    return 0


def history_period(ts: list[np.ndarray]) -> int:
    """The period most series of a history have (``estimate_period`` each), 0 when none has one: what a
    checkpoint records for the series the service meets."""
    periods = [p for p in (estimate_period(t) for t in ts if len(t) > 2) if p > 0]
    if not periods:
        return 0
    values, counts = np.unique(np.array(periods, dtype=np.int64), return_counts=True)
    return int(values[np.argmax(counts)])


def grid_steps(
    dt: np.ndarray, period: np.ndarray, max_gap: int, season: int | np.ndarray = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each new value ``dt`` ms after the newest one seen of its series (``period`` 0: no period):
    whether it steps (a later period; without a period, any ``dt > 0``), the missing periods to step
    through before it, and whether its gap was too long (``max_gap``) and stepped through only
    ``mod season``. All (n,) arrays."""
    dt = np.asarray(dt, dtype=np.int64)
    period = np.asarray(period, dtype=np.int64)
    has = period > 0
    k = np.where(has, whole_periods(np.maximum(dt, 0), np.where(has, period, 1)), (dt > 0).astype(np.int64))
    steps = k >= 1
    missing = np.maximum(k - 1, 0)
    restart = missing > max_gap
    if restart.any():
        season = np.broadcast_to(np.asarray(season, dtype=np.int64), missing.shape)
        missing = np.where(restart, missing % np.maximum(season, 1), missing)
    return steps, missing, restart


def impute_reach(season: int) -> int:
    """How many values before a missing period ``impute`` reads: two seasons (one without a season)."""
    return 2 * season if season > 1 else 1


def impute(recent: Any, season: int, positive: bool = False) -> Any:
    """The values missing periods take, from ``recent`` (n, L): the values before each, newest last, as
    float32 holds them, NaN before a series' first (numpy or torch). With ``L >= 2 * season`` values held:
    the value one season earlier moved by the change of level since (the mean of the last season minus
    the mean of the season before it; a trending series keeps its level, a flat one its pattern); with one
    season: the value one season earlier; else (or ``season`` 1) the last value. -> (n,)

    Measured (``bench/quality.py --gaps 5 --quick``): on 24 monthly employment series the gapped run's
    MASE over the gapless one was 1.09 at h1 with this rule and 1.23 with the plain value a season earlier.
    The engine reads at most its ring (``state.window``): a window under two seasons fills as with one.
    ``positive`` (log scaling): the same on the logarithms, so the level moves by a ratio and the value
    stays positive."""
    lib = np if isinstance(recent, np.ndarray) else torch
    if positive:
        return lib.exp(impute(lib.log(recent), season))
    out = recent[:, -1]
    width = recent.shape[1]
    if season <= 1 or width < season:
        return out
    same = recent[:, -season]
    out = lib.where(lib.isfinite(same), same, out)
    if width < 2 * season:
        return out
    moved = same + recent[:, -season:].mean(1) - recent[:, -2 * season : -season].mean(1)
    return lib.where(lib.isfinite(moved), moved, out)


@dataclass
class Grid:
    """One series on its time grid: the values (missing ones imputed), which were missing, the grid time
    of each position, and where each stepped input value landed (-1: dropped, same period)."""

    values: np.ndarray  # (G,) float64
    missing: np.ndarray  # (G,) bool
    ts: np.ndarray  # (G,) int64: the value's ts, or for a missing period the ts before it + k periods
    position: np.ndarray  # (n,) int64 per input value
    restarts: int = 0


def to_grid(
    ts: np.ndarray,
    values: np.ndarray,
    period: int,
    season: int = 1,
    max_gap: int = DEFAULT_MAX_GAP,
) -> Grid:
    """Put one series (``ts`` increasing) on its grid as the engine steps it: ``grid_steps`` from each
    value's predecessor, missing periods filled by ``impute`` over the values before them (the engine
    reads its ring of values the same way). ``period`` 0: every value one step."""
    ts = np.asarray(ts, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    n = len(ts)
    if n == 0:
        return Grid(values.copy(), np.zeros(0, bool), ts.copy(), np.zeros(0, np.int64))
    dt = np.diff(ts)
    steps, missing, restart = grid_steps(dt, np.full(n - 1, period, np.int64), max_gap, season)
    advance = np.concatenate(([1], np.where(steps, missing + 1, 0)))  # grid positions each value moves
    end = np.cumsum(advance)
    position = np.where(np.concatenate(([True], steps)), end - 1, -1)
    size = int(end[-1])
    out = np.full(size, np.nan)
    gap = np.ones(size, dtype=bool)
    kept = position >= 0
    out[position[kept]] = values[kept]
    gap[position[kept]] = False
    grid_ts = np.empty(size, dtype=np.int64)
    grid_ts[position[kept]] = ts[kept]
    reach = impute_reach(season)
    held = np.concatenate((np.full(reach, np.nan), out.astype(np.float32).astype(np.float64)))
    for p in np.flatnonzero(gap).tolist():  # increasing: an imputed value may read an earlier one
        out[p] = impute(held[None, p : p + reach], season)[0]
        held[reach + p] = np.float32(out[p])
        grid_ts[p] = grid_ts[p - 1] + max(period, 1)
    return Grid(out, gap, grid_ts, position.astype(np.int64), int(restart[steps].sum()))
