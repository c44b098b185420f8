"""Every Prometheus metric (registry injected) and the HTTP endpoint: /metrics, /healthz, /readyz."""

from forecaster.metrics.metrics import MetricsServer, ServiceMetrics, SwapMetrics, TrainerMetrics

__all__ = ["MetricsServer", "ServiceMetrics", "SwapMetrics", "TrainerMetrics"]
