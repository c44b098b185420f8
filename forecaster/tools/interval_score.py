"""Offline scores of prediction intervals: coverage and the interval (Winkler) score per level and step.

The Winkler score of a ``1 - alpha`` interval ``[l, u]`` for the value ``y`` is its width plus a penalty
for a miss, ``(u - l) + (2 / alpha) * (l - y if y < l else y - u if y > u else 0)``: lower is better, and
it is minimised in expectation by the true ``alpha / 2`` and ``1 - alpha / 2`` quantiles (Gneiting &
Raftery 2007), so it rewards narrow intervals only as long as they cover.

>>> import numpy as np
>>> v = np.array([1.0, 2.0, 3.0, 10.0])
>>> lower = np.stack([np.full((1, 2), x - 1.0) for x in v])  # (T, L=1, H=2): x - 1 .. x + 1 for the next
>>> s = IntervalScores.empty(["80"], 2)
>>> s.add(v, lower, lower + 2.0)
>>> s.coverage().tolist(), s.winkler().round(1).tolist()
([[0.6666666666666666, 0.0]], [[22.0, 42.0]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class IntervalScores:
    """Cumulative counts per level and step: scored points, inside, Winkler score sum (data units)."""

    labels: list[str]
    count: np.ndarray  # (H,) int64
    inside: np.ndarray  # (L, H) int64
    winkler_sum: np.ndarray  # (L, H) float64

    @classmethod
    def empty(cls, labels: list[str], horizon: int) -> IntervalScores:
        n = len(labels)
        return cls(
            list(labels),
            np.zeros(horizon, np.int64),
            np.zeros((n, horizon), np.int64),
            np.zeros((n, horizon)),
        )

    @property
    def alpha(self) -> np.ndarray:
        return 1.0 - np.array([float(label) for label in self.labels]) / 100.0  # (L,)

    def add(
        self,
        values: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        start: int = 0,
        targets: np.ndarray | None = None,
    ) -> None:
        """Score one series: ``values`` (T,), bounds (T, L, H) made after each value; origins from
        ``start`` on (each origin's targets that exist; origins without bounds are left out). ``targets``
        (T, H): what each bound is scored against, NaN where nothing is (default: the k-th next value; on a
        time grid, ``forecaster.tools.pairing.SeriesGrid.targets``)."""
        horizon = self.count.shape[0]
        if targets is None:
            # here, not at the top: forecaster.train's evaluation imports this module
            from forecaster.train.baselines import targets as next_values

            targets = next_values(values, horizon)
        for k in range(1, horizon + 1):
            origins = np.arange(start, len(values))
            # origins with a target whose bounds exist (a young series' first forecasts have none: NaN)
            made = np.isfinite(targets[origins, k - 1])
            made &= np.isfinite(lower[origins, :, k - 1]).all(1)
            made &= np.isfinite(upper[origins, :, k - 1]).all(1)
            origins = origins[made]
            if not len(origins):
                continue
            y = targets[origins, k - 1][:, None]  # (m, 1)
            lo, hi = lower[origins, :, k - 1], upper[origins, :, k - 1]  # (m, L)
            below, above = np.maximum(lo - y, 0.0), np.maximum(y - hi, 0.0)
            self.count[k - 1] += len(origins)
            self.inside[:, k - 1] += ((below == 0.0) & (above == 0.0)).sum(0)
            self.winkler_sum[:, k - 1] += ((hi - lo) + (2.0 / self.alpha) * (below + above)).sum(0)

    def coverage(self) -> np.ndarray:
        """(L, H) share of scored values inside each interval."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.inside / self.count

    def winkler(self) -> np.ndarray:
        """(L, H) mean interval score, data units."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.winkler_sum / self.count

    def report(self) -> dict[str, dict[str, list[float]]]:
        """JSON-ready: per level, coverage and Winkler score per step."""
        cov, wink = self.coverage(), self.winkler()
        return {
            label: {"coverage": cov[i].round(4).tolist(), "winkler": wink[i].tolist()}
            for i, label in enumerate(self.labels)
        }
