"""The periodic trainer loop: a failed run is retried sooner than a whole period."""

import threading

from prometheus_client import CollectorRegistry

from forecaster.errors import DataError
from forecaster.metrics import TrainerMetrics
from forecaster.train.periodic import run_periodically


class RecordingStop(threading.Event):
    """A stop event whose waits return at once and are remembered."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return False


def test_failed_run_retries_after_retry_seconds_successful_one_after_the_period():
    outcomes = iter([DataError("no history to train on"), None, None])

    def once():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome

    metrics = TrainerMetrics(CollectorRegistry())
    stop = RecordingStop()
    runs = run_periodically(
        once, 900.0, metrics, stop=stop, clock=lambda: 0.0, max_runs=3, retry_seconds=30.0
    )
    assert runs == 3
    assert stop.waits == [30.0, 900.0]
    assert metrics.registry.get_sample_value("forecaster_trainer_runs_total", {"result": "failed"}) == 1.0
    assert (
        metrics.registry.get_sample_value("forecaster_trainer_runs_total", {"result": "not_published"}) == 2.0
    )


def test_retry_never_waits_longer_than_the_period():
    def once():
        raise DataError("empty")

    stop = RecordingStop()
    run_periodically(
        once,
        10.0,
        TrainerMetrics(CollectorRegistry()),
        stop=stop,
        clock=lambda: 0.0,
        max_runs=2,
        retry_seconds=60.0,
    )
    assert stop.waits == [10.0]
