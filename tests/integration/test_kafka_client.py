"""The client interface on the real broker, the same checks for each client library: keyed partitioning,
transactions that commit consumed offsets atomically with produced records, read_committed isolation and
its end offsets, cooperative assignment callbacks, pause/seek/resume, compacted topics, size limits."""

from __future__ import annotations

import socket
import time

import pytest

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaClientError, KafkaSetupError
from forecaster.service.clients import (
    COMPACTED,
    ConsumerOptions,
    ProducerOptions,
    Rebalance,
    TopicPartition,
    TopicSpec,
    ensure_topics,
    make_admin,
    make_consumer,
    make_producer,
    max_message_bytes,
    wait_for_broker,
)
from forecaster.service.committer import Committer

CLIENTS = ["confluent", "kafka-python"]


@pytest.fixture(params=CLIENTS)
def settings(request, kafka_settings) -> KafkaSettings:
    kafka_settings.client = request.param
    return kafka_settings


def consume(consumer, count: int, timeout: float = 30.0) -> list:
    """Poll until ``count`` records arrived (or the timeout), then poll once more for strays."""
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        records.extend(consumer.poll(1000, 0.5))
    records.extend(consumer.poll(1000, 0.5))
    return records


def reader(settings: KafkaSettings, topic: str, partitions: int, isolation: str = "read_committed"):
    consumer = make_consumer(settings, ConsumerOptions(group_id=None, isolation_level=isolation))
    consumer.assign(dict.fromkeys(TopicPartition(topic, p) for p in range(partitions)))
    return consumer


def member(settings: KafkaSettings, topic: str, group: str, events: list | None = None):
    consumer = make_consumer(settings, ConsumerOptions(group_id=group, session_timeout_ms=6000))
    events = events if events is not None else []
    consumer.subscribe(
        topic,
        Rebalance(
            on_assign=lambda tps: events.append(("assign", sorted(tp[1] for tp in tps))),
            on_revoke=lambda tps: events.append(("revoke", sorted(tp[1] for tp in tps))),
        ),
    )
    return consumer


def test_marks_tell_when_the_records_before_them_were_answered(settings, topic_factory):
    topic = topic_factory(partitions=3)
    producer = make_producer(settings, ProducerOptions(linger_ms=1000))
    for index in range(50):
        producer.send(topic, b"first %d" % index, b"k%d" % index)
    first = producer.mark()  # the first mark covers every record sent before it
    assert not producer.answered(first)  # still lingering in the client: not answered, and no waiting
    for index in range(50):
        producer.send(topic, b"second %d" % index, b"k%d" % index)
    second = producer.mark()
    deadline = time.monotonic() + 30
    while not producer.answered(second) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert producer.answered(second) and producer.answered(first)  # second answered: first was too
    assert producer.answered(producer.mark())  # nothing sent since the answered second
    assert producer.take_failures() == []
    producer.close(10)
    records = consume(reader(settings, topic, 3), 100)
    assert len(records) == 100


def test_fetched_ends_are_the_ends_the_fetches_saw(settings, topic_factory):
    topic = topic_factory(partitions=1)
    producer = make_producer(settings)
    for index in range(5):
        producer.send(topic, b"%d" % index, b"k")
    assert producer.flush(30) == 0
    producer.close(10)
    consumer = reader(settings, topic, 1)
    assert len(consume(consumer, 5)) == 5
    tp = TopicPartition(topic, 0)
    ends = consumer.fetched_ends([tp])
    consumer.close()
    # librdkafka keeps the high watermark of each fetch response; kafka-python's is asked of the broker
    assert ends == ({tp: 5} if settings.client == "confluent" else {})


def test_many_records_sent_at_once_and_one_too_large_among_them(settings, topic_factory):
    topic = topic_factory(partitions=3)
    producer = make_producer(settings, ProducerOptions(message_max_bytes=4096))
    values = [b"v%03d" % i for i in range(100)]
    keys = [b"k%d" % (i % 7) for i in range(100)]
    assert producer.send_many(topic, values, keys) == 100  # all fit: one loop of sends

    class Counting(Committer):
        def commit(self, wait: bool = True) -> bool:
            return True

        def close(self, timeout: float) -> None: ...

    refused: list[str] = []
    committer = Counting(None, producer, interval_ms=100, max_records=10, on_send_failure=refused.append)
    mixed = [b"a" * 10, b"b" * 10_000, b"c" * 10]  # the second is over the limit
    committer.send_many(topic, mixed, [b"x", b"y", b"z"])
    assert refused == ["too_large"]
    assert producer.flush(30) == 0 and producer.take_failures() == []
    producer.close(10)
    records = consume(reader(settings, topic, 3), 102)
    assert sorted(r.value for r in records) == sorted([*values, b"a" * 10, b"c" * 10])


def test_keyed_records_keep_their_partition_and_order(settings, topic_factory, group_factory):
    topic = topic_factory(partitions=4)
    producer = make_producer(settings)
    for index in range(6):
        for key in ("alpha", "beta", "gamma", "delta", "epsilon"):
            producer.send(topic, f"{key}:{index}".encode(), key.encode())
    assert producer.flush(30) == 0 and producer.take_failures() == []
    producer.close(10)

    events: list = []
    consumer = member(settings, topic, group_factory(), events)
    records = consume(consumer, 30)
    consumer.close()

    assert len(records) == 30
    assert events[0] == ("assign", [0, 1, 2, 3])  # cooperative: the whole assignment, incrementally
    partitions_of_key: dict[str, set[int]] = {}
    values_of_key: dict[str, list[str]] = {}
    for record in records:
        key = record.key.decode()
        partitions_of_key.setdefault(key, set()).add(record.partition)
        values_of_key.setdefault(key, []).append(record.value.decode())
        assert record.topic == topic and record.timestamp > 0
    assert all(len(parts) == 1 for parts in partitions_of_key.values())
    for key, values in values_of_key.items():
        assert values == [f"{key}:{i}" for i in range(6)]


def test_transaction_commits_records_and_consumed_offsets_together(settings, topic_factory, group_factory):
    source, sink = topic_factory(partitions=1), topic_factory(partitions=1)
    group = group_factory()
    plain = make_producer(settings)
    for i in range(3):
        plain.send(source, f"in-{i}".encode(), b"s")
    plain.flush(30)
    plain.close(10)

    # Step 1. A member of the group reads the input, as the service does.
    consumer = member(settings, source, group)
    inputs = consume(consumer, 3)
    assert [r.value for r in inputs] == [b"in-0", b"in-1", b"in-2"]

    # Step 2. Outputs and the input offsets commit in one transaction; a second transaction aborts.
    producer = make_producer(settings, ProducerOptions(transactional_id=f"tx-{group}"))
    producer.init_transactions(30)
    producer.begin_transaction()
    for r in inputs:
        producer.send(sink, b"out-" + r.value, r.key)
    consumed = {TopicPartition(source, 0): inputs[-1].offset + 1}
    producer.send_offsets_to_transaction(consumed, consumer.group_metadata(), 30)
    producer.commit_transaction(30)

    producer.begin_transaction()
    producer.send(sink, b"aborted", b"s")
    producer.flush(30)
    producer.abort_transaction(30)

    producer.begin_transaction()
    producer.send(sink, b"open", b"s")
    producer.flush(30)
    # Step 3. While a transaction is open, read_committed ends at the last stable offset.
    tp = TopicPartition(sink, 0)
    committed_reader = reader(settings, sink, 1)
    uncommitted_reader = reader(settings, sink, 1, "read_uncommitted")
    stable, high = committed_reader.end_offsets([tp], 10)[tp], uncommitted_reader.end_offsets([tp], 10)[tp]
    assert stable < high
    producer.commit_transaction(30)
    producer.close(10)
    consumer.close()

    # Step 4. read_committed sees the committed records only; read_uncommitted proves the abort wrote.
    seen = [r.value for r in consume(committed_reader, 4)]
    assert seen == [b"out-in-0", b"out-in-1", b"out-in-2", b"open"]
    assert committed_reader.position([tp])[tp] == committed_reader.end_offsets([tp], 10)[tp]  # past markers
    assert b"aborted" in [r.value for r in consume(uncommitted_reader, 5)]
    committed_reader.close()
    uncommitted_reader.close()

    # Step 5. The group's committed offset is the one sent through the transaction.
    resumed = member(settings, source, group)
    assert resumed.committed([TopicPartition(source, 0)], 10) == {(source, 0): inputs[-1].offset + 1}
    resumed.close()


def test_pause_seek_resume_on_a_newly_assigned_partition(settings, topic_factory, group_factory):
    """What a restore does: pause in the assignment callback, then seek and resume after the poll."""
    topic = topic_factory(partitions=1)
    producer = make_producer(settings)
    for i in range(5):
        producer.send(topic, str(i).encode(), b"k")
    producer.flush(30)
    producer.close(10)
    tp = TopicPartition(topic, 0)
    consumer = make_consumer(settings, ConsumerOptions(group_id=group_factory()))
    # The topic in the consumer's metadata first: joined before it, kafka-python's member is given no
    # partition and asks again only at its next metadata refresh (minutes).
    assert consumer.partitions_for(topic, 60) == [0]
    consumer.subscribe(topic, Rebalance(on_assign=lambda tps: consumer.pause(tps)))
    deadline = time.monotonic() + 90  # a new topic's metadata can come late on a loaded machine
    while not consumer.assignment() and time.monotonic() < deadline:
        assert consumer.poll(100, 0.2) == []  # paused: nothing is consumed before the restore
    assert tp in consumer.assignment(), "no partition assigned within 90 s"
    assert consumer.poll(100, 0.5) == []
    consumer.seek(tp, 3)
    consumer.resume([tp])
    assert [r.value for r in consume(consumer, 2)] == [b"3", b"4"]
    consumer.close()


def test_a_record_over_the_size_limit_is_refused_before_it_is_sent(settings, topic_factory):
    topic = topic_factory(partitions=1, config={"max.message.bytes": "20000"})
    assert max_message_bytes(settings, [topic]) == 20000
    producer = make_producer(settings, ProducerOptions(message_max_bytes=20000))
    with pytest.raises(KafkaClientError) as refused:
        producer.send(topic, b"x" * 30000, b"k")
    assert refused.value.reason == "too_large"
    producer.send(topic, b"x" * 1000, b"k")
    assert producer.flush(30) == 0 and producer.take_failures() == []
    producer.close(10)


def test_ensure_topics_creates_a_compacted_topic(settings, group_factory):
    name = group_factory("compacted")
    spec = TopicSpec(name, partitions=4, config=COMPACTED)
    admin = make_admin(settings)
    try:
        assert ensure_topics(settings, [spec]) == [name]
        described = admin.describe([name], ["cleanup.policy"], 30)[name]
        assert described.partitions == 4 and described.config["cleanup.policy"] == "compact"
        # A second call finds the topic as specified and creates nothing.
        assert ensure_topics(settings, [spec]) == []
    finally:
        admin.delete([name], 30)
        admin.close()


def test_ensure_topics_refuses_a_partition_count_mismatch(kafka_admin, topic_factory):
    topic = topic_factory(partitions=2)
    with pytest.raises(KafkaSetupError, match=rf"{topic} has 2 partitions, expected 3"):
        ensure_topics(kafka_admin, [TopicSpec(topic, partitions=3)])


def test_ensure_topics_refuses_a_topic_that_is_not_compacted(kafka_admin, topic_factory):
    topic = topic_factory(partitions=2)
    with pytest.raises(KafkaSetupError, match=rf"{topic} has cleanup.policy=delete, expected compact"):
        ensure_topics(kafka_admin, [TopicSpec(topic, partitions=2, config=COMPACTED)])


def test_producing_to_a_missing_topic_fails_rather_than_creating_it(settings, kafka_admin, group_factory):
    name = group_factory("never-created")
    producer = make_producer(
        settings,
        ProducerOptions(
            extra={"max_block_ms": 2000}
            if settings.client == "kafka-python"
            else {"message.timeout.ms": 2000, "topic.metadata.propagation.max.ms": 1000}
        ),
    )
    try:
        producer.send(name, b"x")
        producer.flush(5)
        failed = producer.take_failures()
    except KafkaClientError:
        failed = ["refused at send"]
    assert failed
    producer.close(1)
    assert name not in kafka_admin.list_topics(10)


@pytest.mark.parametrize("client", CLIENTS)
def test_wait_for_broker_names_the_address_when_nothing_answers(client):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}", client=client)
    with pytest.raises(KafkaSetupError, match=f"127.0.0.1:{port}"):
        wait_for_broker(settings, timeout=2)


def test_both_clients_put_a_key_in_the_partition_the_java_client_would(kafka_settings, topic_factory):
    """murmur2, as Kafka's own producer: a series keeps one partition whichever client produced it."""
    from forecaster.metrics.series import kafka_partition  # the Java client's murmur2 partitioner

    topic = topic_factory(partitions=6)
    keys = [f"series-{i}" for i in range(40)]
    for client in CLIENTS:
        producer = make_producer(kafka_settings.model_copy(update={"client": client}))
        for key in keys:
            producer.send(topic, client.encode(), key.encode())
        assert producer.flush(30) == 0 and producer.take_failures() == []
        producer.close(10)
    consumer = reader(kafka_settings, topic, 6)
    records = consume(consumer, 2 * len(keys))
    consumer.close()
    assert len(records) == 2 * len(keys)
    where = {(r.value.decode(), r.key.decode()): r.partition for r in records}
    for key in keys:
        assert where["confluent", key] == where["kafka-python", key] == kafka_partition(key, 6), key
