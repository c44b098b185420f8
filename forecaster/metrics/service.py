"""The service's Prometheus metrics (and the model swapper's), on an injected registry.

No metric carries a series id as a label. The online error of the model (one-step-ahead, from the engine)
is exposed per ``model_version`` as two summaries without quantiles, so that
``rate(forecaster_forecast_abs_error_sum[5m]) / rate(forecaster_forecast_abs_error_count[5m])`` is the mean
absolute error and the same over ``forecaster_forecast_squared_error`` the mean squared error.

>>> from prometheus_client import CollectorRegistry
>>> metrics = ServiceMetrics(CollectorRegistry())
>>> metrics.records_consumed.inc(3)
>>> metrics.registry.get_sample_value("forecaster_records_consumed_total")
3.0
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from forecaster.metrics.coverage import IntervalCoverage
from forecaster.metrics.process import register_process_collectors

# 100 us .. 10 s, with a boundary at the 25 ms latency goal.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
RESTORE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000)


class BulkHistogram(Collector):
    """A classic histogram that takes a whole array of observations at once (one lock, one bincount).

    >>> from prometheus_client import CollectorRegistry
    >>> registry = CollectorRegistry()
    >>> h = BulkHistogram("demo_seconds", "demo", buckets=(0.1, 1.0), registry=registry)
    >>> h.observe_many(np.array([0.05, 0.5, 5.0]))
    >>> registry.get_sample_value("demo_seconds_bucket", {"le": "1.0"}), registry.get_sample_value("demo_seconds_count")
    (2.0, 3.0)
    """

    def __init__(
        self, name: str, documentation: str, buckets: Iterable[float], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.array(sorted(buckets), dtype=np.float64)
        self._counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)  # last: above every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        # side="left": a value equal to a bound falls in that bound's bucket (le is inclusive).
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(np.sum(values))

    def collect(self) -> Iterable[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        buckets = [(_le(b), float(c)) for b, c in zip(self.bounds.tolist(), cumulative, strict=False)]
        buckets.append(("+Inf", float(cumulative[-1])))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], buckets, total)
        yield family

    def describe(self) -> Iterable[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation)


class OnlineError(Collector):
    """Cumulative one-step-ahead error per model version, fed with the engine's cumulative totals.

    ``update(errors)`` takes ``{version: stats}`` with ``count``, ``sum_abs`` and ``sum_sq``; it adds the
    increase since the last call, so a total that goes down (a new engine) counts from zero again.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._seen: dict[str, tuple[float, float, float]] = {}
        self._totals: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def update(self, errors: Mapping[str, Any]) -> None:
        with self._lock:
            for version, stats in errors.items():
                now = (float(stats.count), float(stats.sum_abs), float(stats.sum_sq))
                before = self._seen.get(version, (0.0, 0.0, 0.0))
                delta = now if now[0] < before[0] else tuple(a - b for a, b in zip(now, before, strict=True))
                totals = self._totals.setdefault(version, [0.0, 0.0, 0.0])
                for i in range(3):
                    totals[i] += delta[i]
                self._seen[version] = now

    def collect(self) -> Iterable[SummaryMetricFamily]:
        doc = "One-step-ahead forecast error of the values stepped, per model version"
        absolute = SummaryMetricFamily(
            "forecaster_forecast_abs_error", doc + " (absolute, data units)", labels=["model_version"]
        )
        squared = SummaryMetricFamily(
            "forecaster_forecast_squared_error", doc + " (squared, data units)", labels=["model_version"]
        )
        with self._lock:
            for version, (count, sum_abs, sum_sq) in self._totals.items():
                absolute.add_metric([version], count_value=count, sum_value=sum_abs)
                squared.add_metric([version], count_value=count, sum_value=sum_sq)
        yield absolute
        yield squared

    def describe(self) -> Iterable[SummaryMetricFamily]:
        return self.collect()


class ServiceMetrics:
    """The service's metrics on one registry (a fresh ``CollectorRegistry`` unless one is given).

    >>> from prometheus_client import CollectorRegistry
    >>> m = ServiceMetrics(CollectorRegistry())
    >>> m.set_model("v1", "gru")
    >>> m.registry.get_sample_value("forecaster_model_info", {"version": "v1", "cell": "gru"})
    1.0
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        register_process_collectors(r)  # process_* (CPU, memory, fds) and python_info
        self.records_consumed = Counter(
            "forecaster_records_consumed_total", "Input records polled", registry=r
        )
        self.records_invalid = Counter(
            "forecaster_records_invalid_total",
            "Input records sent to the dead-letter topic",
            ["reason"],
            registry=r,
        )
        self.values_stepped = Counter(
            "forecaster_values_stepped_total", "Values stepped by the model", registry=r
        )
        self.values_duplicate = Counter(
            "forecaster_values_duplicate_total",
            "Values not newer than their series' last ts (dropped)",
            registry=r,
        )
        self.values_clipped = Counter(
            "forecaster_values_clipped_total",
            "Values stepped nearer their series' running mean than they were (farther than scaling.clip"
            " scales from it)",
            registry=r,
        )
        self.values_imputed = Counter(
            "forecaster_values_imputed_total",
            "Missing periods stepped through with an imputed value before a value that came after a gap"
            " (never scored, never emitted)",
            registry=r,
        )
        self.gaps_restarted = Counter(
            "forecaster_gaps_restarted_total",
            "Gaps longer than state.max_gap_periods, stepped through only to their season's phase",
            registry=r,
        )
        self.forecasts_emitted = Counter(
            "forecaster_forecasts_emitted_total", "Forecast records produced", registry=r
        )
        self.batch_size = Histogram(
            "forecaster_batch_size", "Input records per polled batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "forecaster_step_seconds", "Engine time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.end_to_end_latency = BulkHistogram(
            "forecaster_end_to_end_latency_seconds",
            "Input record timestamp to its forecast handed to the producer",
            LATENCY_BUCKETS,
            r,
        )
        self.online_error = OnlineError(r)
        self.coverage = IntervalCoverage(r)
        self.series_resident = Gauge("forecaster_series_resident", "Series with state in memory", registry=r)
        self.series_periods = Gauge(
            "forecaster_series_period",
            "Resident series by their time grid: with a period (a step is one period), learning it from"
            " their first spacings, or without one (a step is the next value)",
            ["grid"],
            registry=r,
        )
        self.series_choice = Gauge(
            "forecaster_series_choice",
            "Resident series by where their forecast at this step comes from: the model, or the naive "
            "forecast their own recent errors favour (per-series choice)",
            ["step", "source"],
            registry=r,
        )
        self.state_evictions = Counter(
            "forecaster_state_evictions_total",
            "Series evicted from the state table (idle or LRU)",
            registry=r,
        )
        self.state_bytes = Gauge("forecaster_state_bytes", "Bytes held by the state table", registry=r)
        self.consumer_lag = Gauge(
            "forecaster_consumer_lag",
            "Records between the consumer position and the end",
            ["partition"],
            registry=r,
        )
        self.model_info = Gauge(
            "forecaster_model_info", "The model serving (value 1)", ["version", "cell"], registry=r
        )
        self.commits = Counter("forecaster_commits_total", "Offset commits", registry=r)
        self.stalls = Counter(
            "forecaster_stalls_total",
            "Times this member stalled (lag without progress, or group membership lost) and rejoined",
            registry=r,
        )
        self.records_unsent = Counter(
            "forecaster_records_unsent_total",
            "Output records (forecasts, dead letters) that could not be written, by reason (e.g. too_large)",
            ["reason"],
            registry=r,
        )
        # Exactly once: transactions, the state changelog, restores.
        self.transactions = Counter(
            "forecaster_transactions_total",
            "Transactions (forecasts + changelog + offsets) by result: committed or aborted",
            ["result"],
            registry=r,
        )
        self.changelog_records = Counter(
            "forecaster_changelog_records_total",
            "State changelog records written in transactions",
            registry=r,
        )
        self.changelog_refused = Counter(
            "forecaster_changelog_refused_total",
            "Changelog records refused on restore (the series started fresh), by reason",
            ["reason"],
            registry=r,
        )
        self.restore_seconds = Histogram(
            "forecaster_restore_seconds",
            "Time to restore assigned partitions from the changelog (committed offsets, read, load)",
            buckets=RESTORE_BUCKETS,
            registry=r,
        )
        self.series_restored = Counter(
            "forecaster_series_restored_total",
            "Series restored from the changelog, by where they went: resident (state table) or evicted (store)",
            ["to"],
            registry=r,
        )
        self.evicted_series = Gauge(
            "forecaster_evicted_series",
            "Evicted series kept until they come back (exactly once), by where: memory or disk",
            ["where"],
            registry=r,
        )
        self.evicted_bytes = Gauge(
            "forecaster_evicted_bytes",
            "Bytes of evicted series' snapshots (memory: with per-entry overhead), by where: memory or disk",
            ["where"],
            registry=r,
        )
        self._evictions_seen = 0

    def update_evicted(self, stats: Mapping[str, int]) -> None:
        """The evicted store's figures (``forecaster.service.exactly_once.evicted.EvictedStore.stats``)."""
        for where in ("memory", "disk"):
            self.evicted_series.labels(where=where).set(stats[f"{where}_series"])
            self.evicted_bytes.labels(where=where).set(stats[f"{where}_bytes"])

    def set_model(self, version: str, cell: str) -> None:
        """The model now serving (the previous label set is removed)."""
        self.model_info.clear()
        self.model_info.labels(version=version, cell=cell).set(1)

    def update_state(self, resident: int, evictions_total: int, state_bytes: int) -> None:
        """Copy the state table's figures (``evictions_total`` cumulative, as the table counts it)."""
        self.series_resident.set(resident)
        self.state_bytes.set(state_bytes)
        if evictions_total > self._evictions_seen:
            self.state_evictions.inc(evictions_total - self._evictions_seen)
        self._evictions_seen = evictions_total

    def update_periods(self, grids: Mapping[str, int]) -> None:
        """Copy the engine's ``period_counts``."""
        for grid, count in grids.items():
            self.series_periods.labels(grid=grid).set(count)

    def update_choice(self, sources: Mapping[tuple[int, str], int]) -> None:
        """Copy the engine's ``choice_sources`` (label sets of another horizon or season go)."""
        self.series_choice.clear()
        for (step, source), count in sources.items():
            self.series_choice.labels(step=str(step), source=source).set(count)

    def set_lag(self, lag: Mapping[int, int]) -> None:
        """Lag per assigned partition; partitions no longer assigned disappear."""
        self.consumer_lag.clear()
        for partition, value in lag.items():
            self.consumer_lag.labels(partition=str(partition)).set(value)

    def invalid(self, reason: str) -> None:
        self.records_invalid.labels(reason=reason).inc()

    def transaction(self, committed: bool) -> None:
        self.transactions.labels(result="committed" if committed else "aborted").inc()
        if committed:
            self.commits.inc()

    def restored(self, report: Any) -> None:
        """One restore's figures (a ``forecaster.service.exactly_once.recovery.RestoreReport``)."""
        self.restore_seconds.observe(report.seconds)
        self.series_restored.labels(to="resident").inc(report.resident)
        self.series_restored.labels(to="evicted").inc(report.evicted)
        for reason, n in report.refused.items():
            self.changelog_refused.labels(reason=reason).inc(n)


def _le(bound: float) -> str:
    return repr(float(bound))


# ---- the model swapper (forecaster.checkpoints.hotswap), on the service's registry -----------------------

SWAP_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 120.0)


class SwapMetrics:
    """The swap metrics on one registry: ``swaps`` (Counter, label result=ok|refused) and ``seconds``."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.swaps = Counter(
            "forecaster_model_swaps_total",
            "Model hot swaps, by result (ok: serving the new version; refused: it failed validation)",
            ["result"],
            registry=registry,
        )
        self.seconds = Histogram(
            "forecaster_model_swap_seconds",
            "Time the service loop paused to swap models (re-warm of every resident series included)",
            buckets=SWAP_SECONDS_BUCKETS,
            registry=registry,
        )
        for result in ("ok", "refused"):
            self.swaps.labels(result=result)
