"""``forecaster produce`` against the real broker: synthetic series (single values and windows), file replay."""

from __future__ import annotations

import json

import numpy as np
import pytest

from forecaster.cli import main
from forecaster.tools.synthetic import generate

START_MS = 1_700_000_000_000


@pytest.fixture
def produce(kafka_bootstrap, monkeypatch, capsys):
    """``produce(*args) -> stdout`` of ``forecaster produce`` run in this process against the test broker."""
    monkeypatch.setenv("FORECASTER_KAFKA__BOOTSTRAP_SERVERS", kafka_bootstrap)

    def run(*args: str) -> str:
        assert main(["produce", "--no-progress", *args]) == 0
        return capsys.readouterr().out

    return run


def values_by_series(records) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        body = record.json()
        assert record.key == body["series"].encode()
        ts = body["ts"] if isinstance(body["ts"], list) else [body["ts"]]
        values = body["values"] if "values" in body else [body["value"]]
        out.setdefault(body["series"], []).extend(zip(ts, values, strict=True))
    return out


@pytest.mark.parametrize("window", [1, 4])
def test_synthetic_series_single_and_windowed(produce, topic_factory, broker, window):
    topic = topic_factory(partitions=2)
    out = produce(
        "--topic",
        topic,
        "--series",
        "3",
        "--values",
        "10",
        "--window",
        str(window),
        "--start-ms",
        str(START_MS),
    )
    records_expected = 3 * 10 if window == 1 else 3 * 3  # windows of 4, 4, 2 per series
    assert f"produced 30 values in {records_expected} records to {topic}" in out
    records = broker.read(topic, count=records_expected, timeout=20)
    assert len(records) == records_expected
    expected = generate(n_series=3, n_values=10, start_ms=START_MS, step_ms=1000, seed=0)
    for name, pairs in values_by_series(records).items():
        rows = expected[expected["series"] == name]
        assert [t for t, _ in sorted(pairs)] == rows["ts"].tolist()
        np.testing.assert_allclose([v for _, v in sorted(pairs)], rows["value"].to_numpy())


def test_windowed_records_of_a_series_are_in_time_order(produce, topic_factory, broker):
    topic = topic_factory(partitions=1)
    produce("--topic", topic, "--series", "2", "--values", "9", "--window", "3", "--start-ms", str(START_MS))
    for name in ("series-0", "series-1"):
        windows = [r.json()["ts"] for r in broker.read(topic, count=6) if r.json()["series"] == name]
        flat = [t for w in windows for t in w]
        assert flat == sorted(flat) and len(flat) == 9


def test_long_csv_replay_with_a_bad_row(produce, topic_factory, broker, tmp_path):
    path = tmp_path / "long.csv"
    path.write_text(
        "series,ts,value\na,2023-01-01T00:00:00Z,1.5\nb,1672531200000,2.5\na,1672531260000,x\na,1672531260000,3\n"
    )
    topic = topic_factory()
    out = produce("--topic", topic, "--input", str(path))  # --file's other name, as train and replay spell it
    assert "produced 3 values in 3 records" in out and "value_not_number=1" in out
    got = values_by_series(broker.read(topic, count=3))
    assert got == {"a": [(1672531200000, 1.5), (1672531260000, 3.0)], "b": [(1672531200000, 2.5)]}


def test_wide_csv_replay_as_windows(produce, topic_factory, broker, tmp_path):
    path = tmp_path / "wide.csv"
    rows = "\n".join(f"{1000 * t},{t},{10 * t}" for t in range(1, 6))
    path.write_text("ts,north,south\n" + rows + "\n")
    topic = topic_factory()
    out = produce("--topic", topic, "--file", str(path), "--window", "2")
    assert "produced 10 values in 6 records" in out
    records = broker.read(topic, count=6)
    assert all("values" in r.json() and len(r.json()["values"]) <= 2 for r in records)
    got = values_by_series(records)
    assert got["north"] == [(1000 * t, float(t)) for t in range(1, 6)]
    assert got["south"] == [(1000 * t, float(10 * t)) for t in range(1, 6)]


def test_a_window_the_service_would_refuse_is_refused_here(kafka_bootstrap, monkeypatch, capsys):
    monkeypatch.setenv("FORECASTER_KAFKA__BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("FORECASTER_SERVICE__MAX_WINDOW_VALUES", "8")
    assert main(["produce", "--no-progress", "--window", "9", "--topic", "never-created"]) == 2
    assert "max_window_values" in capsys.readouterr().err


def test_records_are_json_objects_of_the_wire_format(produce, topic_factory, broker):
    topic = topic_factory()
    produce("--topic", topic, "--series", "1", "--values", "2", "--start-ms", str(START_MS))
    bodies = [json.loads(r.value) for r in broker.read(topic, count=2)]
    assert all(set(b) == {"series", "ts", "value"} for b in bodies)
