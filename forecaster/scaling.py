"""Causal per-series normalisation, the only one: serving steps ``update``, training loops it (``transform``).

Each series keeps an exponentially weighted running mean and variance in float64. The statistics at
value t include value t, so the model input ``x_t = (v_t - mean_t) / scale_t`` uses values up to t only.
The weight of a new value is ``max(1 / count, 1 - 0.5 ** (1 / halflife))``: the first values act as a
cumulative mean, later ones as an EWM with the given half-life (in values).

A value farther than ``clip`` running scales from its series' running mean (once the series has
``MIN_CLIP_COUNT`` values and has varied) is folded in at that distance (``winsorize``): a glitch of 1e29
among values near 1 moves the statistics as a value 100 scales out would, instead of leaving the scale at
1e26 for tens of thousands of values. A real level shift is followed within a few values (each clipped value
raises the variance by up to ``alpha * clip**2`` of itself).

``kind="log"`` does the same on the logarithm of the values (positive values only): forecasts are
``exp`` of the model's, and a baseline that moves the seasonal pattern to the current level moves it by
ratios rather than differences, which suits a seasonal swing that grows with the level.

The arithmetic is written once and runs on numpy arrays or torch tensors alike (the engine keeps the
statistics of a CPU table as numpy views, of a GPU table as CUDA tensors). Both compute in float64;
``transform`` on the CPU runs the numpy path, as the engine does on a CPU table.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch

from forecaster.timegrid import impute, impute_reach

Array = Any  # np.ndarray or torch.Tensor, same kind throughout one call


def _lib(a: Array) -> ModuleType:
    return torch if isinstance(a, torch.Tensor) else np


def _as(mask: np.ndarray, like: Array) -> Array:
    """A numpy mask as ``like``'s kind (a tensor on its device, or itself)."""
    return torch.as_tensor(mask, device=like.device) if isinstance(like, torch.Tensor) else mask


def _float32(a: Array) -> Array:
    """Values rounded to float32 and back (what the engine's ring of values holds)."""
    return a.float().double() if isinstance(a, torch.Tensor) else a.astype(np.float32).astype(np.float64)


def _held(folded: list[Array], t: int, reach: int, like: Array) -> Array:
    """The ``reach`` values folded in before position ``t`` as the ring holds them (float32), NaN before
    the first: (batch, reach), what ``forecaster.timegrid.impute`` reads."""
    lib = _lib(like)
    have = folded[max(t - reach, 0) : t]
    recent = lib.stack([_float32(f) for f in have], 1)
    if len(have) < reach:
        pad = lib.full((recent.shape[0], reach - len(have)), float("nan"), dtype=recent.dtype)
        pad = pad if lib is np else pad.to(recent.device)
        recent = lib.concatenate((pad, recent), 1) if lib is np else torch.cat((pad, recent), 1)
    return recent


def _floor(a: Array, low: float) -> Array:
    """max(a, low) elementwise (numpy's ``clip`` is a slow Python wrapper)."""
    return a.clamp(min=low) if isinstance(a, torch.Tensor) else np.maximum(a, low)


@dataclass(frozen=True)
class Scaling:
    """Causal running normalisation of each series.

    ``kind="ewm"`` scales by the running mean and standard deviation; ``kind="log"`` scales the logarithm
    of the values so (values must be > 0); ``kind="none"`` is the identity (model input = value, forecast
    = model output).

    >>> s = Scaling(halflife=10.0)
    >>> x, stats = s.transform(np.array([1.0, 2.0, 3.0]))
    >>> [round(float(v), 4) for v in x]
    [0.0, 1.0, 1.2247]
    >>> y = s.denormalize(stats[-1:], torch.zeros(1, 2))
    >>> [round(float(v), 4) for v in y[0]]
    [2.0, 2.0]
    """

    N_STATS: ClassVar[int] = 3  # count, mean, variance
    KINDS: ClassVar[tuple[str, ...]] = ("ewm", "log", "none")
    MIN_CLIP_COUNT: ClassVar[int] = 8  # values a series has seen before ``clip`` applies to it

    kind: str = "ewm"
    halflife: float = 256.0
    min_scale: float = 1e-3
    clip: float = 100.0  # in running scales; 0: values are folded in as they are

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {self.kind!r}")
        if not self.halflife > 0.0 or not self.min_scale > 0.0:
            raise ValueError("halflife and min_scale must be > 0")
        if not self.clip >= 0.0:
            raise ValueError("clip must be >= 0 (0: off)")
        for name in ("halflife", "min_scale", "clip"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @functools.cached_property
    def alpha(self) -> float:
        """Weight of a new value in the long run."""
        return 1.0 - 0.5 ** (1.0 / self.halflife)

    @property
    def positive(self) -> bool:
        """Whether values must be > 0 (the log kind)."""
        return self.kind == "log"

    def inner(self, values: Array) -> Array:
        """Values as the statistics see them: their logarithm for the log kind, else themselves."""
        return _lib(values).log(values) if self.kind == "log" else values

    @classmethod
    def from_settings(cls, settings: Any) -> Scaling:
        """Build from a ``ScalingSettings`` section."""
        return cls(
            kind=settings.kind, halflife=settings.halflife, min_scale=settings.min_scale, clip=settings.clip
        )

    @property
    def settings(self) -> dict[str, Any]:
        """The constructor arguments (saved with checkpoints so training and serving agree)."""
        return dataclasses.asdict(self)

    def initial_stats(self, n: int, device: torch.device | str | None = "cpu") -> torch.Tensor:
        """Statistics of ``n`` series that have seen nothing: (n, N_STATS) float64 zeros."""
        return torch.zeros(n, self.N_STATS, dtype=torch.float64, device=device)

    def winsorize(self, stats: Array, values: Array) -> tuple[Array, Array | None]:
        """The values (n,) as the statistics ``stats`` (n, N_STATS) fold them in: each farther than ``clip``
        scales from its series' mean (in ``inner`` units; once it has seen ``MIN_CLIP_COUNT`` values and
        they varied) moved to that distance. Returns them and which were moved
        ((n,) bool; None on the CPU where none was). The engine steps, stores and scores the returned
        values; the trainer fits on them.

        >>> s = Scaling(halflife=10.0, clip=100.0)
        >>> _, stats = s.transform(np.array([1.0, 2.0] * 8))
        >>> v, moved = s.winsorize(stats[-1:].numpy(), np.array([1e29]))
        >>> round(float(v[0]), 2), moved.tolist()
        (51.5, [True])
        """
        if self.kind == "none" or self.clip == 0.0:
            return values, None
        lib = _lib(stats)
        inner = self.inner(values)  # (n,)
        if lib is np:  # the usual case first: every value within clip deviations (a few operations)
            delta = inner - stats[:, 1]  # (n,)
            if (delta * delta <= self.clip * self.clip * stats[:, 2]).all():
                return values, None
        deviation = lib.sqrt(stats[:, 2])  # (n,)
        floor = self.scale_floor(stats)  # (n,)
        reach = self.clip * lib.maximum(deviation, floor)  # (n,)
        low, high = stats[:, 1] - reach, stats[:, 1] + reach  # (n,)
        # only a series that has varied: the first rise of one that was flat (all zeros so far, as
        # intermittent demand starts) is how its range is learnt
        moved = (inner < low) | (inner > high)  # (n,)
        moved &= (stats[:, 0] >= self.MIN_CLIP_COUNT) & (stats[:, 2] > 0.0)
        if lib is np and not moved.any():
            return values, None
        clipped = lib.minimum(lib.maximum(inner, low), high)  # (n,)
        clipped = lib.exp(clipped) if self.kind == "log" else clipped
        # a float32 value: what the engine's ring of values keeps, so rewinding it (a re-warm) is exact
        clipped = clipped.float().double() if lib is torch else clipped.astype(np.float32).astype(np.float64)
        return lib.where(moved, clipped, values), moved

    def update(self, stats: Array, values: Array) -> Array:
        """Fold one new value per series in: stats (n, N_STATS), values (n,) float64 -> new stats."""
        if self.kind == "none":
            return stats
        count = stats[:, 0] + 1.0  # (n,)
        alpha = _floor(1.0 / count, self.alpha)  # (n,)
        delta = self.inner(values) - stats[:, 1]  # (n,)
        mean = stats[:, 1] + alpha * delta  # (n,)
        var = (1.0 - alpha) * (stats[:, 2] + alpha * delta * delta)  # (n,)
        out = _lib(stats).empty_like(stats)  # (n, N_STATS); cheaper than stack for small n
        out[:, 0], out[:, 1], out[:, 2] = count, mean, var
        return out

    def rewind(self, stats: Array, values: Array) -> Array:
        """The inverse of ``update``: the statistics before ``values`` (n,) were folded in (zeros before a
        series' first value). Exact up to float64 rounding, which each step back multiplies by at most
        ``1 / (1 - alpha)`` (a re-warm rewinds a window of values to replay it)."""
        if self.kind == "none":
            return stats
        lib = _lib(stats)
        count = stats[:, 0]  # (n,)
        alpha = _floor(1.0 / lib.maximum(count, lib.ones_like(count)), self.alpha)  # (n,)
        first = count <= 1.0  # (n,) before it: nothing
        keep = lib.where(first, lib.ones_like(alpha), 1.0 - alpha)  # (n,) avoids 0 / 0 below
        inner = self.inner(values)
        mean = (stats[:, 1] - alpha * inner) / keep  # (n,)
        delta = inner - mean
        var = stats[:, 2] / keep - alpha * delta * delta  # (n,)
        out = _lib(stats).zeros_like(stats)  # (n, N_STATS)
        out[:, 0] = _floor(count - 1.0, 0.0)
        out[:, 1] = lib.where(first, out[:, 1], mean)
        out[:, 2] = lib.where(first, out[:, 2], _floor(var, 0.0))
        return out

    def rewind_gain(self, steps: int) -> float:
        """How much ``steps`` calls of ``rewind`` can multiply a rounding error (at most)."""
        return 1.0 if self.kind == "none" else (1.0 - self.alpha) ** -float(steps)

    def scale(self, stats: Array) -> Array:
        """The divisor of each series (n,) (of stats (..., N_STATS): (...)), floored so a flat series
        never divides by zero."""
        lib = _lib(stats)
        return lib.maximum(lib.sqrt(stats[..., 2]), self.scale_floor(stats))  # (n,)

    def scale_floor(self, stats: Array) -> Array:
        """The least a series' scale can be (of stats (..., N_STATS): (...)): ``min_scale`` of |mean|, and
        of 1 below it."""
        return self.min_scale * _floor(abs(stats[..., 1]), 1.0)

    def normalize(self, stats: Array, values: Array, scale: Array | None = None) -> Array:
        """Model input of the value just folded in by ``update``: (n,) float32.
        ``scale``: ``self.scale(stats)`` if the caller has it already."""
        if self.kind == "none":
            return values.astype(np.float32) if isinstance(values, np.ndarray) else values.float()
        x = (self.inner(values) - stats[:, 1]) / (
            self.scale(stats) if scale is None else scale
        )  # (n,) float64
        return x.astype(np.float32) if isinstance(x, np.ndarray) else x.float()

    def rescale(self, stats: Array, values: Array) -> Array:
        """Values in data units (..., k) -> the units of a model input made with ``stats`` (..., N_STATS):
        (..., k) float32. A model's baseline reads a series' earlier values in the units of its current
        input (the statistics at the current value), not in the units each had when it was stepped.

        >>> s = Scaling(halflife=10.0)
        >>> x, stats = s.transform(np.array([1.0, 2.0, 3.0]))
        >>> [round(float(v), 4) for v in s.rescale(stats[-1:], torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))[0]]
        [-1.2247, 0.0, 1.2247]
        """
        return self.standardize(stats, self.inner(values))

    def standardize(self, stats: Array, inner: Array) -> Array:
        """``rescale`` of values already passed through ``inner``: the affine part alone, (..., k) float32.
        A baseline that commutes with shifts and scales can be computed on ``inner`` values and then
        standardized with the statistics of the position it is for."""
        if isinstance(inner, torch.Tensor) and not isinstance(stats, torch.Tensor):
            stats = torch.as_tensor(stats, device=inner.device)
        if self.kind == "none":
            return inner.astype(np.float32) if isinstance(inner, np.ndarray) else inner.float()
        scale = self.scale(stats)[..., None]  # (..., 1)
        x = (inner - stats[..., 1:2]) / scale  # (..., k) float64
        return x.astype(np.float32) if isinstance(x, np.ndarray) else x.float()

    def denormalize(self, stats: Array, y: Array, scale: Array | None = None) -> Array:
        """Model output (n, horizon) in scaled units -> forecasts in data units (float64).
        ``scale``: ``self.scale(stats)`` if the caller has it already."""
        if isinstance(y, torch.Tensor) and not isinstance(stats, torch.Tensor):
            stats = torch.as_tensor(stats, device=y.device)
        elif isinstance(stats, torch.Tensor) and not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y, device=stats.device)
        y = y.astype(np.float64) if isinstance(y, np.ndarray) else y.double()
        if self.kind == "none":
            return y
        scale = self.scale(stats) if scale is None else scale
        out = y * scale[:, None] + stats[:, 1:2]  # (n, horizon)
        if (
            self.kind == "log"
        ):  # capped below float64's largest exp: a wild output is a huge forecast, not inf
            out = _lib(out).exp(out.clip(max=700.0) if isinstance(out, np.ndarray) else out.clamp(max=700.0))
        return out

    def transform(self, values: Array) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale whole series: values (T,) or (batch, T) -> model inputs (same shape, float32) and
        the statistics after each value (..., T, N_STATS) float64. It is ``winsorize`` and ``update``
        looped over time."""
        x, stats, _ = self.transform_values(values)
        return x, stats

    def transform_values(
        self, values: Array, missing: np.ndarray | None = None, season: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``transform``, and the values as they were folded in (``winsorize``; same shape, float64): what
        the engine keeps in its ring of values, and what a model's baseline reads.

        ``missing`` (bool, the shape of ``values``; None: where ``values`` are NaN) marks missing periods of
        a series on its time grid: each takes the value folded in one ``season`` earlier (else the one
        before), as float32 holds it, unmoved by ``winsorize``, as the engine steps a missing period
        (``forecaster.timegrid``)."""
        if isinstance(values, np.ndarray) and not values.flags.writeable:
            values = values.copy()  # torch warns about (and may not share) a read-only buffer
        v = torch.as_tensor(values, dtype=torch.float64)
        squeeze = v.dim() == 1
        v = v.reshape(1, -1) if squeeze else v  # (batch, T)
        if v.dim() != 2:
            raise ValueError(f"values must be (T,) or (batch, T), got shape {tuple(v.shape)}")
        batch, steps = v.shape
        # The loop runs on numpy for a CPU tensor (same float64 arithmetic, far less per-call overhead).
        vv = v.numpy() if v.device.type == "cpu" else v
        stats = self.initial_stats(batch, v.device)  # (batch, N_STATS)
        stats = stats.numpy() if v.device.type == "cpu" else stats
        xs, all_stats, folded = [], [], []
        reach = impute_reach(season)
        if missing is None and v.device.type == "cpu":
            missing = np.isnan(vv)
        gaps = None if missing is None or not np.any(missing) else np.asarray(missing).reshape(batch, steps)
        for t in range(steps):
            vt, _ = self.winsorize(stats, vv[:, t])
            if gaps is not None and t > 0 and gaps[:, t].any():
                filled = impute(_held(folded, t, reach, vt), season, self.positive)
                vt = _lib(vt).where(_as(gaps[:, t], vt), filled, vt)
            stats = self.update(stats, vt)
            xs.append(self.normalize(stats, vt))
            all_stats.append(stats)
            folded.append(vt)
        lib = _lib(stats)
        x = lib.stack(xs, 1) if xs else lib.zeros((batch, 0), dtype=lib.float32)  # (batch, T)
        st = lib.stack(all_stats, 1) if xs else lib.zeros((batch, 0, self.N_STATS), dtype=lib.float64)
        kept = lib.stack(folded, 1) if xs else vv  # (batch, T)
        x, st, kept = (torch.as_tensor(a, device=v.device) for a in (x, st, kept))
        return (x[0], st[0], kept[0]) if squeeze else (x, st, kept)
