"""The real broker and kafka-python do what forecaster relies on: keyed partitioning, transactions that
commit consumed offsets atomically with produced records, read_committed isolation, compacted topics."""

from __future__ import annotations

import socket
import time

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.structs import OffsetAndMetadata

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaSetupError
from forecaster.service.clients import (
    COMPACTED,
    TopicSpec,
    ensure_topics,
    make_consumer,
    make_producer,
    wait_for_broker,
)


def consume(consumer: KafkaConsumer, count: int, timeout: float = 30.0) -> list:
    """Poll until ``count`` records arrived (or the timeout), then poll once more for strays."""
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    for batch in consumer.poll(timeout_ms=500).values():
        records.extend(batch)
    return records


def assigned_consumer(settings: KafkaSettings, topic: str, partitions: int, **overrides) -> KafkaConsumer:
    consumer = make_consumer(settings, group_id=None, **overrides)
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    consumer.seek_to_beginning()
    return consumer


def test_keyed_records_keep_their_partition_and_order(kafka_settings, topic_factory, group_factory):
    topic = topic_factory(partitions=4)
    producer = make_producer(kafka_settings)
    sent = {}  # (key, index) -> partition reported by the broker
    for index in range(6):
        for key in ("alpha", "beta", "gamma", "delta", "epsilon"):
            meta = producer.send(topic, key=key.encode(), value=f"{key}:{index}".encode()).get(timeout=30)
            sent[(key, index)] = meta.partition
    producer.close()

    consumer = make_consumer(kafka_settings, topic, group_id=group_factory())
    records = consume(consumer, len(sent))
    consumer.close()

    assert len(records) == len(sent)
    partitions_of_key: dict[str, set[int]] = {}
    values_of_key: dict[str, list[str]] = {}
    for record in records:
        key = record.key.decode()
        partitions_of_key.setdefault(key, set()).add(record.partition)
        values_of_key.setdefault(key, []).append(record.value.decode())
        index = int(record.value.decode().split(":")[1])
        assert record.partition == sent[(key, index)]
    assert all(len(parts) == 1 for parts in partitions_of_key.values())
    for key, values in values_of_key.items():
        assert values == [f"{key}:{i}" for i in range(6)]


def test_transaction_commits_records_and_consumed_offsets_together(
    kafka_settings, kafka_admin, topic_factory, group_factory
):
    source, sink = topic_factory(partitions=1), topic_factory(partitions=1)
    group = group_factory()
    plain = make_producer(kafka_settings)
    for i in range(3):
        plain.send(source, key=b"s", value=f"in-{i}".encode())
    plain.flush()
    plain.close()

    # Step 1. A member of the group reads the input, as the service does.
    reader = make_consumer(kafka_settings, source, group_id=group)
    inputs = consume(reader, 3)
    assert [r.value for r in inputs] == [b"in-0", b"in-1", b"in-2"]

    # Step 2. Outputs and the input offsets commit in one transaction; a second transaction aborts.
    producer = make_producer(kafka_settings, transactional_id=f"tx-{group}")
    producer.init_transactions()
    producer.begin_transaction()
    for r in inputs:
        producer.send(sink, key=r.key, value=b"out-" + r.value)
    consumed = {TopicPartition(source, 0): OffsetAndMetadata(inputs[-1].offset + 1, "", -1)}
    producer.send_offsets_to_transaction(consumed, reader.group_metadata())
    producer.commit_transaction()

    producer.begin_transaction()
    producer.send(sink, key=b"s", value=b"aborted")
    producer.flush()
    producer.abort_transaction()

    producer.begin_transaction()
    producer.send(sink, key=b"s", value=b"after-abort")
    producer.commit_transaction()
    producer.close()
    reader.close()

    # Step 3. read_committed sees the committed records only; read_uncommitted proves the abort wrote.
    committed = assigned_consumer(kafka_settings, sink, 1, isolation_level="read_committed")
    seen = [r.value for r in consume(committed, 4)]
    committed.close()
    assert seen == [b"out-in-0", b"out-in-1", b"out-in-2", b"after-abort"]

    uncommitted = assigned_consumer(kafka_settings, sink, 1, isolation_level="read_uncommitted")
    seen_all = [r.value for r in consume(uncommitted, 5)]
    uncommitted.close()
    assert b"aborted" in seen_all

    # Step 4. The group's committed offset is the one sent through the transaction.
    offsets = kafka_admin.list_group_offsets({group: [TopicPartition(source, 0)]})[group]
    assert offsets[TopicPartition(source, 0)].offset == inputs[-1].offset + 1

    # A new member of the group resumes after the transactionally committed inputs.
    resumed = make_consumer(kafka_settings, source, group_id=group)
    deadline = time.monotonic() + 30
    while not resumed.assignment() and time.monotonic() < deadline:
        assert resumed.poll(timeout_ms=200) == {}
    assert resumed.position(TopicPartition(source, 0)) == inputs[-1].offset + 1
    resumed.close()


def test_ensure_topics_creates_a_compacted_topic(kafka_settings, kafka_admin, group_factory):
    name = group_factory("compacted")
    spec = TopicSpec(name, partitions=4, config=COMPACTED)
    try:
        assert ensure_topics(kafka_settings, [spec]) == [name]
        (described,) = kafka_admin.describe_topics([name])
        assert len(described["partitions"]) == 4
        resource = ConfigResource(ConfigResourceType.TOPIC, name, {"cleanup.policy": None})
        configs = kafka_admin.describe_configs([resource], config_filter="all")["topic"][name]
        assert configs["cleanup.policy"]["value"] == "compact"
        # A second call finds the topic as specified and creates nothing.
        assert ensure_topics(kafka_settings, [spec]) == []
    finally:
        kafka_admin.delete_topics([name])


def test_ensure_topics_refuses_a_partition_count_mismatch(kafka_admin, topic_factory):
    topic = topic_factory(partitions=2)
    with pytest.raises(KafkaSetupError, match=rf"{topic} has 2 partitions, expected 3"):
        ensure_topics(kafka_admin, [TopicSpec(topic, partitions=3)])


def test_ensure_topics_refuses_a_topic_that_is_not_compacted(kafka_admin, topic_factory):
    topic = topic_factory(partitions=2)
    with pytest.raises(KafkaSetupError, match=rf"{topic} has cleanup.policy=delete, expected compact"):
        ensure_topics(kafka_admin, [TopicSpec(topic, partitions=2, config=COMPACTED)])


def test_producing_to_a_missing_topic_fails_rather_than_creating_it(
    kafka_settings, kafka_admin, group_factory
):
    name = group_factory("never-created")
    producer = make_producer(kafka_settings, max_block_ms=2000)
    with pytest.raises(Exception):  # noqa: B017 - kafka-python's exact error type is not the point
        producer.send(name, value=b"x").get(timeout=5)
    producer.close(timeout=1)
    assert name not in kafka_admin.list_topics()


def test_wait_for_broker_names_the_address_when_nothing_answers():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}")
    with pytest.raises(KafkaSetupError, match=f"127.0.0.1:{port}"):
        wait_for_broker(settings, timeout=2)
