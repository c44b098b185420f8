"""The trainer's Prometheus metrics (``forecaster train --every``), on an injected registry.

>>> from prometheus_client import CollectorRegistry
>>> metrics = TrainerMetrics(CollectorRegistry())
>>> metrics.failed(2.5)
>>> metrics.registry.get_sample_value("forecaster_trainer_runs_total", {"result": "failed"})
1.0
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from forecaster.metrics.process import register_process_collectors


class TrainerMetrics:
    """The trainer's metrics on one registry (``registry`` attribute), served by ``forecaster train --every``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        register_process_collectors(registry)
        self.runs = Counter(
            "forecaster_trainer_runs_total",
            "Training runs by result: published, proposed (on trial in shadow), not_published (not better),"
            " no_data (waiting for history), failed",
            ["result"],
            registry=registry,
        )
        self.loss = Gauge(
            "forecaster_trainer_loss",
            "Loss (scaled MSE) of the last run, by split",
            ["split"],
            registry=registry,
        )
        self.duration = Gauge(
            "forecaster_trainer_duration_seconds", "Duration of the last training run", registry=registry
        )
        self.last_success = Gauge(
            "forecaster_trainer_last_success_timestamp_seconds",
            "Unix time the last run finished without error",
            registry=registry,
        )
        self.published = Info(
            "forecaster_trainer_published_version", "The checkpoint version LATEST names", registry=registry
        )
        for result in ("published", "proposed", "not_published", "no_data", "failed"):
            self.runs.labels(result=result)

    def record(self, outcome: Any, seconds: float, now: float) -> None:
        """A finished run: ``outcome`` is a ``TrainOutcome`` (or None when the run had nothing to do)."""
        published = getattr(outcome, "published", None)
        proposed = bool(getattr(outcome, "proposed", False))
        result = ("proposed" if proposed else "published") if published else "not_published"
        self.runs.labels(result=result).inc()
        self.duration.set(seconds)
        self.last_success.set(now)
        fit = getattr(outcome, "fit", None)
        if fit is not None and fit.train_losses:
            self.loss.labels(split="train").set(fit.train_losses[-1])
            self.loss.labels(split="validation").set(fit.best_validation_loss)
        if published and not proposed:
            self.published.info({"version": published})

    def waiting(self, seconds: float) -> None:
        """A run that found no history yet, or too little: not a failure (the input may simply be new)."""
        self.runs.labels(result="no_data").inc()
        self.duration.set(seconds)

    def failed(self, seconds: float) -> None:
        self.runs.labels(result="failed").inc()
        self.duration.set(seconds)
