"""The per-series choice in the engine's step: each new value scores every candidate's forecasts its series
made 1..H values before it (``score``, before the value enters the ring of values), and the new forecast is
picked per step (``pick``, after the recurrent step).

What a series keeps for this lives in the state table (the model's last H forecasts, the means, the squared
differences, the counts); ``Choice`` in ``forecaster.engine.choice`` holds the method, this module only the
reads and writes around it: on a CPU table two compiled loops (``forecaster.engine.fused``), on a GPU table
tensor operations.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from forecaster.engine import fused
from forecaster.engine.choice import (
    CANDIDATES,
    MAX_COUNT,
    Choice,
    averaged_seasons,
    mean_backs,
    seasonal_mean,
)
from forecaster.engine.intervals import lag_rows


@functools.cache
def _model_rows(horizon: int) -> np.ndarray:
    """Row j: where in a series' ring of model forecasts (H x H, flat) the k-step forecast made k = 1..H
    values before ordinal j sits, ``lag_rows(H)[j] * H + k - 1`` (H, H)."""
    return lag_rows(horizon) * horizon + np.arange(horizon)


class Chooser:
    """The choice's reads and writes of a state ``table`` (with ``choice``) for one round of distinct
    ``slots``: ``score`` before the value is written to the ring, ``pick`` after the recurrent step."""

    def __init__(self, choice: Choice, table: Any) -> None:
        self.choice = choice
        self.table = table
        if table.host_views:  # compile both loops now, not in the first round
            none = np.zeros(0, np.int64)
            self.score(none, None, none, np.zeros(0))
            self.pick(none, none, np.zeros((0, table.horizon), np.float32), None)

    def _ring_shape(self) -> tuple[int, int, int]:
        """Window, season and seasons averaged by the seasonal mean (0 without it) of the table."""
        tb = self.table
        seasons = averaged_seasons(tb.season, tb.horizon, tb.window_size) if tb.candidates > 3 else 0
        return tb.window_size, max(tb.season, 1), seasons

    @staticmethod
    @functools.cache
    def _backs(horizon: int, season: int, candidates: int) -> tuple[np.ndarray, np.ndarray]:
        """How far back from a value (its ordinal j) the naive forecasts read, (C - 1, H) each: those made
        k values before j that targeted it (``scored``: k; season * ceil(k / season)), and those made at j
        (``emitted``: 0; season * ceil(k / season) - k); for the seasonal mean, its newest season (it exists
        where that does)."""
        k = np.arange(1, horizon + 1)
        cycles = season * -(-k // season)  # (H,)
        scored = np.stack([k, cycles, cycles][: candidates - 1])  # (C - 1, H)
        emitted = np.stack([np.zeros_like(k), cycles - k, cycles - k][: candidates - 1])  # (C - 1, H)
        return scored, emitted

    def _naive(self, slots: np.ndarray, count: np.ndarray, which: int) -> torch.Tensor:
        """The naive candidates' forecasts (n, C - 1, H) float32 (a GPU table's tensors), re-read from the
        ring of values: those made 1..H values before each slot's ordinal ``count`` for it (``which`` 0), or
        those made at it (1)."""
        tb = self.table
        device, c = tb.device, tb.candidates
        single = self._backs(tb.horizon, tb.season, c)[which][:2]  # (<= 2, H) one value each
        got = tb.values_flat[torch.from_numpy(self._ring(slots, count, single)).to(device)]  # (n, <= 2, H)
        if c < 4:
            return got
        back, steps = self._distinct(tb.horizon, tb.season, tb.window_size, which)  # (m, U), (H,)
        at = torch.from_numpy(self._ring(slots, count, back)).to(device)  # (n, m, U)
        mean = seasonal_mean(tb.values_flat[at], back, count)[:, torch.from_numpy(steps).to(device)]  # (n, H)
        return torch.cat([got, mean[:, None]], 1)

    @staticmethod
    @functools.cache
    def _distinct(horizon: int, season: int, window: int, which: int) -> tuple[np.ndarray, np.ndarray]:
        """The seasonal mean's reads (``mean_backs``) without repeats, (m, U), and for each step the column
        it takes (H,): the forecasts for one target made 1..season values before it are all the same mean,
        so scoring reads ceil(H / season) of them, not H."""
        back = mean_backs(horizon, season, averaged_seasons(season, horizon, window))[which]  # (m, H)
        distinct, steps = np.unique(back, axis=1, return_inverse=True)
        return np.ascontiguousarray(distinct), steps.reshape(-1)

    @staticmethod
    @functools.lru_cache(maxsize=16)  # a few per table shape; up to W x (C - 1) x H int64 each
    def _phase_table(window: int, back: bytes, shape: tuple[int, int]) -> np.ndarray | None:
        """``(j - back) mod window`` for every phase j of the ring: (W, C - 1, H), looked up by ``count % W``
        (one gather instead of several passes); None for windows too long to tabulate."""
        if window > 1 << 13:
            return None
        offsets = np.frombuffer(back, dtype=np.int64).reshape(shape)
        return (np.arange(window)[:, None, None] - offsets) % window

    def _ring(self, slots: np.ndarray, count: np.ndarray, back: np.ndarray) -> np.ndarray:
        """Flat ring positions of the values ``back`` (C - 1, H) before each slot's ordinal ``count``."""
        w = self.table.window_size
        table = self._phase_table(w, back.tobytes(), back.shape)
        if table is not None:
            return table[count % w] + (slots * w)[:, None, None]
        pos = (count % w)[:, None, None] - back  # (n, C - 1, H)
        pos %= w
        return pos + (slots * w)[:, None, None]

    def score(self, slots: np.ndarray, idx: Any, count: np.ndarray, v: Any) -> tuple[Any, Any, Any] | None:
        """Score value ``v`` (n,) of each slot (its ordinal: ``count``) against every candidate's forecasts
        made 1..H values before it, and fold the errors into the slot's means; returns the new counts, means
        and squared differences (``pick``'s ``scored``; None on the host, where ``pick`` reads the table)."""
        tb, choice = self.table, self.choice
        if tb.host_views:  # one compiled loop (the same arithmetic, in the same order)
            fused.choose_score(
                slots, count, tb.choose_from, v, tb.model_past_flat, tb.values_flat, *self._ring_shape(),
                tb.choice_n_a, tb.choice_err_a, tb.choice_sq_a, np.float32(choice.floor), np.float32(MAX_COUNT),
            )  # fmt: skip
            return None
        horizon, w, device = tb.horizon, tb.window_size, tb.device
        back, _ = self._backs(horizon, tb.season, tb.candidates)  # (C - 1, H)
        # Step 1. where every candidate's forecast exists: the model's since choose_from, the values in the ring
        k = back[0]
        reach = int(back.max())
        valid = None
        if reach > w or int((count - tb.choose_from[slots]).min()) < max(reach, horizon):  # some do not
            valid = (count[:, None] - k >= tb.choose_from[slots][:, None]) & (back.max(axis=0) <= w)
            valid &= (count[:, None] - back.max(axis=0)) >= 0  # (n, H)
            valid = torch.from_numpy(valid).to(device)
        # Step 2. the forecasts: the model's from its ring, the naive ones re-read from the ring of values
        model_at = _model_rows(horizon)[count % horizon] + (slots * (horizon * horizon))[:, None]  # (n, H)
        naive = self._naive(slots, count, 0)  # (n, C - 1, H)
        past = torch.cat([tb.model_past_flat[torch.from_numpy(model_at).to(device)][:, None], naive], dim=1)
        errors = (v.float()[:, None, None] - past).abs()  # (n, C, H) float32
        # Step 3. the running means
        n, mean, sq = choice.update(
            errors, valid, tb.choice_n_a[idx], tb.choice_err_a[idx], tb.choice_sq_a[idx]
        )
        tb.choice_n_a[idx], tb.choice_err_a[idx], tb.choice_sq_a[idx] = n, mean, sq
        return n, mean, sq

    def pick(self, slots: np.ndarray, count: np.ndarray, f: Any, scored: tuple[Any, Any, Any] | None) -> Any:
        """Keep the model's forecasts ``f`` (n, H) made at ordinals ``count`` for the next scores, and
        return what each series emits (n, H) float32 (``scored``: ``score``'s answer for these slots)."""
        tb, choice = self.table, self.choice
        if tb.host_views:
            f = np.ascontiguousarray(f, dtype=np.float32)
            fused.choose_pick(
                slots, count, f, tb.model_past_rows, tb.values_flat, *self._ring_shape(), tb.choice_n_a,
                tb.choice_err_a, tb.choice_sq_a, np.float32(choice.min_errors), np.float32(choice.margin),
                np.float32(choice.z * choice.z), np.float32(choice.effective),
            )  # fmt: skip
            return f
        horizon, device = tb.horizon, tb.device
        tb.model_past_rows[torch.from_numpy(slots * horizon + count % horizon).to(device)] = f  # ring rows
        n, mean, sq = scored  # (n, H), (n, C, H), (n, C - 1, H)
        _, ahead = self._backs(horizon, tb.season, tb.candidates)  # (C - 1, H) offsets from the newest value
        naive = self._naive(slots, count, 1)  # (n, C - 1, H)
        if int(count.min()) < int(
            ahead.max()
        ):  # a young series' seasonal naive forecast reads before its first
            gone = np.zeros(mean.shape, bool)  # (n, C, H)
            gone[:, 1:] = count[:, None, None] - ahead < 0
            mean = torch.where(torch.from_numpy(gone).to(device), float("inf"), mean)
        return choice.pick(f, naive, mean, sq, n)

    def source_index(self, slots: np.ndarray) -> np.ndarray:
        """Where the last forecast of each of ``slots`` (each with a value) came from, per step: 0 the
        model, 1 the last value, 2 seasonal naive, 3 the seasonal mean (n, H) int64 (what ``pick`` decided)."""
        tb = self.table
        idx = torch.from_numpy(slots).to(tb.device)
        mean = tb.choice_err.index_select(0, idx).cpu().numpy()  # (n, C, H)
        sq = tb.choice_sq.index_select(0, idx).cpu().numpy()  # (n, C - 1, H)
        n = tb.choice_n.index_select(0, idx).cpu().numpy()  # (n, H)
        _, ahead = self._backs(tb.horizon, tb.season, tb.candidates)  # (C - 1, H)
        made = tb.count[slots] - 1  # (n,) ordinal the last forecast was made at
        mean[:, 1:][made[:, None, None] - ahead < 0] = np.inf  # as pick: what reads before the first value
        switch, best = self.choice.decide(mean, sq, n)  # (n, H)
        return np.where(switch, best + 1, 0)

    def source_names(self, slots: np.ndarray) -> list[list[str]]:
        """``source_index`` as candidate names, per slot and step."""
        return [[CANDIDATES[c] for c in row] for row in self.source_index(slots).tolist()]

    def sources(self) -> dict[tuple[int, str], int]:
        """How many resident series emit each candidate at step 1 and the last step: ``{(step, source):
        count}`` (the metrics read it between batches)."""
        tb = self.table
        slots = tb.occupied()
        slots = slots[tb.count[slots] > 0]
        steps = sorted({1, tb.horizon})
        counts = np.zeros((tb.candidates, len(steps)), dtype=np.int64)
        if len(slots):
            source = self.source_index(slots)[:, np.array(steps) - 1]  # (n, S)
            for j in range(len(steps)):
                counts[:, j] = np.bincount(source[:, j], minlength=tb.candidates)
        return {
            (step, CANDIDATES[c]): int(counts[c, j])
            for c in range(tb.candidates)
            for j, step in enumerate(steps)
        }
