"""What the engine scores online, per model version: one-step-ahead errors and interval coverage.

Sums stay where the values are (the device's tensors, or numpy on the host) so that a step never waits
for a copy; ``stats()`` reads them when the metrics layer asks.

>>> acc = ErrorAccumulator(np.zeros(1))
>>> acc.count += 2; acc.sums += np.array([3.0, 5.0])
>>> acc.stats().mae, round(acc.stats().rmse, 3)
(1.5, 1.581)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class ErrorStats:
    """Cumulative one-step-ahead error of one model version (the metrics layer reads deltas)."""

    count: int = 0
    sum_abs: float = 0.0
    sum_sq: float = 0.0

    @property
    def mae(self) -> float:
        return self.sum_abs / self.count if self.count else float("nan")

    @property
    def rmse(self) -> float:
        return (self.sum_sq / self.count) ** 0.5 if self.count else float("nan")


@dataclass
class CoverageStats:
    """Cumulative online coverage of one model version's intervals at a few steps.

    ``count[s]``: values scored at step ``steps[s]``; ``inside[l, s]``: of those, within the level-``l``
    bounds; ``width[l, s]``: sum of those intervals' widths in units of each series' scale.
    """

    levels: list[str]
    steps: list[int]
    count: np.ndarray  # (S,) int64
    inside: np.ndarray  # (L, S) float64
    width: np.ndarray  # (L, S) float64


class ErrorAccumulator:
    """count on the host; sums on the device (no sync per step)."""

    def __init__(self, like: Any) -> None:
        self.count = 0
        self.sums = like.new_zeros(2) if isinstance(like, torch.Tensor) else np.zeros(2)

    def stats(self) -> ErrorStats:
        sums = self.sums.tolist()
        return ErrorStats(self.count, float(sums[0]), float(sums[1]))


class CoverageAccumulator:
    """counts per step on the host; inside and half-width sums (2, L, H) on the device (no sync per step);
    ``stats`` reports the steps in ``steps``."""

    def __init__(self, like: Any, levels: int, horizon: int, steps: list[int]) -> None:
        self.steps = steps
        self.count = np.zeros(horizon, dtype=np.int64)
        shape = (2, levels, horizon)
        self.sums = like.new_zeros(shape) if isinstance(like, torch.Tensor) else np.zeros(shape)

    def stats(self, labels: list[str]) -> CoverageStats:
        cols = [s - 1 for s in self.steps]
        sums = np.asarray(self.sums.tolist(), dtype=np.float64)[:, :, cols]  # (2, L, S)
        return CoverageStats(labels, list(self.steps), self.count[cols], sums[0], 2.0 * sums[1])
