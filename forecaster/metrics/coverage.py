"""Online coverage of the prediction intervals, per model version, level and step.

The engine accumulates, per model version, how many values were scored at a few steps (h1 and the last
step), how many fell inside each level's interval, and the sum of those intervals' widths in units of
each series' scale (``Engine.coverage``); this collector turns those cumulative totals into counters.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

Key = tuple[str, str, str]  # model version, level, step


class IntervalCoverage(Collector):
    """Counters of interval coverage fed with the engine's cumulative ``{version: CoverageStats}``.

    ``update`` adds the increase since the last call (a total that goes down, from a new engine, counts
    from zero again). Coverage is ``rate(inside) / rate(scored)``, the mean width
    ``rate(width) / rate(scored)``.

    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> registry = CollectorRegistry()
    >>> coverage = IntervalCoverage(registry)
    >>> stats = SimpleNamespace(levels=["80"], steps=[1, 12], count=np.array([10, 4]),
    ...                         inside=np.array([[8.0, 3.0]]), width=np.array([[25.0, 12.0]]))
    >>> coverage.update({"v1": stats})
    >>> labels = {"model_version": "v1", "level": "80", "step": "h12"}
    >>> registry.get_sample_value("forecaster_interval_inside_total", labels)
    3.0
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._seen: dict[Key, tuple[float, float, float]] = {}
        self._totals: dict[Key, list[float]] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def update(self, coverage: Mapping[str, Any]) -> None:
        with self._lock:
            for version, stats in coverage.items():
                for li, level in enumerate(stats.levels):
                    for si, step in enumerate(stats.steps):
                        key = (version, str(level), f"h{step}")
                        now = (
                            float(stats.count[si]),
                            float(stats.inside[li, si]),
                            float(stats.width[li, si]),
                        )
                        before = self._seen.get(key, (0.0, 0.0, 0.0))
                        delta = (
                            now
                            if now[0] < before[0]
                            else tuple(a - b for a, b in zip(now, before, strict=True))
                        )
                        totals = self._totals.setdefault(key, [0.0, 0.0, 0.0])
                        for i in range(3):
                            totals[i] += delta[i]
                        self._seen[key] = now

    def collect(self) -> Iterable[CounterMetricFamily]:
        labels = ["model_version", "level", "step"]
        scored = CounterMetricFamily(
            "forecaster_interval_scored",
            "Values scored against the prediction interval made step values earlier",
            labels=labels,
        )
        inside = CounterMetricFamily(
            "forecaster_interval_inside",
            "Values that fell inside the prediction interval at this level and step",
            labels=labels,
        )
        width = CounterMetricFamily(
            "forecaster_interval_width",
            "Sum of the scored intervals' widths, in units of each series' scale",
            labels=labels,
        )
        with self._lock:
            for key, (count, n_inside, total_width) in self._totals.items():
                scored.add_metric(list(key), count)
                inside.add_metric(list(key), n_inside)
                width.add_metric(list(key), total_width)
        yield scored
        yield inside
        yield width

    def describe(self) -> Iterable[CounterMetricFamily]:
        return self.collect()
