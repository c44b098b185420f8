"""The service loop with in-memory consumer and producer: ordering of flush and commit, dead letters,
graceful stop, readiness, hot-swap hook. The real-broker behaviour is in tests/integration/test_service.py."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from forecaster.config import Settings
from forecaster.engine.engine import Engine, reference_forecast
from forecaster.errors import DeliveryError, KafkaClientError
from forecaster.metrics import ServiceMetrics
from forecaster.model import RecurrentForecaster
from forecaster.records import encode_input, encode_window
from forecaster.scaling import Scaling
from forecaster.service.at_least_once import AtLeastOnceCommitter, NoRecovery
from forecaster.service.build import _NoLedger
from forecaster.service.clients import Failure, Record, TopicPartition
from forecaster.service.clients.base import Producer
from forecaster.service.health import Health
from forecaster.service.loop import Service

TOPIC = "in"
NOW = 1_800_000_000.0


class FakeProducer:
    message_max_bytes = 1_000_000

    send_many = Producer.send_many  # the interface's own, over this fake's send

    def __init__(self, events: list, fail: bool = False, too_large: tuple[str, ...] = ()) -> None:
        self.events, self.fail, self.too_large = events, fail, too_large
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.failures: list[Failure] = []
        self.closed = False

    def send(self, topic, value, key=None, partition=None):
        if topic in self.too_large:
            raise KafkaClientError("too_large", f"a record to {topic} exceeds the limit")
        self.sent.append((topic, key, value))
        self.events.append(("send", topic))
        if self.fail:
            self.failures.append(Failure(topic, key, "unavailable", "broker said no"))

    def flush(self, timeout=None):
        self.events.append(("flush",))
        self.hold = False
        return 0

    hold = False  # True: the broker has not answered yet (until flush, or the test lets it)

    def mark(self):
        return len(self.sent)

    def answered(self, mark):
        if self.hold:
            return False
        self.events.append(("answered",))
        return True

    def take_failures(self):
        failures, self.failures = self.failures, []
        return failures

    def close(self, timeout=None):
        self.closed = True

    def bodies(self, topic: str) -> list[dict]:
        return [json.loads(value) for t, _, value in self.sent if t == topic]


class FakeConsumer:
    """Serves the given batches one poll each, then empty polls; ``on_poll(n)`` runs before poll n. The
    first poll assigns partitions 0 and 1."""

    name = "fake"

    def __init__(
        self, events: list, batches: list[list], on_poll=None, commit_error: Exception | None = None
    ):
        self.events, self.batches, self.on_poll = events, list(batches), on_poll
        self.commit_error = commit_error
        self.commits: list[dict] = []
        self.polls = 0
        self.closed = False
        self.rebalance = None
        self.subscriptions = 0
        self.assigned: list[TopicPartition] = []
        self.end = 10

    def subscribe(self, topic, rebalance):
        self.rebalance = rebalance
        self.subscriptions += 1
        self.assigned = []

    def unsubscribe(self):
        self.assigned = []

    def poll(self, max_records, timeout):
        self.polls += 1
        if self.on_poll:
            self.on_poll(self.polls)
        if not self.assigned:
            self.assigned = [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)]
            self.rebalance.on_assign(list(self.assigned))
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets, wait=True):
        self.events.append(("commit",))
        if self.commit_error:
            raise self.commit_error
        self.commits.append({tp[1]: offset for tp, offset in offsets.items()})
        if not wait:  # the broker's answer, which a real client serves from a later poll
            self.commit_answered(True, "")

    def assignment(self):
        return list(self.assigned)

    def partitions_for(self, topic, timeout):
        return [0, 1]

    fetched: int | None = None  # the end the client's fetches saw (None: it cannot tell)
    asked_ends = 0

    def end_offsets(self, tps, timeout):
        self.asked_ends += 1
        return {tp: self.end for tp in tps}

    def fetched_ends(self, tps):
        return {} if self.fetched is None else {tp: self.fetched for tp in tps}

    def position(self, tps):
        return {tp: 7 for tp in tps}

    def committed(self, tps, timeout):
        return {tp: None for tp in tps}

    def seek(self, tp, offset):
        self.events.append(("seek", tp[1], offset))

    def close(self):
        self.closed = True


class FakeSwapper:
    def __init__(self, version: str | None = None) -> None:
        self.version, self.started, self.stopped = version, False, False

    def start(self):
        self.started = True
        return self

    def stop(self):
        self.stopped = True

    def swap_if_ready(self, engine):
        version, self.version = self.version, None
        if version:
            engine.version = version
        return version


def rec(
    partition: int,
    offset: int,
    value: bytes | None,
    key: bytes | None = None,
    timestamp: int = 1_700_000_000_000,
):
    return Record(TOPIC, partition, offset, timestamp, key, value)


def make_service(
    batches,
    *,
    fail=False,
    too_large=(),
    on_poll=None,
    commit_error=None,
    swapper=None,
    scaling="ewm",
    **service_settings,
):
    settings = Settings(
        kafka={"input_topic": TOPIC, "auto_create_topics": False},
        metrics={"port": 0},
        service={"commit_interval_ms": 0, "processing_guarantee": "at_least_once", **service_settings},
        scaling={"kind": scaling},
    )
    events: list = []
    torch_model = RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2)
    engine = Engine(torch_model, version="v1", window=8, clock=lambda: NOW, scaling=Scaling(scaling))
    consumer = FakeConsumer(events, batches, on_poll, commit_error)
    producer = FakeProducer(events, fail, too_large)
    committer = AtLeastOnceCommitter(
        consumer,
        producer,
        interval_ms=settings.service.commit_interval_ms,
        max_records=settings.service.commit_records,
    )
    metrics = ServiceMetrics(CollectorRegistry())
    committer.on_send_failure = lambda reason: metrics.records_unsent.labels(reason=reason).inc()
    committer.on_commit = lambda ok: ok and metrics.commits.inc()
    service = Service(
        settings,
        engine=engine,
        consumer=consumer,
        committer=committer,
        recovery=NoRecovery(committer),
        ledger=_NoLedger(),
        swapper=swapper or FakeSwapper(),
        metrics=metrics,
        clock=lambda: NOW,
    )
    service.producer = producer  # what the tests read
    return service, events


def run_batches(service: Service, polls: int) -> None:
    service.start()
    for _ in range(polls):
        service.process(service.poll())


def test_good_and_bad_records_in_one_batch():
    batch = [
        rec(0, 0, encode_input("a", 1000, 1.0), b"a"),
        rec(0, 1, b"not json"),
        rec(1, 0, encode_input("b", 1000, 2.0), b"b"),
        rec(1, 1, b'{"series": "zzz", "ts": 5, "value": NaN}'),
        rec(0, 2, encode_input("a", 2000, 1.5), b"a"),
    ]
    service, _ = make_service([batch])
    run_batches(service, 1)
    producer, metrics = service.producer, service.metrics.registry.get_sample_value
    forecasts = producer.bodies("ts.forecasts")
    assert sorted((f["series"], f["ts"]) for f in forecasts) == [("a", 1000), ("a", 2000), ("b", 1000)]
    assert {(f["series"], f["input"]["partition"], f["input"]["offset"]) for f in forecasts} == {
        ("a", 0, 0),
        ("a", 0, 2),
        ("b", 1, 0),
    }
    assert all(f["model_version"] == "v1" and len(f["forecast"]) == 2 for f in forecasts)
    assert all(
        key == f["series"].encode()
        for (t, key, _), f in zip(producer.sent, forecasts, strict=False)
        if t == "ts.forecasts"
    )
    dead = producer.bodies("ts.deadletter")
    assert sorted((d["reason"], d["partition"], d["offset"]) for d in dead) == [
        ("non_finite", 1, 1),
        ("not_json", 0, 1),
    ]
    assert metrics("forecaster_records_invalid_total", {"reason": "not_json"}) == 1
    assert metrics("forecaster_records_consumed_total") == 5
    assert metrics("forecaster_forecasts_emitted_total") == 3
    assert metrics("forecaster_end_to_end_latency_seconds_count") == 3
    assert service.engine.table.slot_of("zzz") is None  # a bad record changes no state


def test_log_scaling_dead_letters_values_that_are_not_positive():
    batch = [
        rec(0, 0, encode_input("a", 1000, 2.0), b"a"),
        rec(0, 1, encode_input("a", 2000, 0.0), b"a"),
        rec(0, 2, encode_window("b", [1000, 2000], [3.0, -1.0]), b"b"),
        rec(0, 3, encode_input("a", 3000, 4.0), b"a"),
    ]
    service, _ = make_service([batch], scaling="log")
    run_batches(service, 1)
    forecasts = service.producer.bodies("ts.forecasts")
    assert sorted((f["series"], f["ts"]) for f in forecasts) == [("a", 1000), ("a", 3000)]
    dead = service.producer.bodies("ts.deadletter")
    assert [(d["reason"], d["offset"]) for d in dead] == [("not_positive", 1), ("not_positive", 2)]
    assert service.engine.table.slot_of("b") is None  # the whole window is refused, no state changes
    expected = reference_forecast(service.engine.model, [2.0, 4.0], Scaling("log"))
    np.testing.assert_allclose(
        [f["forecast"] for f in sorted(forecasts, key=lambda f: f["ts"])], expected, rtol=1e-5
    )


def test_forecasts_equal_the_reference_across_batches():
    values = [10.0, 11.0, 9.5, 12.0, 10.5]
    batches = [[rec(0, i, encode_input("s", 1000 * (i + 1), v), b"s")] for i, v in enumerate(values)]
    service, _ = make_service(batches)
    run_batches(service, len(values))
    got = np.array([f["forecast"] for f in service.producer.bodies("ts.forecasts")])
    expected = reference_forecast(service.engine.model, values, Scaling())
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)


def test_windowed_record_gives_one_forecast_per_value_with_its_index():
    batch = [rec(1, 4, encode_window("w", [30, 10, 20], [3.0, 1.0, 2.0]), b"w")]
    service, _ = make_service([batch])
    run_batches(service, 1)
    forecasts = service.producer.bodies("ts.forecasts")
    assert [(f["ts"], f["index"]) for f in forecasts] == [(10, 1), (20, 2), (30, 0)]  # stepped in ts order
    assert {(f["input"]["partition"], f["input"]["offset"]) for f in forecasts} == {(1, 4)}


def test_commit_comes_after_the_output_was_answered_with_the_next_offsets():
    batch = [rec(0, 5, encode_input("a", 1, 1.0)), rec(1, 9, b"bad"), rec(0, 6, encode_input("a", 2, 1.0))]
    service, events = make_service([batch])
    run_batches(service, 1)
    assert service.consumer.commits == [{0: 7, 1: 10}]
    kinds = [e[0] for e in events]
    assert kinds.index("answered") > max(i for i, k in enumerate(kinds) if k == "send")
    assert kinds.index("commit") > kinds.index("answered")
    assert "flush" not in kinds  # the loop did not wait for the broker
    assert service.metrics.registry.get_sample_value("forecaster_commits_total") == 1  # once answered


def test_a_commit_answered_with_an_error_is_logged_not_counted(caplog):
    service, _ = make_service([[rec(0, 0, encode_input("a", 1, 1.0))]])
    service.consumer.commit_answered = lambda ok, detail: None  # the answer has not come yet
    run_batches(service, 1)
    assert service.consumer.commits == [{0: 1}]
    service.committer.commit_answered(False, "the group rebalanced")
    assert service.metrics.registry.get_sample_value("forecaster_commits_total") == 0
    assert "will be replayed: the group rebalanced" in caplog.text


def test_the_loop_commits_on_a_later_turn_once_the_broker_answered():
    batches = [[rec(0, 3, encode_input("a", 1, 1.0))], [rec(0, 4, encode_input("a", 2, 1.0))], []]
    service, events = make_service(batches)
    service.producer.hold = True
    run_batches(service, 1)
    assert service.consumer.commits == [] and ("flush",) not in events  # not answered: no commit, no wait
    assert service.committer.due()  # asked again next turn
    run_batches(service, 1)
    assert service.consumer.commits == []
    service.producer.hold = False
    run_batches(service, 1)  # an empty poll: what waited is committed
    assert service.consumer.commits == [{0: 5}]
    assert not service.committer.due()


def test_a_waiting_commit_waits_for_the_broker():
    service, events = make_service([[rec(0, 3, encode_input("a", 1, 1.0))]], commit_interval_ms=10**9)
    service.producer.hold = True
    run_batches(service, 1)
    assert service.consumer.commits == []
    assert service.committer.commit() is True  # a revoke, closing
    assert ("flush",) in events and service.consumer.commits == [{0: 4}]


def test_a_failed_send_stops_before_the_commit():
    service, events = make_service([[rec(0, 0, encode_input("a", 1, 1.0))]], fail=True)
    with pytest.raises(DeliveryError):
        run_batches(service, 1)
    service.close()  # as run() does on the way out: its final commit must not pass the failed records
    assert service.consumer.commits == [] and ("commit",) not in events


def test_commit_waits_for_interval_or_record_count():
    clock = [100.0]
    committer = AtLeastOnceCommitter(None, None, interval_ms=1000, max_records=3, clock=lambda: clock[0])
    assert not committer.due()  # nothing to commit
    committer.track([rec(0, 5, b"")])
    assert not committer.due()
    clock[0] += 1.0
    assert committer.due()
    clock[0] -= 1.0
    committer.track([rec(1, 0, b""), rec(1, 1, b"")])
    assert committer.due()  # three records
    assert committer.pending == {(TOPIC, 0): 6, (TOPIC, 1): 2}


def test_a_refused_commit_after_rebalance_is_not_fatal():
    service, _ = make_service(
        [[rec(0, 0, encode_input("a", 1, 1.0))]], commit_error=KafkaClientError("group", "rebalanced")
    )
    run_batches(service, 1)
    assert service.committer.pending == {}
    assert service.metrics.registry.get_sample_value("forecaster_commits_total") == 0


def test_revoked_partitions_commit_what_was_processed():
    service, _ = make_service([[rec(0, 3, encode_input("a", 1, 1.0))]], commit_interval_ms=10**9)
    run_batches(service, 1)
    assert service.consumer.commits == []
    service.consumer.rebalance.on_revoke([TopicPartition(TOPIC, 0)])
    assert service.consumer.commits == [{0: 4}]


def test_stop_finishes_the_batch_commits_and_closes():
    service = None

    def stop_during_second_poll(n: int) -> None:
        if n == 2:
            service.stop()  # what the SIGTERM handler does

    batches = [[rec(0, 0, encode_input("a", 1, 1.0))], [rec(0, 1, encode_input("a", 2, 2.0))]]
    service, _ = make_service(batches, on_poll=stop_during_second_poll, commit_interval_ms=10**9)
    assert service.run() == 0
    assert service.consumer.polls == 2  # no poll after the stop
    assert len(service.producer.bodies("ts.forecasts")) == 2  # the batch in hand was finished
    assert service.consumer.commits == [{0: 2}]
    assert service.consumer.closed and service.producer.closed and service.swapper.stopped


def test_ready_only_while_polling_with_partitions():
    service, _ = make_service([])
    service.start()
    assert not service.ready()
    service.poll()
    assert service.ready()
    service.close()
    assert not service.ready()


def test_a_loop_held_past_the_turn_limit_is_not_ready_but_still_alive():
    """A commit waiting on a broker that went away holds the loop: /readyz says so within seconds,
    /healthz only after stall_seconds."""
    from forecaster.service.health import Health

    now = [0.0]
    health = Health(stall_seconds=60.0, turn_seconds=5.0, clock=lambda: now[0])
    health.assigned([("in", 0)])
    health.turned()
    health.lag(0)
    assert health.ready() and health.healthy()
    now[0] = 4.9
    assert health.ready()
    now[0] = 5.1  # the loop has not turned for 5 s
    assert not health.ready() and health.healthy()
    health.turned()
    assert health.ready()


def test_a_swap_between_batches_updates_the_model_info():
    service, _ = make_service([], swapper=FakeSwapper("v2"))
    service.start()
    get = service.metrics.registry.get_sample_value
    assert get("forecaster_model_info", {"version": "v1", "cell": "gru"}) == 1
    service.swap_model_if_ready()
    assert get("forecaster_model_info", {"version": "v2", "cell": "gru"}) == 1
    assert get("forecaster_model_info", {"version": "v1", "cell": "gru"}) is None


def test_refresh_copies_state_error_and_lag():
    values = [rec(0, i, encode_input(s, 1000 * (i + 1), float(i)), s.encode()) for i, s in enumerate("aabb")]
    service, _ = make_service([values])
    run_batches(service, 1)
    service.refresh(force=True)
    get = service.metrics.registry.get_sample_value
    assert get("forecaster_series_resident") == 2
    assert get("forecaster_state_bytes") == service.engine.state_bytes
    assert get("forecaster_forecast_abs_error_count", {"model_version": "v1"}) == 2  # second value of a and b
    assert get("forecaster_consumer_lag", {"partition": "0"}) == 3  # fake end 10, position 7


def test_lag_comes_from_what_the_fetches_saw_while_records_flow():
    batches = [
        [rec(0, 6, encode_input("a", 1000, 1.0), b"a")],
        [rec(0, 7, encode_input("a", 2000, 1.0), b"a")],
    ]
    service, _ = make_service(batches)
    service.consumer.fetched = 12
    get = service.metrics.registry.get_sample_value
    for _ in batches:  # a record consumed before each look
        run_batches(service, 1)
        service.refresh(force=True)
        assert get("forecaster_consumer_lag", {"partition": "0"}) == 5  # fetched end 12, position 7
    assert service.consumer.asked_ends == 0  # the broker was not asked


def test_lag_without_progress_is_asked_of_the_broker():
    # the fetches' high watermark counts records of an open transaction; the broker's last stable offset
    # (the fake's end, 7) does not: read_committed has nothing to consume yet
    service, _ = make_service([])
    service.consumer.fetched, service.consumer.end = 12, 7
    run_batches(service, 1)
    service.refresh(force=True)
    assert service.consumer.asked_ends == 1
    assert service.metrics.registry.get_sample_value("forecaster_consumer_lag", {"partition": "0"}) == 0
    service.consumer.fetched = None  # a client that cannot tell: always asked
    service.refresh(force=True)
    assert service.consumer.asked_ends == 2


def test_a_record_too_large_to_send_is_counted_and_the_batch_goes_on():
    batch = [rec(0, 0, b"not json"), rec(0, 1, encode_input("a", 1000, 1.0), b"a")]
    service, _ = make_service([batch], too_large=("ts.deadletter",))
    run_batches(service, 1)
    get = service.metrics.registry.get_sample_value
    assert get("forecaster_records_unsent_total", {"reason": "too_large"}) == 1
    assert [f["series"] for f in service.producer.bodies("ts.forecasts")] == ["a"]
    assert service.consumer.commits == [{0: 2}]  # the bad record is behind us, not a poison pill


def test_a_record_the_broker_refused_for_its_size_is_counted_and_committed_past():
    service, _ = make_service([[rec(0, 0, encode_input("a", 1000, 1.0), b"a")]])
    service.producer.failures.append(Failure("ts.forecasts", b"a", "too_large", "MSG_SIZE_TOO_LARGE"))
    run_batches(service, 1)
    assert (
        service.metrics.registry.get_sample_value("forecaster_records_unsent_total", {"reason": "too_large"})
        == 1
    )
    assert service.consumer.commits == [{0: 1}]


def _with_clock(service: Service, stall_seconds: float = 30.0) -> list[float]:
    now = [0.0]
    service.health = Health(stall_seconds, clock=lambda: now[0])
    return now


def test_lag_without_progress_is_a_stall_logged_counted_unhealthy_and_rejoined(caplog):
    service, _ = make_service([])
    now = _with_clock(service)
    service.start()
    service.poll()  # partitions 0 and 1 assigned; lag 3 each (end 10, position 7)
    service.refresh(force=True)
    assert service.healthy() and service.ready()
    now[0] = 11.0
    service.poll()
    service.refresh(force=True)
    assert service.healthy() and not service.ready()  # lag and no progress: not ready
    now[0] = 31.0
    service.poll()
    service.refresh(force=True)
    assert not service.healthy()
    assert service.metrics.registry.get_sample_value("forecaster_stalls_total") == 1
    assert service.consumer.subscriptions == 2  # left the group and joined again
    assert sum("stalled:" in r.message for r in caplog.records) == 1
    service.consumer.end = 7  # caught up: no lag
    service.poll()
    service.refresh(force=True)
    assert service.healthy() and service.ready()


def test_lost_membership_without_new_partitions_is_a_stall():
    service, _ = make_service([])
    now = _with_clock(service, stall_seconds=20.0)
    service.start()
    service.poll()
    service.consumer.rebalance.on_lost(service.consumer.assignment())
    assert not service.ready()  # no partitions in a live group
    service.consumer.assigned = [TopicPartition(TOPIC, 0)]  # the client does not notice by itself
    now[0] = 21.0
    service.refresh(force=True)
    assert not service.healthy() and service.consumer.subscriptions == 2


def test_a_loop_that_does_not_turn_is_unhealthy():
    service, _ = make_service([])
    now = _with_clock(service, stall_seconds=20.0)
    service.start()
    service.poll()
    service.refresh(force=True)
    now[0] = 25.0  # a batch has held the loop this long; /healthz answers from its own thread
    assert not service.healthy() and not service.ready()


def test_the_broker_not_answering_makes_the_member_not_ready_and_is_said_once(caplog):
    service, _ = make_service([])
    service.start()
    service.poll()
    service.refresh(force=True)
    assert service.ready()

    def unreachable(tps, timeout):
        raise KafkaClientError("unavailable", "all brokers down")

    service.consumer.end_offsets = unreachable
    service.refresh(force=True)
    service.refresh(force=True)
    assert not service.ready() and service.healthy()
    assert sum("broker does not answer" in r.message for r in caplog.records) == 1


def test_a_batch_over_its_time_budget_puts_the_rest_back(monkeypatch):
    import forecaster.service.loop as loop

    monkeypatch.setattr(loop, "CHUNK_BYTES", 1)  # one record per chunk
    batch = [
        rec(p, o, encode_input(f"s{p}", 1000 * (o + 1), 1.0), f"s{p}".encode())
        for o in range(3)
        for p in (0, 1)
    ]
    service, events = make_service([batch], max_batch_ms=1000)
    ticks = iter([0.0, 0.5, 0.9, 1.2, 9.0, 9.0])  # the budget runs out before the fourth record
    service.timer = lambda: next(ticks)
    run_batches(service, 1)
    assert [f["input"]["offset"] for f in service.producer.bodies("ts.forecasts")] == [0, 0, 1]
    assert ("seek", 1, 1) in events and ("seek", 0, 2) in events  # read again from there
    assert service.consumer.commits == [{0: 2, 1: 1}]  # only what was processed


def test_a_poll_that_spans_a_stop_past_the_session_is_said_once(monkeypatch, caplog):
    """The process was stopped (SIGSTOP) inside a poll for longer than its session: said whatever the
    client reports next; an ordinary poll says nothing."""
    import forecaster.service.loop as loop_module

    now = [100.0]
    monkeypatch.setattr(loop_module.time, "monotonic", lambda: now[0])

    def stopped(n: int) -> None:
        if n == 3:
            now[0] += 12.0  # the poll returns 12 s after it began

    service, _ = make_service([], on_poll=stopped, session_timeout_ms=6000)
    service.start()
    with caplog.at_level(logging.WARNING, logger="forecaster.service.loop"):
        for _ in range(4):
            service.poll()
    said = [r.getMessage() for r in caplog.records if "stopped or starved" in r.getMessage()]
    assert len(said) == 1 and "for 12 s" in said[0] and "6000 ms" in said[0]
    service.close()
