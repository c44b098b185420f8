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

from forecaster.scaling import _lib

Array = Any  # np.ndarray or torch.Tensor, same kind throughout one call
CANDIDATES = ("model", "last_value", "seasonal_naive")
MAX_COUNT = 1e6  # error counts stop here (float32 counts stay exact; the mean is past its floor long before)


@dataclass(frozen=True)
class Choice:
    """How series choose: ``halflife`` (in errors) of the means, ``margin`` and ``z`` a naive forecast must
    win by (a share of its error; standard errors of the difference), ``min_errors`` before a series may
    switch."""

    halflife: float = 32.0
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
        new_n = n + (1.0 if valid is None else valid)
        new_n = new_n.clamp(max=MAX_COUNT) if lib is torch else np.minimum(new_n, MAX_COUNT)
        weight = 1.0 / (new_n.clamp(min=1.0) if lib is torch else np.maximum(new_n, 1.0))  # (n, H)
        weight = weight.clamp(min=self.floor) if lib is torch else np.maximum(weight, np.float32(self.floor))
        if valid is not None:
            weight = weight * valid
        weight = weight[:, None, :]  # (n, 1, H)
        diff = errors[:, :1] - errors[:, 1:]  # (n, C - 1, H) the model's error minus each naive one's
        return new_n, mean + weight * (errors - mean), sq + weight * (diff * diff - sq)

    def decide(self, mean: Array, sq: Array, n: Array) -> tuple[Array, Array]:
        """Per series and step (of ``mean`` (n, C, H), inf where a naive forecast does not exist, ``sq``
        (n, C - 1, H), ``n`` (n, H)): whether a naive forecast is emitted, and which (0: the last value, 1:
        seasonal naive), both (n, H). A naive forecast qualifies when the model's mean error exceeds its
        own by more than ``margin`` of it and by ``z`` standard errors of the difference; k-step errors of
        neighbouring values overlap, so at step k a mean is worth about 1/k as many independent errors."""
        lib = _lib(mean)
        horizon = mean.shape[-1]
        k = np.arange(1, horizon + 1, dtype=np.float32)
        k = k if lib is np else torch.as_tensor(k, device=mean.device)
        gain = mean[:, :1] - mean[:, 1:]  # (n, C - 1, H) how much lower each naive mean error is
        var = sq - gain * gain  # (n, C - 1, H) of the difference
        worth = n.clamp(max=self.effective) if lib is torch else np.minimum(n, np.float32(self.effective))
        worth = worth[:, None, :] / k  # (n, 1, H) independent errors, about
        noise = var.clamp(min=0.0) if lib is torch else np.maximum(var, 0.0)
        noise = self.z * (noise / (worth.clamp(min=1.0) if lib is torch else np.maximum(worth, 1.0))) ** 0.5
        wins = (gain > mean[:, 1:] * self.margin) & (gain > noise) & (n >= self.min_errors)[:, None, :]
        score = lib.where(wins, mean[:, 1:], np.float32(np.inf) if lib is np else float("inf"))
        if lib is torch:
            best_err, best = score.min(dim=1)  # (n, H)
        else:
            best = score.argmin(axis=1)  # (n, H)
            best_err = np.take_along_axis(score, best[:, None], 1)[:, 0]
        return best_err < (np.float32(np.inf) if lib is np else float("inf")), best

    def pick(self, model: Array, naive: Array, mean: Array, sq: Array, n: Array) -> Array:
        """The forecast each series emits per step: ``model`` (n, H), or where ``decide`` says so the chosen
        one of ``naive`` (n, C - 1, H)."""
        lib = _lib(model)
        switch, best = self.decide(mean, sq, n)  # (n, H)
        if lib is np and not switch.any():
            return model
        if lib is torch:
            chosen = naive.gather(1, best[:, None]).squeeze(1)  # (n, H)
        else:
            chosen = np.take_along_axis(naive, best[:, None], 1)[:, 0]  # (n, H)
        return lib.where(switch, chosen, model)


def naive_reach(season: int, horizon: int, window: int) -> int:
    """How many candidates a table of ``window`` values can score: 3 when the seasonal naive forecast of
    ``season`` (> 1) reads within the window at every step, else 2 (the model and the last value)."""
    return 3 if season > 1 and season * -(-horizon // season) <= window else 2


def naive_forecasts(values: np.ndarray, horizon: int, season: int, candidates: int) -> np.ndarray:
    """The naive candidates made after each of one series' ``values`` (T,): (T, C - 1, H) float64, NaN
    where one does not exist yet."""
    from forecaster.train.baselines import last_value, seasonal_naive

    made = [last_value(values, horizon)]
    if candidates > 2:
        made.append(seasonal_naive(values, horizon, season))
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
    naive = naive_forecasts(v, horizon, season, c)  # (T, C - 1, H)
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
        errors = np.abs(v[t] - np.nan_to_num(past).astype(np.float64)).T[None].astype(np.float32)  # (1, C, H)
        n, mean, sq = choice.update(errors, valid[None], n, mean, sq)
        now = np.nan_to_num(naive[t : t + 1], nan=0.0).astype(np.float32)  # (1, C - 1, H)
        exists = np.concatenate([np.ones((1, 1, horizon), bool), np.isfinite(naive[t : t + 1])], axis=1)
        f = forecasts[t : t + 1].astype(np.float32)
        out[t] = choice.pick(f, now, np.where(exists, mean, np.inf), sq, n)[0]
    return out


class Chooser:
    """The choice's reads and writes of a state ``table`` (with ``choice``) for one round of distinct
    ``slots``: ``score`` before the value is written to the ring, ``pick`` after the recurrent step."""

    def __init__(self, choice: Choice, table: Any) -> None:
        self.choice = choice
        self.table = table

    def _cycles(self) -> np.ndarray:
        """Per step k: how far back from the target the seasonal naive forecast reads, season * ceil(k /
        season) (H,)."""
        season, k = self.table.season, np.arange(1, self.table.horizon + 1)
        return season * -(-k // season)

    def score(self, slots: np.ndarray, idx: Any, count: np.ndarray, v: Any) -> None:
        """Score value ``v`` (n,) of each slot (its ordinal: ``count``) against every candidate's forecasts
        made 1..H values before it, and fold the errors into the slot's means."""
        tb = self.table
        horizon, w, device, cpu = tb.horizon, tb.window_size, tb.device, tb.host_views
        k = np.arange(1, horizon + 1)  # (H,)
        made = count[:, None] - k  # (n, H) ordinals those forecasts were made at
        valid = (made >= tb.choose_from[slots][:, None]) & (k <= w)  # (n, H) all candidates exist
        model_at = ((slots * horizon)[:, None] + made % horizon) * horizon + (k - 1)  # (n, H) model_past
        value_at = [slots[:, None] * w + made % w]  # (n, H) ring positions of the last values then
        if tb.candidates > 2:
            back = count[:, None] - self._cycles()  # (n, H) ordinal the seasonal naive forecast read
            valid &= back >= 0
            value_at.append(slots[:, None] * w + back % w)
        value_at = np.stack(value_at, axis=1)  # (n, C - 1, H)
        everywhere = bool(valid.all())
        if not cpu:
            model_at, value_at = (torch.from_numpy(a).to(device) for a in (model_at, value_at))
            valid = None if everywhere else torch.from_numpy(valid).to(device)
        elif everywhere:
            valid = None
        made_f = [tb.model_past_flat[model_at][:, None], tb.values_flat[value_at]]  # (n, 1, H), (n, C - 1, H)
        if cpu:
            errors = np.abs(v[:, None, None] - np.concatenate(made_f, axis=1)).astype(np.float32)  # (n, C, H)
        else:
            errors = (v[:, None, None] - torch.cat(made_f, dim=1)).abs().float()
        n, mean, sq = self.choice.update(
            errors, valid, tb.choice_n_a[idx], tb.choice_err_a[idx], tb.choice_sq_a[idx]
        )
        tb.choice_n_a[idx], tb.choice_err_a[idx], tb.choice_sq_a[idx] = n, mean, sq

    def pick(self, slots: np.ndarray, idx: Any, count: np.ndarray, f: Any) -> Any:
        """Keep the model's forecasts ``f`` (n, H) made at ordinals ``count`` for the next scores, and
        return what each series emits (n, H) float32."""
        tb = self.table
        horizon, w, device, cpu = tb.horizon, tb.window_size, tb.device, tb.host_views
        row = slots * horizon + count % horizon  # (n,) ring rows of the model's forecasts
        tb.model_past_rows[row if cpu else torch.from_numpy(row).to(device)] = f
        value_at = [np.repeat((slots * w + count % w)[:, None], horizon, axis=1)]  # (n, H) the newest value
        exists = None
        if tb.candidates > 2:
            ordinal = count[:, None] + np.arange(1, horizon + 1) - self._cycles()  # (n, H) value read
            value_at.append(slots[:, None] * w + ordinal % w)
            exists = ordinal >= 0  # (n, H) the seasonal naive forecast reads a value stepped
            exists = None if exists.all() else exists
        value_at = np.stack(value_at, axis=1)  # (n, C - 1, H)
        mean, sq, n = (
            tb.choice_err_a[idx],
            tb.choice_sq_a[idx],
            tb.choice_n_a[idx],
        )  # (n, C, H), (n, C-1, H), (n, H)
        if not cpu:
            value_at = torch.from_numpy(value_at).to(device)
        naive = tb.values_flat[value_at]  # (n, C - 1, H) float32
        if exists is not None:  # that candidate cannot be picked
            gone = np.zeros(mean.shape, bool)
            gone[:, 2] = ~exists
            gone = gone if cpu else torch.from_numpy(gone).to(device)
            mean = _lib(mean).where(gone, np.float32(np.inf) if cpu else float("inf"), mean)
        return self.choice.pick(f, naive, mean, sq, n)

    def sources(self) -> dict[tuple[int, str], int]:
        """How many resident series emit each candidate at step 1 and the last step: ``{(step, source):
        count}`` (from their current means; the metrics read it between batches)."""
        tb = self.table
        slots = tb.occupied()
        steps = sorted({1, tb.horizon})
        counts = np.zeros((tb.candidates, len(steps)), dtype=np.int64)
        if len(slots) and tb.candidates:
            idx = torch.from_numpy(slots).to(tb.device)
            mean = tb.choice_err.index_select(0, idx).cpu().numpy()  # (n, C, H)
            sq = tb.choice_sq.index_select(0, idx).cpu().numpy()  # (n, C - 1, H)
            n = tb.choice_n.index_select(0, idx).cpu().numpy()  # (n, H)
            switch, best = self.choice.decide(mean, sq, n)  # (n, H)
            source = np.where(switch, best + 1, 0)[:, np.array(steps) - 1]  # (n, S)
            for j in range(len(steps)):
                counts[:, j] = np.bincount(source[:, j], minlength=tb.candidates)
        return {
            (step, CANDIDATES[c]): int(counts[c, j])
            for c in range(tb.candidates)
            for j, step in enumerate(steps)
        }
