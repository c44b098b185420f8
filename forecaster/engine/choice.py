"""Per-series choice, online: each series emits, per horizon step, the model's forecast or a naive one,
whichever its own recent errors favour, so that no series does worse than its best naive forecast by more
than noise.

A model is trained across all series of a set; some series of a topic are better served by a naive
forecast (a random walk by its last value, a strongly seasonal one by the same phase last season). The
engine keeps, per series and step k, the running mean absolute k-step error of each candidate:

* 0 ``model``: the published model's forecast (kept as the model made it, whatever was emitted);
* 1 ``last_value``: the last value;
* 2 ``seasonal_naive``: the value one season before the target (``season`` of the model's baseline; only
  when it is above 1 and the window holds what it reads).

**Score.** When value ``v_t`` arrives, the forecasts every candidate made ``k = 1..H`` values earlier for it
are scored on the points where all of them exist (naive forecasts are re-read from the ring of values, the
model's from a ring of its last H forecasts); each mean is cumulative for the first ``halflife`` errors,
then exponentially weighted (``halflife`` in errors).

**Pick.** For step k a series emits a naive forecast instead of the model's once it has ``min_errors``
k-step errors and the model's mean error exceeds that naive one's by more than noise: by more than
``margin`` of it, and by more than ``z`` standard errors of the difference of the two (kept as a running
mean of the squared difference of the two errors; k-step errors of neighbouring values overlap, so at step
k the mean is taken to be worth 1/k as many independent errors). Of the naive forecasts that qualify, the
one with the lower error is emitted; the series goes back to the model as soon as none qualifies. A new
series, and every series after a model swap (``reset``: the new model has no errors yet), emits the model's
forecast until it has ``min_errors``.

Per series the state table keeps the model's last H forecasts (H x H float32), the means (C x H float32),
the squared differences ((C - 1) x H float32), the error counts (H float32) and the ordinal of the first
model forecast to score (int64): ``4 * (H * H + (2C - 1) * H + H) + 8`` bytes (872 for H = 12 and three
candidates).

The arithmetic is written once for numpy arrays (a CPU table) and torch tensors (a GPU table) alike.

>>> import numpy as np
>>> choice = Choice(halflife=8.0, margin=0.1, z=2.0, min_errors=2)
>>> err = np.array([[[3.0, 3.0], [1.0, 4.0], [2.0, 1.0]]], np.float32)  # (1 series, 3 candidates, 2 steps)
>>> steady = (err[:, :1] - err[:, 1:]) ** 2  # the differences never varied: no noise
>>> model = np.array([[10.0, 11.0]], np.float32)
>>> naive = np.array([[[7.0, 7.0], [6.0, 5.0]]], np.float32)  # last value, seasonal naive
>>> n = np.full((1, 2), 5.0, np.float32)
>>> choice.pick(model, naive, err, steady, n)[0].tolist()
[7.0, 5.0]
>>> choice.pick(model, naive, err, steady + 9.0, n)[0].tolist()  # within the noise: the model's
[10.0, 11.0]
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from forecaster.engine.intervals import lag_rows
from forecaster.scaling import _lib

Array = Any  # np.ndarray or torch.Tensor, same kind throughout one call
CANDIDATES = ("model", "last_value", "seasonal_naive", "seasonal_mean")
MEAN_SEASONS = 4  # seasons the seasonal mean averages, at most (fewer when the window holds fewer)
MAX_COUNT = 1e6  # error counts stop here (float32 counts stay exact; the mean is past its floor long before)


@dataclass(frozen=True)
class Choice:
    """How series choose: ``halflife`` (in errors) of the means, ``margin`` and ``z`` a naive forecast must
    win by (a share of its error; standard errors of the difference), ``min_errors`` before a series may
    switch."""

    halflife: float = 64.0
    margin: float = 0.05
    z: float = 2.0
    min_errors: int = 16

    def __post_init__(self) -> None:
        if not self.halflife > 0.0 or not self.margin >= 0.0 or not self.z >= 0.0 or self.min_errors < 1:
            raise ValueError("halflife must be > 0, margin and z >= 0, min_errors >= 1")

    @classmethod
    def from_settings(cls, settings: Any) -> Choice | None:
        """From a ``ChoiceSettings`` section; None when the choice is off (the model's forecast always)."""
        if not settings.enabled:
            return None
        return cls(settings.halflife, settings.margin, settings.z, settings.min_errors)

    @property
    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @functools.cached_property
    def floor(self) -> float:
        """Weight of a new error in the mean once a series has ``halflife`` of them."""
        return 1.0 - 0.5 ** (1.0 / self.halflife)

    @functools.cached_property
    def effective(self) -> float:
        """How many errors an exponentially weighted mean at ``floor`` is worth: (2 - w) / w."""
        return (2.0 - self.floor) / self.floor

    def update(
        self, errors: Array, valid: Array | None, n: Array, mean: Array, sq: Array
    ) -> tuple[Array, Array, Array]:
        """Fold one value's absolute k-step errors ``errors`` (n, C, H) in, where ``valid`` (n, H) (None:
        everywhere), into the counts ``n`` (n, H), the means ``mean`` (n, C, H) and the mean squared
        differences of the model's error and each naive one's ``sq`` (n, C - 1, H). Returns all three."""
        lib = _lib(errors)
        diff = errors[:, :1] - errors[:, 1:]  # (n, C - 1, H) the model's error minus each naive one's
        diff *= diff
        if lib is torch:
            new_n = (n + (1.0 if valid is None else valid)).clamp(max=MAX_COUNT)
            weight = (1.0 / new_n.clamp(min=1.0)).clamp(min=self.floor)  # (n, H)
            weight = (weight if valid is None else weight * valid)[:, None, :]  # (n, 1, H)
            return new_n, mean + weight * (errors - mean), sq + weight * (diff - sq)
        new_n = np.minimum(n + (np.float32(1.0) if valid is None else valid), np.float32(MAX_COUNT))
        floor = np.float32(self.floor)
        if valid is None and new_n.size and float(new_n.min()) * self.floor >= 1.0:
            weight = floor  # every mean past its first errors: one weight (what the line below gives)
        else:
            weight = np.maximum(np.float32(1.0) / np.maximum(new_n, np.float32(1.0)), floor)  # (n, H)
            weight = (weight if valid is None else weight * valid)[:, None, :]  # (n, 1, H)
        errors = errors - mean  # m + w (e - m), as (e - m) w + m
        errors *= weight
        errors += mean
        diff -= sq
        diff *= weight
        diff += sq
        return new_n, errors, diff

    def decide(self, mean: Array, sq: Array, n: Array) -> tuple[Array, Array]:
        """Per series and step (of ``mean`` (n, C, H), inf where a naive forecast does not exist, ``sq``
        (n, C - 1, H), ``n`` (n, H)): whether a naive forecast is emitted, and which (0: the last value, 1:
        seasonal naive), both (n, H). A naive forecast qualifies when the model's mean error exceeds its
        own by more than ``margin`` of it and by ``z`` standard errors of the difference; k-step errors of
        neighbouring values overlap, so at step k a mean is worth about 1/k as many independent errors."""
        lib = _lib(mean)
        cpu = lib is np
        inf = np.float32(np.inf) if cpu else float("inf")
        k = np.arange(1, mean.shape[-1] + 1, dtype=np.float32)  # (H,)
        k = k if cpu else torch.as_tensor(k, device=mean.device)
        worth = (np.minimum(n, np.float32(self.effective)) if cpu else n.clamp(max=self.effective)) / k
        worth = (
            np.maximum(worth, np.float32(1.0)) if cpu else worth.clamp(min=1.0)
        )  # (n, H) independent errors
        # gain > z * sqrt(max(var, 0) / worth), var = sq - gain^2, is gain^2 (worth + z^2) > z^2 sq for a
        # gain > 0; a weight of 0 where fewer than min_errors are counted fails it
        z2 = self.z * self.z
        weight = lib.where(n >= self.min_errors, worth + z2, np.float32(0.0) if cpu else 0.0)  # (n, H)
        best_err = best = None
        for c in range(1, mean.shape[1]):  # one or two naive forecasts: elementwise beats reductions
            gain = mean[:, 0] - mean[:, c]  # (n, H) how much lower its mean error is (-inf: none)
            with np.errstate(invalid="ignore"):  # inf * 0 where neither is: NaN, which fails the test
                wins = (gain > mean[:, c] * self.margin) & (gain * gain * weight > sq[:, c - 1] * z2)
            err = lib.where(wins, mean[:, c], inf)  # (n, H)
            if best_err is None:
                best_err, best = err, lib.zeros_like(n, dtype=np.int64 if cpu else torch.long)
            else:
                better = err < best_err
                best = lib.where(better, c - 1, best)
                best_err = lib.where(better, err, best_err)
        return best_err < inf, best

    def may_switch(self, mean: np.ndarray, n: np.ndarray) -> bool:
        """Whether any naive forecast beats the model by the margin where ``min_errors`` are counted (numpy
        arrays): when none does, ``decide`` says the model's everywhere, and costs more."""
        best = mean[:, 1]
        for c in range(2, mean.shape[1]):  # elementwise: cheaper than a reduction over a short axis
            best = np.minimum(best, mean[:, c])
        best = best * np.float32(1.0 + self.margin)  # (n, H)
        return bool(((best < mean[:, 0]) & (n >= self.min_errors)).any())

    def pick(self, model: Array, naive: Array, mean: Array, sq: Array, n: Array) -> Array:
        """The forecast each series emits per step: ``model`` (n, H), or where ``decide`` says so the chosen
        one of ``naive`` (n, C - 1, H)."""
        lib = _lib(model)
        switch, best = self.decide(mean, sq, n)  # (n, H)
        if lib is np and not switch.any():
            return model
        chosen = naive[:, 0]
        for c in range(1, naive.shape[1]):
            chosen = lib.where(best == c, naive[:, c], chosen)  # (n, H)
        return lib.where(switch, chosen, model)


def averaged_seasons(season: int, horizon: int, window: int) -> int:
    """How many seasons the seasonal mean can average within ``window`` values at every step (up to
    ``MEAN_SEASONS``; 0 without a season)."""
    if season <= 1:
        return 0
    return min(MEAN_SEASONS, window // (season * -(-horizon // season)))


def naive_reach(season: int, horizon: int, window: int) -> int:
    """How many candidates a table of ``window`` values can score: 4 when the seasonal mean of two seasons
    or more fits in the window, 3 when seasonal naive does (``season`` > 1), else 2 (the model and the last
    value)."""
    m = averaged_seasons(season, horizon, window)
    return 4 if m >= 2 else 3 if m == 1 else 2


def _mean_backs(horizon: int, season: int, seasons: int) -> tuple[np.ndarray, np.ndarray]:
    """How far back from ordinal j the seasonal mean reads, (m, H) each: made k values before j for
    target j (``scored``), made at j (``emitted``); row i: the season i cycles further back."""
    k = np.arange(1, horizon + 1)
    cycles = season * -(-k // season)  # (H,)
    further = season * np.arange(seasons)[:, None]  # (m, 1)
    return cycles + further, cycles - k + further


def seasonal_mean(values: Any, back: np.ndarray, count: Any) -> Any:
    """The mean (n, H) float32 of ``values`` (n, m, H), read ``back`` (m, H) values before ordinals
    ``count`` (n,), over those at ordinals >= 0 (0 where none is: that forecast does not exist, and the
    callers leave it out)."""
    lib = _lib(values)
    seen = count[:, None, None] - back >= 0  # (n, m, H) numpy
    if bool(seen.all()):
        return values.sum(1) / np.float32(back.shape[0])
    seen_count = seen.sum(1).astype(np.float32)  # (n, H)
    if lib is torch:
        seen = torch.from_numpy(seen).to(values.device)
        return (values * seen).sum(1) / torch.from_numpy(np.maximum(seen_count, 1.0)).to(values.device)
    return np.where(seen, values, np.float32(0.0)).sum(1) / np.maximum(seen_count, np.float32(1.0))


def naive_forecasts(
    values: np.ndarray, horizon: int, season: int, candidates: int, window: int
) -> np.ndarray:
    """The naive candidates made after each of one series' ``values`` (T,): (T, C - 1, H) float64, NaN
    where one does not exist yet."""
    from forecaster.train.baselines import last_value, seasonal_naive

    made = [last_value(values, horizon)]
    if candidates > 2:
        made.append(seasonal_naive(values, horizon, season))
    if candidates > 3:
        _, back = _mean_backs(horizon, season, averaged_seasons(season, horizon, window))  # (m, H)
        at = np.arange(len(values))[:, None, None] - back  # (T, m, H) ordinals read
        ring = np.asarray(values, dtype=np.float32)  # as the ring of values keeps them
        mean = seasonal_mean(ring[np.clip(at, 0, None)], back, np.arange(len(values)))  # (T, H)
        made.append(np.where(np.isfinite(made[1]), mean, np.nan))  # where seasonal naive exists
    return np.stack(made, axis=1)


def reference_choice(
    forecasts: np.ndarray,
    values: Any,
    choice: Choice,
    season: int,
    window: int,
    first: int = 0,
) -> np.ndarray:
    """The choice over one series on its own, value by value: ``forecasts`` (T, H) as the model made them
    after each of ``values`` (T,); ``first``: the ordinal of the first model forecast scored (a swap sets it).
    Returns (T, H) float32: what the engine emits for that series whatever the batching."""
    v = np.asarray(values, dtype=np.float64)
    steps, horizon = forecasts.shape
    c = naive_reach(season, horizon, window)
    naive = naive_forecasts(v, horizon, season, c, window)  # (T, C - 1, H)
    made_all = np.concatenate([forecasts.astype(np.float32)[:, None], naive.astype(np.float32)], axis=1)
    k = np.arange(1, horizon + 1)
    mean = np.zeros((1, c, horizon), np.float32)
    sq = np.zeros((1, c - 1, horizon), np.float32)
    n = np.zeros((1, horizon), np.float32)
    out = np.zeros((steps, horizon), np.float32)
    for t in range(steps):
        made = t - k  # (H,) ordinals the forecasts for v[t] were made at
        valid = (made >= first) & (k <= window)
        at = np.clip(made, 0, None)
        past = made_all[at, :, k - 1]  # (H, C)
        valid &= np.isfinite(past).all(axis=1)
        errors = np.abs(np.float32(v[t]) - np.nan_to_num(past)).T[None]  # (1, C, H) float32
        n, mean, sq = choice.update(errors, valid[None], n, mean, sq)
        now = np.nan_to_num(naive[t : t + 1], nan=0.0).astype(np.float32)  # (1, C - 1, H)
        exists = np.concatenate([np.ones((1, 1, horizon), bool), np.isfinite(naive[t : t + 1])], axis=1)
        f = forecasts[t : t + 1].astype(np.float32)
        out[t] = choice.pick(f, now, np.where(exists, mean, np.inf), sq, n)[0]
    return out


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

    def _naive(self, slots: np.ndarray, count: np.ndarray, which: int) -> Any:
        """The naive candidates' forecasts (n, C - 1, H) float32, re-read from the ring of values: those
        made 1..H values before each slot's ordinal ``count`` for it (``which`` 0), or those made at it (1)."""
        tb = self.table
        cpu, device, c = tb.host_views, tb.device, tb.candidates
        single = self._backs(tb.horizon, tb.season, c)[which][:2]  # (<= 2, H) one value each
        at = self._ring(slots, count, single)  # (n, <= 2, H)
        got = tb.values_flat[at if cpu else torch.from_numpy(at).to(device)]
        if c < 4:
            return got
        back = _mean_backs(tb.horizon, tb.season, averaged_seasons(tb.season, tb.horizon, tb.window_size))[
            which
        ]
        at = self._ring(slots, count, back)  # (n, m, H)
        mean = seasonal_mean(tb.values_flat[at if cpu else torch.from_numpy(at).to(device)], back, count)
        return np.concatenate([got, mean[:, None]], 1) if cpu else torch.cat([got, mean[:, None]], 1)

    @staticmethod
    @functools.cache
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

    def score(self, slots: np.ndarray, idx: Any, count: np.ndarray, v: Any) -> tuple[Any, Any, Any]:
        """Score value ``v`` (n,) of each slot (its ordinal: ``count``) against every candidate's forecasts
        made 1..H values before it, and fold the errors into the slot's means; returns the new counts, means
        and squared differences (``pick``'s ``scored``)."""
        tb = self.table
        horizon, w, device, cpu = tb.horizon, tb.window_size, tb.device, tb.host_views
        back, _ = self._backs(horizon, tb.season, tb.candidates)  # (C - 1, H)
        # Step 1. where every candidate's forecast exists: the model's since choose_from, the values in the ring
        k = back[0]
        reach = int(back.max())
        valid = None
        if reach > w or int((count - tb.choose_from[slots]).min()) < max(reach, horizon):  # some do not
            valid = (count[:, None] - k >= tb.choose_from[slots][:, None]) & (back.max(axis=0) <= w)
            valid &= (count[:, None] - back.max(axis=0)) >= 0  # (n, H)
        # Step 2. the forecasts: the model's from its ring, the naive ones re-read from the ring of values
        model_at = _model_rows(horizon)[count % horizon] + (slots * (horizon * horizon))[:, None]  # (n, H)
        naive = self._naive(slots, count, 0)  # (n, C - 1, H)
        if not cpu:
            model_at = torch.from_numpy(model_at).to(device)
            valid = None if valid is None else torch.from_numpy(valid).to(device)
            past = torch.cat([tb.model_past_flat[model_at][:, None], naive], dim=1)
            errors = (v.float()[:, None, None] - past).abs()  # (n, C, H) float32
        else:
            v32 = v.astype(np.float32)[:, None]  # (n, 1)
            errors = np.empty((len(slots), tb.candidates, horizon), np.float32)  # (n, C, H)
            np.subtract(v32, tb.model_past_flat[model_at], out=errors[:, 0])
            np.subtract(v32[:, None], naive, out=errors[:, 1:])
            np.abs(errors, out=errors)
        # Step 3. the running means
        n, mean, sq = self.choice.update(
            errors, valid, tb.choice_n_a[idx], tb.choice_err_a[idx], tb.choice_sq_a[idx]
        )
        tb.choice_n_a[idx], tb.choice_err_a[idx], tb.choice_sq_a[idx] = n, mean, sq
        return n, mean, sq

    def pick(self, slots: np.ndarray, count: np.ndarray, f: Any, scored: tuple[Any, Any, Any]) -> Any:
        """Keep the model's forecasts ``f`` (n, H) made at ordinals ``count`` for the next scores, and
        return what each series emits (n, H) float32 (``scored``: ``score``'s answer for these slots)."""
        tb = self.table
        horizon, device, cpu = tb.horizon, tb.device, tb.host_views
        row = slots * horizon + count % horizon  # (n,) ring rows of the model's forecasts
        tb.model_past_rows[row if cpu else torch.from_numpy(row).to(device)] = f
        n, mean, sq = scored  # (n, H), (n, C, H), (n, C - 1, H)
        if cpu and not self.choice.may_switch(mean, n):
            return f
        _, ahead = self._backs(horizon, tb.season, tb.candidates)  # (C - 1, H) offsets from the newest value
        naive = self._naive(slots, count, 1)  # (n, C - 1, H)
        if int(count.min()) < int(
            ahead.max()
        ):  # a young series' seasonal naive forecast reads before its first
            gone = np.zeros(mean.shape, bool)  # (n, C, H)
            gone[:, 1:] = count[:, None, None] - ahead < 0
            gone = gone if cpu else torch.from_numpy(gone).to(device)
            mean = _lib(mean).where(gone, np.float32(np.inf) if cpu else float("inf"), mean)
        return self.choice.pick(f, naive, mean, sq, n)

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
