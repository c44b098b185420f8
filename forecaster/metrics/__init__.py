"""Every Prometheus metric (registry injected) and the HTTP endpoint: /metrics, /healthz, /readyz, /series.

``service`` holds the service's metrics (and the swapper's), ``trainer`` the trainer's, ``process`` the
process and platform collectors both register, ``http`` the server, ``series`` the series routes' answers.
"""

from forecaster.metrics.http import MetricsApp, MetricsServer
from forecaster.metrics.series import NotResident, SeriesLookup, kafka_partition
from forecaster.metrics.service import LATENCY_BUCKETS, BulkHistogram, ServiceMetrics, SwapMetrics
from forecaster.metrics.trainer import TrainerMetrics

__all__ = [
    "LATENCY_BUCKETS",
    "BulkHistogram",
    "MetricsApp",
    "MetricsServer",
    "NotResident",
    "SeriesLookup",
    "ServiceMetrics",
    "SwapMetrics",
    "TrainerMetrics",
    "kafka_partition",
]
