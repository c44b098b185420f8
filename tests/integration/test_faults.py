"""Faults on the real broker, with each client: records up to the input topic's size limit (no poison
pill), evictions committed while no input arrives, and a member stopped past its session timeout."""

from __future__ import annotations

import signal
import time
from collections import Counter

from streams import AT_LEAST_ONCE, START_MS, records_of

from forecaster.service.exactly_once import changelog
from forecaster.tools.synthetic import generate

LIMIT = 200_000  # the input topic's max.message.bytes, and the service's producer limit


def test_records_up_to_the_input_limit_never_stop_the_service(topics, topic_factory, serve, broker):
    topics.input = topic_factory(partitions=3, config={"max.message.bytes": str(LIMIT)}, prefix="in")
    frame = generate(n_series=5, n_values=12, start_ms=START_MS, seed=31)
    good = records_of(frame)
    # Bad records of growing size: a dead letter carries the raw bytes in base64 (4/3 larger), so the
    # larger ones cannot be dead-lettered whole within the limit.
    sizes = [1_000, 60_000, 140_000, LIMIT - 2_000]
    bad = [(f"bad-{n}".encode(), b"{" + b"x" * (n - 1)) for n in sizes]
    mixed = []
    for i, record in enumerate(good):
        mixed.append(record)
        if i % 12 == 5 and bad:
            mixed.append(bad.pop(0))
    mixed += bad
    service = serve(FORECASTER_SERVICE__MAX_MESSAGE_BYTES=str(LIMIT)).start()
    broker.send(topics.input, mixed)

    forecasts = broker.read(topics.output, count=len(frame), timeout=60)
    got = Counter((r.json()["series"], r.json()["ts"]) for r in forecasts)
    assert set(got) == set(zip(frame["series"], frame["ts"], strict=True))  # every good value forecast

    def accounted() -> bool:
        samples = service.metrics()
        invalid = samples.get(("forecaster_records_invalid_total", (("reason", "not_json"),)), 0)
        return invalid == len(sizes)

    broker.wait_for(accounted, timeout=30, what="every bad record handled")
    dead = broker.read(topics.deadletter, count=len(sizes), timeout=30)
    unsent = service.metrics().get(("forecaster_records_unsent_total", (("reason", "too_large"),)), 0)
    assert len(dead) == len(sizes) and unsent == 0  # each one dead-lettered, cut to fit where needed
    bodies = {r.key: r.json() for r in dead}
    assert bodies[b"bad-1000"].get("raw_truncated") is None
    assert bodies[f"bad-{LIMIT - 2_000}".encode()]["raw_truncated"] is True
    assert all(len(r.value) <= LIMIT for r in dead)
    assert service.proc.poll() is None and service.http("/readyz")[0] == 200  # still serving
    assert service.terminate() == 0


def test_evictions_after_the_stream_stopped_are_committed_and_survive_a_restart(topics, serve, broker):
    frame = generate(n_series=4, n_values=5, start_ms=START_MS, seed=32)
    env = {"FORECASTER_STATE__TTL_SECONDS": "2", "FORECASTER_SERVICE__INSTANCE_ID": "evict"}
    first = serve(**env).start()
    broker.send(topics.input, records_of(frame))
    assert len(broker.read(topics.output, count=len(frame), timeout=30)) == len(frame)

    def evicted() -> bool:
        return first.metrics().get(("forecaster_state_evictions_total", ()), 0) == 4

    broker.wait_for(evicted, timeout=30, what="the idle series evicted")

    def flagged() -> bool:  # committed (read_committed) with the evicted flag, without any new input
        latest = {}
        for record in broker_read_committed(topics.bootstrap, topics.changelog):
            latest[record.key] = changelog.decode(record.value)[1]
        return len(latest) == 4 and all(latest.values())

    broker.wait_for(flagged, timeout=30, what="evictions in the changelog")
    assert first.kill() == -9  # no graceful commit: the commit interval did it
    second = serve(**env).start()
    broker.wait_for(
        lambda: second.metrics().get(("forecaster_series_restored_total", (("to", "evicted"),)), 0) == 4,
        timeout=30,
        what="restore",
    )
    samples = second.metrics()
    assert samples[("forecaster_series_restored_total", (("to", "resident"),))] == 0
    assert samples[("forecaster_series_resident", ())] == 0
    assert second.terminate() == 0


def broker_read_committed(bootstrap: str, topic: str) -> list:
    from forecaster.config import KafkaSettings
    from forecaster.service.clients import ConsumerOptions, TopicPartition, make_consumer

    settings = KafkaSettings(bootstrap_servers=bootstrap)
    consumer = make_consumer(settings, ConsumerOptions(group_id=None, isolation_level="read_committed"))
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for(topic, 10)]
        ends = consumer.end_offsets(tps, 10)
        consumer.assign(dict.fromkeys(tps))
        out: list = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(out) < sum(ends.values()):
            out.extend(consumer.poll(1000, 0.2))
            at = consumer.position(tps)
            if all(at.get(tp, 0) >= ends[tp] for tp in tps if ends[tp]):
                break
        return out
    finally:
        consumer.close()


def test_a_member_stopped_past_its_session_timeout_says_so_rejoins_and_loses_nothing(topics, serve, broker):
    frame = generate(n_series=20, n_values=60, start_ms=START_MS, seed=33)
    env = {**AT_LEAST_ONCE, "FORECASTER_SERVICE__SESSION_TIMEOUT_MS": "6000"}
    a = serve(**env, FORECASTER_SERVICE__INSTANCE_ID="a").start()
    b = serve(**env, FORECASTER_SERVICE__INSTANCE_ID="b").start()
    records = records_of(frame)
    broker.send(topics.input, records[: len(records) // 3])
    a.proc.send_signal(signal.SIGSTOP)
    time.sleep(10)  # past the session timeout: the group goes on with b alone
    broker.wait_for(lambda: b.http("/readyz")[0] == 200, timeout=30, what="b serving alone")
    broker.send(topics.input, records[len(records) // 3 : 2 * len(records) // 3])
    a.proc.send_signal(signal.SIGCONT)
    # What the member says depends on what its client reports: a lost assignment ("lost partitions"), or
    # only a rebalance; the poll that spanned the stop says so either way.
    said = ("lost partitions", "was stopped or starved")
    broker.wait_for(lambda: any(w in a.log_path.read_text() for w in said), timeout=120, what="a noticed")
    broker.wait_for(lambda: a.http("/readyz")[0] == 200, timeout=60, what="a back in the group")
    broker.send(topics.input, records[2 * len(records) // 3 :])
    expected = set(zip(frame["series"], frame["ts"], strict=True))

    def forecast() -> set:
        return {(r.json()["series"], r.json()["ts"]) for r in broker.read(topics.output, timeout=10)}

    broker.wait_for(lambda: forecast() >= expected, timeout=60, what="every value forecast")
    assert forecast() == expected  # nothing lost (at least once: a replay is allowed)
    text = a.log_path.read_text()
    assert text.count("lost partitions") <= 1 and text.count("was stopped or starved") <= 1, text[-3000:]
    assert "joins the group again" in text or "takes part in the next rebalance" in text  # what happens next
    assert a.http("/healthz")[0] == 200 and b.http("/healthz")[0] == 200
    assert a.terminate() == 0 and b.terminate() == 0
