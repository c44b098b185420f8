"""The engine: one batch of observations -> ordered rounds -> gather/step/scatter -> forecasts.

The state table (series id -> slot, hidden state on the device, rings of recent values), snapshots,
re-warm and the reference full pass live here; nothing in this package knows about Kafka.
"""

from forecaster.engine.engine import Engine, EngineOutput, ErrorStats, reference_forecast, resolve_device
from forecaster.engine.rewarm import RewarmJob
from forecaster.engine.state import StateTable

__all__ = [
    "Engine",
    "EngineOutput",
    "ErrorStats",
    "RewarmJob",
    "StateTable",
    "reference_forecast",
    "resolve_device",
]
