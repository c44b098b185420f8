"""The trainer as a long-lived process: one training run every period, with its own metrics.

>>> from prometheus_client import CollectorRegistry
>>> parse_duration("15m"), parse_duration("1h30m"), parse_duration("90")
(900.0, 5400.0, 90.0)
>>> metrics = TrainerMetrics(CollectorRegistry())
>>> runs = run_periodically(lambda: None, 0.0, metrics, max_runs=2)
>>> runs, metrics.registry.get_sample_value("forecaster_trainer_runs_total", {"result": "not_published"})
(2, 2.0)
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from forecaster.errors import ConfigError, ForecasterError, NotEnoughHistory
from forecaster.metrics import TrainerMetrics

log = logging.getLogger(__name__)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"30s"``, ``"15m"``, ``"1h30m"``, ``"1d"``; ``ConfigError`` otherwise."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ConfigError(f"{text!r} is not a duration like 90, 30s, 15m, 1h30m or 1d")
    return sum(float(amount) * _UNITS[unit] for amount, unit in parts)


def run_periodically(
    run_once: Callable[[], Any],
    every_seconds: float,
    metrics: TrainerMetrics,
    *,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    max_runs: int | None = None,
    retry_seconds: float = 60.0,
) -> int:
    """Call ``run_once`` every ``every_seconds`` (start to start) until ``stop`` is set; returns the runs made.

    A run that raises a ``ForecasterError`` is logged and counted as failed; the next one comes after
    ``min(every_seconds, retry_seconds)``, so a fresh deployment whose input topic is still empty gets its
    first model soon after data arrives rather than a whole period later.
    """
    stop = stop or threading.Event()
    runs = 0
    while not stop.is_set() and (max_runs is None or runs < max_runs):
        started = clock()
        period = every_seconds
        try:
            outcome = run_once()
        except NotEnoughHistory as exc:
            metrics.waiting(clock() - started)
            period = min(every_seconds, retry_seconds)
            log.info("not enough history yet: %s (next try in %.0f s)", exc, period)
        except ForecasterError as exc:
            metrics.failed(clock() - started)
            period = min(every_seconds, retry_seconds)
            log.error("training run failed: %s (next try in %.0f s)", exc, period)
        else:
            metrics.record(outcome, clock() - started, wall())
        runs += 1
        if max_runs is not None and runs >= max_runs:
            break
        left = period - (clock() - started)
        if left > 0:
            log.info("next training run in %.0f s", left)
            stop.wait(left)
    return runs
