"""The trainer against the real broker: the input topic gives the model the same data as the file it came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer

from forecaster.checkpoints.store import latest_version, load_checkpoint
from forecaster.cli import main
from forecaster.config import Settings
from forecaster.tools.synthetic import generate
from forecaster.train.history import History, read_history, read_history_file

START_MS = 1_700_000_000_000
STEP_MS = 60_000


def produce_file(
    bootstrap: str, topic: str, path: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """``forecaster produce --file`` (the operator's way to load a file into the topic)."""
    monkeypatch.setenv("FORECASTER_KAFKA__BOOTSTRAP_SERVERS", bootstrap)
    assert (
        main(["produce", "--file", str(path), "--topic", topic, "--window", str(window), "--no-progress"])
        == 0
    )


def send_raw(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for key, value in records:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def assert_same(a: History, b: History) -> None:
    assert a.series == b.series
    for x, y in zip(a.ts, b.ts, strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a.values, b.values, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("window", [1, 5])
def test_topic_and_file_give_the_same_history(
    kafka_bootstrap, topic_factory, tmp_path, monkeypatch, window
) -> None:
    path = tmp_path / "data.csv"
    generate(6, 40, start_ms=START_MS, step_ms=STEP_MS, seed=5).to_csv(path, index=False)
    topic = topic_factory(partitions=3)
    produce_file(kafka_bootstrap, topic, path, monkeypatch, window)
    # Records the service would reject or not step: they must not reach the model either.
    send_raw(
        kafka_bootstrap,
        topic,
        [
            (b"series-0", b'{"series": "series-0", "ts": 1700000000000, "value": 99.0}'),  # duplicate ts
            (b"series-1", b'{"series": "series-1", "ts": 1700000060000, "value": NaN}'),  # not finite
            (b"series-2", b"not json"),
            (b"other", b'{"series": "series-3", "ts": 1700000000000, "value": 1.0}'),  # key mismatch
        ],
    )
    settings = Settings(kafka={"bootstrap_servers": kafka_bootstrap, "input_topic": topic})
    from_topic = read_history(settings)
    from_file = read_history_file(path)
    assert_same(from_topic, from_file)
    assert from_topic.dropped["invalid_records"] == 3
    assert from_topic.dropped["duplicates"] == 1
    ranges = from_topic.source["partitions"]
    assert sorted(ranges) == ["0", "1", "2"]
    assert sum(p["end_offset"] - p["start_offset"] for p in ranges.values()) == sum(
        p["records"] for p in ranges.values()
    )


def test_start_time_and_offset_bound_the_history(
    kafka_bootstrap, topic_factory, tmp_path, monkeypatch
) -> None:
    path = tmp_path / "data.csv"
    generate(3, 30, start_ms=START_MS, step_ms=STEP_MS, seed=6).to_csv(path, index=False)
    topic = topic_factory(partitions=2)
    produce_file(kafka_bootstrap, topic, path, monkeypatch, 1)
    settings = Settings(kafka={"bootstrap_servers": kafka_bootstrap, "input_topic": topic})
    full = read_history_file(path)
    cut = START_MS + 10 * STEP_MS
    later = read_history(settings, start_ms=cut)
    assert [t.tolist() for t in later.ts] == [t[t >= cut].tolist() for t in full.ts]
    assert later.dropped["before_start_ms"] == 3 * 10
    skipped = read_history(settings, start_offset=10)
    assert skipped.total_values == full.total_values - sum(
        min(10, p["end_offset"]) for p in skipped.source["partitions"].values()
    )


def test_train_from_the_topic_publishes(
    kafka_bootstrap, topic_factory, tmp_path, monkeypatch, capsys
) -> None:
    path = tmp_path / "data.csv"
    generate(4, 150, start_ms=START_MS, step_ms=STEP_MS, seed=7).to_csv(path, index=False)
    topic = topic_factory(partitions=3)
    produce_file(kafka_bootstrap, topic, path, monkeypatch, 10)
    env = {
        "KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KAFKA__INPUT_TOPIC": topic,
        "CHECKPOINTS__DIR": str(tmp_path / "ck"),
        "MODEL__HIDDEN_SIZE": "8",
        "MODEL__NUM_LAYERS": "1",
        "MODEL__HORIZON": "3",
    }
    for name, value in env.items():
        monkeypatch.setenv(f"FORECASTER_{name}", value)
    capsys.readouterr()
    assert main(["train", "--epochs", "2", "--no-progress"]) == 0
    published = json.loads(capsys.readouterr().out)["published"]
    assert published and latest_version(tmp_path / "ck") == published
    data = load_checkpoint(tmp_path / "ck").manifest["data"]
    assert data["kind"] == "kafka" and data["topic"] == topic and data["values"] == 4 * 150
    assert set(data["partitions"]) == {"0", "1", "2"}
