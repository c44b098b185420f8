"""Synthetic series for demos, tests and benchmarks: seasonal + trend + noise, with occasional level shifts.

Each series has its own level, amplitude, phase, trend and noise, drawn from one seed, so a run is
reproducible and every series is different.

>>> frame = generate(n_series=2, n_values=3, start_ms=0, step_ms=1000, seed=1)
>>> frame.columns.tolist(), len(frame), frame["ts"].tolist()[:2]
(['series', 'ts', 'value'], 6, [0, 0])
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class SeriesShape:
    """How synthetic series look; every field is the scale of a per-series random draw."""

    season: int = 24
    level: float = 100.0
    amplitude: float = 10.0
    trend: float = 0.01
    noise: float = 1.0
    shift_probability: float = 0.002
    shift_size: float = 5.0


class SyntheticSource:
    """An endless, reproducible stream of values for ``n_series`` series, one tick at a time.

    >>> source = SyntheticSource(n_series=3, seed=7)
    >>> ids, values = source.tick()
    >>> ids, values.shape
    (['series-0', 'series-1', 'series-2'], (3,))
    """

    def __init__(
        self, n_series: int, *, seed: int = 0, shape: SeriesShape = SeriesShape(), prefix: str = "series-"
    ):
        if n_series < 1:
            raise ValueError("n_series must be >= 1")
        self.ids = [f"{prefix}{i}" for i in range(n_series)]
        self.shape = shape
        self._rng = np.random.default_rng(seed)
        rng = self._rng
        self._level = shape.level * rng.uniform(0.5, 1.5, n_series)
        self._amplitude = shape.amplitude * rng.uniform(0.2, 1.5, n_series)
        self._phase = rng.uniform(0, 2 * np.pi, n_series)
        self._trend = shape.trend * rng.normal(0.0, 1.0, n_series)
        self._noise = shape.noise * rng.uniform(0.3, 1.5, n_series)
        self._shift = np.zeros(n_series)
        self.t = 0

    def tick(self) -> tuple[list[str], np.ndarray]:
        """The next value of every series (float64, one per id)."""
        n = len(self.ids)
        shape = self.shape
        jumps = self._rng.random(n) < shape.shift_probability
        self._shift += (
            jumps * self._rng.normal(0.0, shape.shift_size, n) * self._amplitude / max(shape.amplitude, 1e-9)
        )
        angle = 2 * np.pi * self.t / shape.season + self._phase
        values = (
            self._level
            + self._shift
            + self._trend * self.t
            + self._amplitude * np.sin(angle)
            + 0.3 * self._amplitude * np.sin(2 * angle)
            + self._noise * self._rng.normal(0.0, 1.0, n)
        )
        self.t += 1
        return self.ids, values

    def ticks(self, count: int | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
        """``count`` ticks (forever when None)."""
        produced = 0
        while count is None or produced < count:
            yield self.tick()
            produced += 1


def generate(
    n_series: int,
    n_values: int,
    *,
    start_ms: int = 1_700_000_000_000,
    step_ms: int = 3_600_000,
    seed: int = 0,
    shape: SeriesShape = SeriesShape(),
) -> pd.DataFrame:
    """A long frame ``series, ts, value`` of ``n_values`` ticks for ``n_series`` series, in time order."""
    source = SyntheticSource(n_series, seed=seed, shape=shape)
    values = np.stack([v for _, v in source.ticks(n_values)]) if n_values else np.zeros((0, n_series))
    ts = start_ms + step_ms * np.arange(n_values, dtype=np.int64)
    return pd.DataFrame(
        {
            "series": np.tile(np.array(source.ids, dtype=object), n_values),
            "ts": np.repeat(ts, n_series),
            "value": values.reshape(-1),
        }
    )
