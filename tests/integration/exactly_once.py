"""Shared by the exactly-once tests (test_exactly_once*.py): a tiny checkpoint, windowed records streamed
from a thread, committed reads, the check that every value has exactly one forecast equal to the full
pass, and the fixtures (topics with a changelog and a serve factory; a broker of a test's own)."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from forecaster.checkpoints.hotswap import fresh_model
from forecaster.checkpoints.store import load_checkpoint, promote, save_checkpoint
from forecaster.config import Settings
from forecaster.engine.choice import Choice
from forecaster.engine.engine import reference_forecast
from forecaster.records import encode_window
from forecaster.scaling import Scaling

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = {"cell": "gru", "hidden_size": 8, "num_layers": 1, "horizon": 3, "seed": 11}
START_MS = 1_700_000_000_000
WINDOW = 10  # values per input record
FAST = {
    "FORECASTER_SERVICE__SESSION_TIMEOUT_MS": "6000",  # the broker's minimum: a killed member leaves soon
    "FORECASTER_SERVICE__COMMIT_INTERVAL_MS": "200",
    "FORECASTER_STATE__WINDOW": "32",
}
# What these services emit per series: the model's forecast or, per step, the naive one the series picked.
SERVED = {"choice": Choice(), "window": int(FAST["FORECASTER_STATE__WINDOW"])}


# ---- helpers ---------------------------------------------------------------------------------------


def publish_model(root: Path) -> object:
    """A seeded model published as the checkpoint the services load; returns the loaded copy."""
    settings = Settings(model=TINY_MODEL)
    version = save_checkpoint(root, fresh_model(settings), Scaling.from_settings(settings.scaling))
    promote(root, version)
    return load_checkpoint(root)


def windowed_records(frame: pd.DataFrame) -> list[list[tuple[bytes, bytes]]]:
    """Rounds of records: round k holds the k-th window of every series (so a round is a time slice)."""
    rounds: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
    for name, group in frame.groupby("series", sort=False):
        ts, values = group["ts"].tolist(), group["value"].tolist()
        for k, lo in enumerate(range(0, len(ts), WINDOW)):
            rounds[k].append(
                (name.encode(), encode_window(name, ts[lo : lo + WINDOW], values[lo : lo + WINDOW]))
            )
    return [rounds[k] for k in sorted(rounds)]


def stream(bootstrap: str, topic: str, rounds: list, seconds: float) -> threading.Thread:
    """Produce the rounds evenly over ``seconds`` on a thread (acknowledged as it goes)."""

    def run() -> None:
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, retries=10**6)
        for batch in rounds:
            for key, value in batch:
                producer.send(topic, key=key, value=value)
            producer.flush()
            time.sleep(seconds / len(rounds))
        producer.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def read_committed(bootstrap: str, topic: str, count: int, timeout: float) -> list[dict]:
    """Forecast bodies of ``topic`` as a ``read_committed`` consumer sees them: until ``count`` arrived
    and the end offsets are reached (or ``timeout``)."""
    import json

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, isolation_level="read_committed"
    )
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for part in consumer.poll(timeout_ms=500).values():
                out.extend(json.loads(r.value) for r in part)
            if len(out) >= count:
                ends = consumer.end_offsets(tps)
                if all(consumer.position(tp) >= ends[tp] for tp in tps):
                    break
        return out
    finally:
        consumer.close()


def has_committed_state(service) -> bool:
    """Whether ``service`` has committed a transaction with state in the changelog: waited for before a
    test's kills or moves, so that a restore has something to restore even where the input comes late."""
    return service.metrics().get(("forecaster_changelog_records_total", ()), 0) > 0


def check_exactly_once(forecasts: list[dict], frame: pd.DataFrame, model, scaling: Scaling) -> None:
    """One forecast per value, equal to the uninterrupted run (the full forward pass) within 1e-5."""
    per_value = Counter((f["series"], f["ts"]) for f in forecasts)
    expected_keys = set(zip(frame["series"], frame["ts"], strict=True))
    missing = expected_keys - set(per_value)
    duplicated = {k: n for k, n in per_value.items() if n > 1}
    assert not missing, f"{len(missing)} values without a forecast, e.g. {sorted(missing)[:3]}"
    assert not duplicated, (
        f"{len(duplicated)} values with several forecasts, e.g. {list(duplicated.items())[:3]}"
    )
    assert set(per_value) == expected_keys
    by_series: dict[str, list[dict]] = defaultdict(list)
    for f in forecasts:
        by_series[f["series"]].append(f)
    for name, group in frame.groupby("series", sort=False):
        got = sorted(by_series[name], key=lambda f: f["ts"])
        expected = reference_forecast(model, group["value"].to_numpy(), scaling, **SERVED)  # (T, horizon)
        np.testing.assert_allclose(
            np.array([f["forecast"] for f in got]), expected, rtol=1e-5, atol=1e-5, err_msg=name
        )


def churn_rounds(frame: pd.DataFrame, group_size: int, visits: int) -> list[list[list[tuple[bytes, bytes]]]]:
    """Per visit, its rounds: groups of series take turns, each sending its next windows, so that the
    series of one group are evicted while the others run and come back at the next visit."""
    windows = {
        name: [r for r in windowed_records(group)] for name, group in frame.groupby("series", sort=False)
    }
    names = list(windows)
    groups = [names[i : i + group_size] for i in range(0, len(names), group_size)]
    per_visit = len(next(iter(windows.values()))) // visits
    return [
        [
            [windows[name][visit * per_visit + k][0] for name in group]
            for group in groups
            for k in range(per_visit)
        ]
        for visit in range(visits)
    ]


def send_frame(topics, frame: pd.DataFrame) -> None:
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap)
    for batch in windowed_records(frame):
        for key, value in batch:
            producer.send(topics.input, key=key, value=value)
    producer.flush()
    producer.close()


def changelog_partitions(bootstrap: str, topic: str) -> dict[str, tuple[int, bytes]]:
    """The latest committed changelog record per series: (partition, value)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, isolation_level="read_committed")
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        latest: dict[str, tuple[int, bytes]] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(consumer.position(tp) < ends[tp] for tp in tps):
            for tp, records in consumer.poll(timeout_ms=200).items():
                latest.update((r.key.decode(), (tp.partition, r.value)) for r in records)
        return latest
    finally:
        consumer.close()


def _last_value_model(loaded) -> object:
    """A challenger of the champion's shape that forecasts the last value (untrained over a season-1
    baseline): on these series plainly better than the untrained champion, at every step."""
    from forecaster.model import ForecasterConfig, build_model

    config = ForecasterConfig(**{**loaded.model.config.model_dump(), "season": 1, "base_seasons": 1})
    return build_model(config, seed=1)


def _trial_active(service) -> bool:
    return any(
        name == "forecaster_shadow_active" and value == 1 for (name, _), value in service.metrics().items()
    )
