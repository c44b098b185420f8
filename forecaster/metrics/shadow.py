"""Champion and challenger metrics (``forecaster.engine.shadow``), on the service's registry.

``forecaster_shadow_mae{role, model_version, step}`` is each model's mean absolute error on the values
both stepped since the trial began (``role`` champion or challenger, ``step`` 1 and the last step);
``forecaster_shadow_rmse`` the same as a root mean square, ``forecaster_shadow_coverage{role,
model_version, level, step}`` each model's interval coverage on those values (with
``checkpoints.shadow_coverage``), ``forecaster_shadow_values{step}`` how many were scored, ``forecaster_shadow_z{step}`` the paired
statistic the decision reads (above ``checkpoints.shadow_z`` at both steps: promoted);
``forecaster_shadow_active{champion, challenger}`` is 1 during a trial (the others keep the last
trial's figures until the next one begins);
``forecaster_promotions_total{decision, by}`` counts this instance's decisions.

>>> from prometheus_client import CollectorRegistry
>>> metrics = ShadowMetrics(CollectorRegistry())
>>> metrics.decided("rejected", "shadow")
>>> metrics.registry.get_sample_value("forecaster_promotions_total", {"decision": "rejected", "by": "shadow"})
1.0
"""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge


class ShadowMetrics:
    """The trial's figures; ``update(shadow)`` at each refresh, ``ended()`` when the trial ends."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.active = Gauge(
            "forecaster_shadow_active",
            "1 while a challenger is stepped in shadow beside the champion",
            ["champion", "challenger"],
            registry=registry,
        )
        self.mae = Gauge(
            "forecaster_shadow_mae",
            "Mean absolute error on the values both models stepped since the trial began",
            ["role", "model_version", "step"],
            registry=registry,
        )
        self.rmse = Gauge(
            "forecaster_shadow_rmse",
            "Root mean squared error on the values both models stepped since the trial began",
            ["role", "model_version", "step"],
            registry=registry,
        )
        self.coverage = Gauge(
            "forecaster_shadow_coverage",
            "Share of the trial's values inside each model's interval made `step` values earlier"
            " (checkpoints.shadow_coverage)",
            ["role", "model_version", "level", "step"],
            registry=registry,
        )
        self.values = Gauge(
            "forecaster_shadow_values",
            "Values scored for both models in the trial",
            ["step"],
            registry=registry,
        )
        self.z = Gauge(
            "forecaster_shadow_z",
            "Mean paired difference of absolute errors (champion minus challenger) over its standard error",
            ["step"],
            registry=registry,
        )
        self.decisions = Counter(
            "forecaster_promotions_total",
            "Challengers decided by this instance (by: shadow) or seen decided elsewhere (by: elsewhere)",
            ["decision", "by"],
            registry=registry,
        )
        for decision in ("promoted", "rejected"):
            for by in ("shadow", "elsewhere"):
                self.decisions.labels(decision=decision, by=by)
        self._trial: tuple[str, str] | None = None

    def update(self, shadow: Any) -> None:
        if (shadow.champion_version, shadow.version) != self._trial:  # a new trial: the last one's go
            self.clear()
            self._trial = (shadow.champion_version, shadow.version)
        self.active.labels(champion=shadow.champion_version, challenger=shadow.version).set(1)
        for step in shadow.score.steps:
            stats = shadow.score.stats(step)
            label = str(step)
            self.values.labels(step=label).set(stats.count)
            if math.isfinite(stats.z):
                self.z.labels(step=label).set(stats.z)
            for role, version, mae, rmse in (
                ("champion", shadow.champion_version, stats.mae_champion, stats.rmse_champion),
                ("challenger", shadow.version, stats.mae_challenger, stats.rmse_challenger),
            ):
                if math.isfinite(mae):
                    self.mae.labels(role=role, model_version=version, step=label).set(mae)
                    self.rmse.labels(role=role, model_version=version, step=label).set(rmse)
        for role, (version, cov) in shadow.coverage().items():
            for s, step in enumerate(cov.steps):
                if cov.count[s] <= 0:
                    continue
                for level_index, level in enumerate(cov.levels):
                    share = float(cov.inside[level_index, s] / cov.count[s])
                    self.coverage.labels(role=role, model_version=version, level=level, step=f"h{step}").set(
                        share
                    )

    def ended(self) -> None:
        """The trial is over: not active; its figures stay until the next trial begins."""
        self.active.clear()

    def clear(self) -> None:
        for gauge in (self.active, self.mae, self.rmse, self.coverage, self.values, self.z):
            gauge.clear()
        self._trial = None

    def decided(self, decision: str, by: str) -> None:
        self.decisions.labels(decision=decision, by=by).inc()
