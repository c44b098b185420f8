"""The engine: one batch of observations -> ordered rounds -> gather/step/scatter -> forecasts.

The state table (series id -> slot, hidden state on the device, rings of recent values), snapshots,
re-warm and the reference full pass live here; nothing in this package knows about Kafka.
"""

from forecaster.engine.engine import Engine, EngineOutput, ErrorStats, reference_forecast, resolve_device
from forecaster.engine.rewarm import RewarmJob
from forecaster.engine.state import StateTable
from forecaster.engine.view import SeriesState, ask_series, series_state

__all__ = [
    "Engine",
    "EngineOutput",
    "ErrorStats",
    "RewarmJob",
    "SeriesState",
    "StateTable",
    "ask_series",
    "reference_forecast",
    "resolve_device",
    "series_state",
]
