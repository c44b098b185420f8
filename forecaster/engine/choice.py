"""Per-series choice, online: each series emits, per horizon step, the model's forecast or a naive one,
whichever its own recent errors favour, so that no series does worse than its best naive forecast by more
than noise.

A model is trained across all series of a set; some series of a topic are better served by a naive
forecast (a random walk by its last value, a strongly seasonal one by the same phase last season). The
engine keeps, per series and step k, the running mean absolute k-step error of each candidate:

* 0 ``model``: the published model's forecast (kept as the model made it, whatever was emitted);
* 1 ``last_value``: the last value;
* 2 ``seasonal_naive``: the value one season before the target (``season`` of the model's baseline; only
  when it is above 1 and the window holds what it reads);
* 3 ``seasonal_mean``: the mean of the values at the target's phase in the last ``MEAN_SEASONS`` seasons
  (as many as the window holds, two at least; those before a series' first value left out): what a noisy
  seasonal series is best served by.

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
model forecast to score (int64): ``4 * (H * H + (2C - 1) * H + H) + 8`` bytes (968 for H = 12 and four
candidates).

The arithmetic is written once for numpy arrays (the per-series reference) and torch tensors (a GPU table)
alike; a CPU table runs it as compiled loops (``forecaster.engine.fused``), held equal to both by the tests.

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
        weight = np.maximum(np.float32(1.0) / np.maximum(new_n, np.float32(1.0)), np.float32(self.floor))
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


def mean_backs(horizon: int, season: int, seasons: int) -> tuple[np.ndarray, np.ndarray]:
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
        _, back = mean_backs(horizon, season, averaged_seasons(season, horizon, window))  # (m, H)
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
