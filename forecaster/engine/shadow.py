"""Shadow: a challenger model stepped beside the champion on the same values, scored side by side.

``Shadow`` holds a second ``Engine`` (the challenger's own state table). It starts as a swap would:
every series the champion holds is copied over (retained window, scaling statistics, counts) and
re-warmed with the challenger over its window. Then each batch the champion steps is stepped by the
challenger too, batched the same way; a series that comes back to the champion later (revived, or
restored) is copied over the same way before it steps. Only the champion's forecasts leave the service.

``PairedScore`` pairs the two models' absolute errors on the same values at step 1 and at the last step
(the forecast made that many values earlier). The decision (``verdict``) is a paired comparison: with
``d = |champion error| - |challenger error|`` over ``n`` values, the challenger wins a step when
``mean(d) > z * sd(d) / sqrt(n)``; it is promoted once it wins both steps with at least ``min_values``
values scored at each, and rejected after ``max_values`` values at step 1 without that win. ``z`` is 3 by
default: errors of one series are correlated from value to value, so the standard error is optimistic and
the margin is kept wide.

The second table costs what the first does without the interval calibrator (``Engine.state_bytes``;
the challenger's forecasts are never sent, so it computes no bounds and its coverage is not compared),
and the challenger holds only series the champion holds (``prune``), so shadowing at most doubles the
state memory.

>>> import torch
>>> from forecaster.model import RecurrentForecaster
>>> torch.manual_seed(0) and None
>>> champion = Engine(RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2), "v1", window=8)
>>> shadow = Shadow(champion, RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2), "v2")
>>> for t in range(1, 6):
...     n = shadow.before(["a"]); out = champion.process(["a"], [t], [float(t)])
...     _ = shadow.observe(["a"], [t], [float(t)], out)
>>> shadow.score.count(1), shadow.score.count(2)  # values scored at step 1 and at the last step
(4, 3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from forecaster.engine.engine import Engine, EngineOutput
from forecaster.model import RecurrentForecaster

_CHUNK = 8192  # series copied per call when the shadow starts


@dataclass
class StepScore:
    """Paired figures at one step: values scored, each model's MAE, the mean difference and its z."""

    step: int
    count: int
    mae_champion: float
    mae_challenger: float
    rmse_champion: float
    rmse_challenger: float
    mean_difference: float  # mean(|champion error| - |challenger error|): > 0 when the challenger is better
    z: float  # mean_difference over its standard error

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
            for k, v in vars(self).items()
        }


class PairedScore:
    """Both models' absolute errors on the same values at step 1 and at the last step ``horizon``, paired.

    Rows are keyed by the challenger's table slot (``forget`` when a slot changes hands). Kept: each
    model's last step-1 forecast and a ring of its last ``horizon`` last-step forecasts per slot.
    """

    def __init__(self, horizon: int, capacity: int = 1024) -> None:
        self.horizon = horizon
        self.steps = sorted({1, horizon})
        self.seen = np.zeros(0, dtype=np.int64)
        self.prev = np.zeros((2, 0))  # (model, slot) step-1 forecast made after the last value
        self.ring = np.zeros((2, 0, horizon))  # (model, slot, k) last-step forecast made after value k mod H
        self._grow(capacity)
        # per step: n, sum |e champion|, sum |e challenger|, sum d, sum d^2, sum e champion^2, ... challenger^2
        self.sums = {step: np.zeros(7) for step in self.steps}

    def _grow(self, capacity: int) -> None:
        old = len(self.seen)
        if capacity <= old:
            return
        self.seen = np.concatenate([self.seen, np.zeros(capacity - old, dtype=np.int64)])
        self.prev = np.concatenate([self.prev, np.zeros((2, capacity - old))], axis=1)
        self.ring = np.concatenate([self.ring, np.zeros((2, capacity - old, self.horizon))], axis=1)

    def add(
        self, slots: np.ndarray, values: np.ndarray, champion: np.ndarray, challenger: np.ndarray
    ) -> None:
        """Score one batch: rows in stepped order (a series' values in order), ``champion`` and
        ``challenger`` the (n, horizon) forecasts each model made after each row's value."""
        if not len(slots):
            return
        self._grow(int(slots.max()) + 1)
        forecasts = np.stack([champion, challenger]).astype(np.float64)  # (2, n, H)
        if len(np.unique(slots)) == len(slots):  # one value per series: one round
            self._round(slots, values, forecasts)
            return
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        first = np.concatenate(([True], sorted_slots[1:] != sorted_slots[:-1]))
        starts = np.flatnonzero(first)
        rank = np.empty(len(slots), dtype=np.int64)
        rank[order] = np.arange(len(slots)) - np.repeat(starts, np.diff(np.append(starts, len(slots))))
        for r in range(int(rank.max()) + 1):  # the k-th value of each series, in turn
            rows = np.flatnonzero(rank == r)
            self._round(slots[rows], values[rows], forecasts[:, rows])

    def forget(self, slots: np.ndarray) -> None:
        """These slots change hands (freed, or given a series anew): their history starts afresh."""
        self._grow(int(np.max(slots, initial=-1)) + 1)
        self.seen[slots] = 0

    def _round(self, s: np.ndarray, v: np.ndarray, f: np.ndarray) -> None:
        n = self.seen[s]
        h = self.horizon
        for step in self.steps:
            ok = n >= step
            if not ok.any():
                continue
            # (2, m): the forecast made one value ago, or ``h`` values ago
            made = self.prev[:, s[ok]] if step == 1 else self.ring[:, s[ok], n[ok] % h]
            errors = np.abs(v[ok][None, :] - made)  # (2, m)
            d = errors[0] - errors[1]
            squares = (errors * errors).sum(axis=1)
            self.sums[step] += (len(d), errors[0].sum(), errors[1].sum(), d.sum(), d @ d, *squares)
        self.prev[:, s] = f[:, :, 0]
        self.ring[:, s, n % h] = f[:, :, h - 1]
        self.seen[s] = n + 1

    def count(self, step: int) -> int:
        return int(self.sums[step][0])

    def stats(self, step: int) -> StepScore:
        n, abs_champion, abs_challenger, sum_d, sum_d2, sq_champion, sq_challenger = self.sums[step].tolist()
        if n == 0:
            return StepScore(step, 0, *([math.nan] * 6))
        mean = sum_d / n
        var = max(sum_d2 / n - mean * mean, 0.0) * n / max(n - 1.0, 1.0)
        se = math.sqrt(var / n)
        z = mean / se if se > 0 else (math.inf if mean > 0 else (-math.inf if mean < 0 else 0.0))
        return StepScore(
            step,
            int(n),
            abs_champion / n,
            abs_challenger / n,
            math.sqrt(sq_champion / n),
            math.sqrt(sq_challenger / n),
            mean,
            z,
        )


def _pairing(champion: np.ndarray, challenger: np.ndarray) -> np.ndarray | bool | None:
    """Which challenger row holds the value of each champion row (both list the input rows they stepped;
    within a round each engine orders them by its own slots): True when in the same order, None when
    they stepped different values."""
    if len(champion) != len(challenger):
        return None
    if np.array_equal(champion, challenger):
        return True
    a, b = np.argsort(champion, kind="stable"), np.argsort(challenger, kind="stable")
    if not np.array_equal(champion[a], challenger[b]):
        return None
    pos = np.empty(len(champion), dtype=np.int64)
    pos[a] = b
    return pos


class Shadow:
    """The challenger ``model`` (version ``version``) stepped beside ``champion``; see the module docstring."""

    def __init__(
        self,
        champion: Engine,
        model: RecurrentForecaster,
        version: str,
        *,
        min_values: int = 1000,
        max_values: int = 50_000,
        z: float = 3.0,
        coverage: bool = False,
    ) -> None:
        self.champion = champion
        self.version = version
        self.champion_version = champion.version
        self.min_values = min_values
        self.max_values = max_values
        self.z = z
        tb = champion.table
        self.challenger = Engine(
            model,
            version=version,
            device=champion.device,
            window=tb.window_size,
            capacity=max(tb.capacity, 16),
            # It never evicts on its own: it holds what the champion holds (``before``, ``prune``), so a
            # slot changes hands only where this class says so (``PairedScore.forget``).
            max_series=1 << 62,
            ttl_seconds=champion.ttl_seconds,
            scaling=champion.scaling,
            clock=champion.clock,
            # Its forecasts are scored, never sent: bounds only to compare interval coverage (``coverage``).
            intervals=champion.intervals if coverage else None,
            choice=champion.choice,  # each serves what its series pick, so the trial compares those
        )
        # The champion's coverage counts so far: the trial compares what both score from now on.
        self._coverage_from = champion.coverage.get(champion.version) if coverage else None
        self.score = PairedScore(model.horizon, capacity=self.challenger.table.capacity)
        self.unpaired_batches = 0  # batches the two engines stepped differently (not scored)
        names = list(tb.slots)
        for lo in range(0, len(names), _CHUNK):
            self.adopt(names[lo : lo + _CHUNK])

    # ---- the hot path --------------------------------------------------------------------------------

    def before(self, series: Sequence[str]) -> int:
        """Before the champion steps ``series``: those it holds and the challenger does not are copied
        over and re-warmed. Returns how many."""
        mine, theirs = self.challenger.table.slots, self.champion.table.slots
        missing = [s for s in dict.fromkeys(series) if s not in mine and s in theirs]
        if missing:
            self.adopt(missing, keep=series)
        return len(missing)

    def observe(
        self, series: Sequence[str], ts: Sequence[int], values: Sequence[float], champion_out: EngineOutput
    ) -> EngineOutput:
        """Step the challenger over the batch the champion just stepped, and score both."""
        out = self.challenger.process(series, ts, values)
        pos = _pairing(champion_out.index, out.index)
        if pos is None:
            self.unpaired_batches += 1  # the two stepped different values: not scored
            return out
        mine = self.challenger.table.slots
        slots = np.fromiter(map(mine.__getitem__, champion_out.series), np.int64, len(champion_out))
        v = np.asarray(values, dtype=np.float64).reshape(-1)[champion_out.index]
        chal = np.asarray(out.forecasts)
        self.score.add(slots, v, np.asarray(champion_out.forecasts), chal if pos is True else chal[pos])
        return out

    # ---- between batches -----------------------------------------------------------------------------

    def adopt(self, names: Sequence[str], keep: Sequence[str] = ()) -> None:
        """Copy ``names`` (resident in the champion) into the challenger and re-warm them there."""
        src, dst = self.champion.table, self.challenger.table
        src_slots = np.fromiter((src.slots[n] for n in names), np.int64, len(names))
        dst_slots, _ = dst.acquire(list(names), self.champion.clock(), keep)
        with torch.inference_mode():
            s = torch.from_numpy(src_slots).to(src.device)
            d = torch.from_numpy(dst_slots).to(dst.device)
            for name in ("ring", "values", "stats"):
                getattr(dst, name).index_copy_(0, d, getattr(src, name).index_select(0, s))
        dst.count[dst_slots] = src.count[src_slots]
        dst.last_ts[dst_slots] = src.last_ts[src_slots]
        dst.dirty[dst_slots] = False
        self.challenger.rewarm_series(dst_slots)
        self.score.forget(dst_slots)

    def prune(self) -> int:
        """Forget the challenger's series the champion no longer holds (evicted, or partitions gone)."""
        theirs, mine = self.champion.table.slots, self.challenger.table.slots
        gone = [s for s in mine if s not in theirs]
        if gone:
            self.score.forget(np.fromiter((mine[s] for s in gone), np.int64, len(gone)))
        return len(self.challenger.drop(gone))

    def coverage(self) -> dict[str, tuple[str, Any]]:
        """``{role: (model version, CoverageStats)}`` of both models' intervals on the trial's values
        (empty unless the shadow was started with ``coverage``)."""
        if self.challenger.intervals is None:
            return {}
        out = {}
        mine = self.challenger.coverage.get(self.version)
        if mine is not None:
            out["challenger"] = (self.version, mine)
        theirs = self.champion.coverage.get(self.champion_version)
        if theirs is not None:
            start = self._coverage_from
            if start is not None:
                theirs = replace(
                    theirs,
                    count=theirs.count - start.count,
                    inside=theirs.inside - start.inside,
                    width=theirs.width - start.width,
                )
            out["champion"] = (self.champion_version, theirs)
        return out

    def verdict(self) -> tuple[str | None, dict[str, Any]]:
        """``("promote" | "reject" | None, figures)``: see the module docstring."""
        scores = [self.score.stats(step) for step in self.score.steps]
        detail = {
            "champion": self.champion_version,
            "challenger": self.version,
            "z": self.z,
            "min_values": self.min_values,
            "max_values": self.max_values,
            "steps": [s.as_dict() for s in scores],
        }
        if all(s.count >= self.min_values and s.z > self.z for s in scores):
            return "promote", detail
        if scores[0].count >= self.max_values:
            return "reject", detail
        return None, detail

    @staticmethod
    def fits(champion: Engine, max_series: int) -> bool:
        """Whether a second table as large as the champion's stays within ``max_series`` series in all."""
        return 2 * champion.resident <= max_series
