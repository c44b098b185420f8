"""The transactional commit and the partition owner with in-memory clients: the four steps in order, an
abort resets state to the last commit, an indefinite error replaces the producer, fencing stops, and the
rebalance events restore, keep or drop the right partitions. Real-broker behaviour: test_exactly_once.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from forecaster.engine.engine import Engine
from forecaster.errors import KafkaClientError, ProducerFenced
from forecaster.model import RecurrentForecaster
from forecaster.retry import Backoff
from forecaster.service.clients import TopicPartition
from forecaster.service.clients.base import Producer
from forecaster.service.exactly_once import changelog
from forecaster.service.exactly_once.changelog import ChangelogContents
from forecaster.service.exactly_once.committer import ExactlyOnceCommitter, is_fenced
from forecaster.service.exactly_once.ledger import SeriesLedger
from forecaster.service.exactly_once.recovery import PartitionOwner

TOPIC = "in"


class FakeProducer:
    """A transactional producer that records calls; ``fail`` maps a method name to the error it raises."""

    send_many = Producer.send_many  # the interface's own, over this fake's send

    def __init__(self, log: list, fail: dict | None = None) -> None:
        self.log, self.fail, self.closed = log, dict(fail or {}), False

    def _call(self, name: str, *args) -> None:
        self.log.append((name, *args))
        error = self.fail.pop(name, None)
        if error is not None:
            raise error

    def init_transactions(self, timeout):
        self._call("init")

    def begin_transaction(self):
        self._call("begin")

    def send(self, topic, value, key=None, partition=None):
        self._call("send", topic, key, partition)

    def take_failures(self):
        return []

    def send_offsets_to_transaction(self, offsets, group_metadata, timeout):
        self._call("offsets", {tp[1]: offset for tp, offset in offsets.items()}, group_metadata)

    def commit_transaction(self, timeout):
        self._call("commit")

    def abort_transaction(self, timeout):
        self._call("abort")

    def close(self, timeout=None):
        self.closed = True


def rec(partition: int, offset: int) -> SimpleNamespace:
    return SimpleNamespace(topic=TOPIC, partition=partition, offset=offset)


def make_committer(fail=None, changes=(), **kwargs):
    log: list = []
    made: list[FakeProducer] = []

    def factory() -> FakeProducer:
        made.append(FakeProducer(log, fail if not made else None))
        return made[-1]

    consumer = SimpleNamespace(group_metadata=lambda: "gen-7", generation=lambda: 7)
    outcomes: list[bool] = []
    committer = ExactlyOnceCommitter(
        consumer,
        factory,
        lambda: list(changes),
        changelog_topic="cl",
        interval_ms=100,
        max_records=3,
        on_commit=outcomes.append,
        timeout_s=kwargs.pop("timeout_s", 5.0),
        **kwargs,
    )
    return committer, log, made, outcomes


def test_one_transaction_per_interval_in_four_steps() -> None:
    committer, log, _, outcomes = make_committer(changes=[(1, b"s", b"state")])
    assert not committer.due() and committer.commit()  # nothing open: nothing to do
    committer.track([rec(0, 4), rec(0, 5)])
    committer.track([rec(1, 9)])
    assert committer.due()  # three records
    committer.send("out", b"v", b"s")  # a forecast of the interval
    assert committer.commit() and outcomes == [True]
    assert log == [
        ("init",),
        ("begin",),
        ("send", "out", b"s", None),
        ("send", "cl", b"s", 1),  # Step 2: the changelog at the series' input partition
        ("offsets", {0: 6, 1: 10}, "gen-7"),  # Step 3: the next offsets, with the group metadata
        ("commit",),  # Step 4
    ]
    assert not committer.open and committer.pending == {} and committer.failed is None


def test_an_abortable_error_aborts_and_asks_for_a_reset() -> None:
    committer, log, made, outcomes = make_committer(
        fail={"offsets": KafkaClientError("group", "generation moved")}
    )
    committer.track([rec(0, 1)])
    assert not committer.commit()
    assert log[-1] == ("abort",) and ("commit",) not in log
    assert committer.failed == "aborted" and outcomes == [False] and not committer.open
    committer.recover()
    assert committer.failed is None and len(made) == 1  # the same producer goes on


def test_an_indefinite_error_replaces_the_producer() -> None:
    committer, log, made, _ = make_committer(fail={"commit": KafkaClientError("timeout", "no answer")})
    committer.track([rec(0, 1)])
    assert not committer.commit() and committer.failed == "replace"
    assert ("abort",) not in log  # not retried on the old producer
    committer.recover()
    assert len(made) == 2 and made[0].closed and committer.producer is made[1]
    assert log[-1] == ("init",)  # the new producer settles the old transaction


def test_a_commit_that_never_answers_is_an_indefinite_error() -> None:
    committer, _, made, _ = make_committer(timeout_s=0.2)
    committer.track([rec(0, 1)])
    committer.producer.commit_transaction = lambda timeout: (_ for _ in ()).throw(
        KafkaClientError("timeout", f"commit_transaction still waiting after {timeout:g} s")
    )
    assert not committer.commit() and committer.failed == "replace"


def test_a_fenced_producer_raises_and_sends_nothing_more() -> None:
    committer, log, _, _ = make_committer(fail={"commit": KafkaClientError("fenced", "epoch bumped")})
    committer.track([rec(0, 1)])
    with pytest.raises(ProducerFenced):
        committer.commit()
    assert committer.fenced and ("abort",) not in log
    committer.track([rec(0, 2)])
    assert committer.commit() is False and log.count(("commit",)) == 1


def test_is_fenced_looks_through_causes() -> None:
    try:
        try:
            raise KafkaClientError("fenced", "producer fenced")
        except KafkaClientError as inner:
            raise RuntimeError("User rebalance callback throws an error") from inner
    except RuntimeError as outer:
        assert is_fenced(outer)
    assert not is_fenced(KafkaClientError("other", "something else"))
    assert is_fenced(ProducerFenced("zombie"))


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_library_errors_are_sorted_by_kind_at_the_boundary(client) -> None:
    if client == "confluent":
        from confluent_kafka import KafkaError, KafkaException

        from forecaster.service.clients.confluent import translate

        def make(code):
            return KafkaException(KafkaError(getattr(KafkaError, code)))

        cases = {
            "_FENCED": "fenced",
            "ILLEGAL_GENERATION": "group",
            "_TIMED_OUT": "timeout",
            "MSG_SIZE_TOO_LARGE": "too_large",
            "SASL_AUTHENTICATION_FAILED": "auth",
        }
    else:
        import kafka.errors as errors

        from forecaster.service.clients.kafkapython import translate

        def make(name):
            return getattr(errors, name)()

        cases = {
            "ProducerFencedError": "fenced",
            "CommitFailedError": "group",
            "KafkaTimeoutError": "timeout",
            "MessageSizeTooLargeError": "too_large",
            "TopicAuthorizationFailedError": "auth",
        }
    for name, reason in cases.items():
        error = translate(make(name), "a call")
        assert error.reason == reason, name


# ---- the partition owner ---------------------------------------------------------------------------------


class FakeConsumer:
    def __init__(self, committed: dict[int, int | None]):
        self.committed_offsets = committed
        self.paused: set[int] = set()
        self.positions: dict[int, int | str] = {}

    def pause(self, tps):
        self.paused |= {tp.partition for tp in tps}

    def resume(self, tps):
        self.paused -= {tp.partition for tp in tps}

    def committed(self, tps, timeout):
        return {tp: self.committed_offsets.get(tp.partition) for tp in tps}

    def seek(self, tp, offset):
        self.positions[tp.partition] = "beginning" if offset is None else offset

    def group_metadata(self):
        return "metadata"

    def generation(self):
        return self.generation_id

    generation_id = 4
    subscriptions = 0

    def unsubscribe(self):
        self.paused, self.positions = set(), {}

    def subscribe(self, topic, rebalance):
        self.subscriptions += 1
        self.rebalance = rebalance


class FakeReader:
    stable_timeout = 1.0

    def __init__(self, latest: dict[int, dict[str, bytes]]):
        self.latest, self.reads = latest, []

    def read(self, parts, divert=None):
        self.reads.append(sorted(parts))
        latest = {}
        for p in parts:
            latest[p] = {}
            for name, value in self.latest.get(p, {}).items():
                if divert is None or not divert(p, name, value):
                    latest[p][name] = value
        return ChangelogContents(latest, records=1)


def _engine() -> Engine:
    torch.manual_seed(0)
    return Engine(
        RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2), window=4, clock=lambda: 0.0
    )


def make_owner(cooperative: bool, committed=None, latest=None):
    engine = _engine()
    ledger = SeriesLedger(engine)
    consumer = FakeConsumer(committed or {})
    committer, log, _, _ = make_committer()
    committer.changes = ledger.changes
    committer.consumer = consumer
    reports = []
    owner = PartitionOwner(
        consumer,
        committer,
        ledger,
        FakeReader(latest or {}),
        topic=TOPIC,
        cooperative=cooperative,
        on_restore=reports.append,
    )
    return owner, engine, consumer, log, reports


def catch_up(owner: PartitionOwner) -> bool:
    """What the loop does between a poll and the next: True when that poll's records are dropped."""
    dropped = owner.rewinding
    if owner.required:
        owner.run()
    return dropped


def tps(*parts: int) -> list[TopicPartition]:
    return [TopicPartition(TOPIC, p) for p in parts] + [TopicPartition("other", 0)]


def test_assigned_partitions_are_paused_until_restored_then_resume_at_the_committed_offsets() -> None:
    source = _engine()
    source.process(["x"], [5], [1.0])
    latest = {1: {"x": changelog.encode(source.snapshot("x"))}}
    owner, engine, consumer, _, reports = make_owner(True, committed={0: 12, 1: None}, latest=latest)
    owner.assigned(tps(0, 1))
    assert consumer.paused == {0, 1} and owner.to_restore == {0, 1} and engine.resident == 0
    assert catch_up(owner) is False  # nothing to drop: no reset
    assert consumer.paused == set() and owner.to_restore == set()
    assert consumer.positions == {0: 12, 1: "beginning"}
    assert set(engine.table.slots) == {"x"} and owner.ledger.partition_of == {"x": 1}
    assert reports[0].resident == 1 and reports[0].partitions == [0, 1]
    assert engine.process(["x"], [5], [2.0]).duplicates == 1  # restored last ts


def _stepped(owner, engine, names_parts):
    names = [n for n, _ in names_parts]
    engine.process(names, [1] * len(names), [1.0] * len(names))
    owner.ledger.note(names, [p for _, p in names_parts])
    owner.committer.track([rec(p, 0) for _, p in names_parts])


def test_cooperative_revoke_commits_then_drops_only_those_partitions() -> None:
    owner, engine, consumer, log, _ = make_owner(True)
    owner.assigned(tps(0, 1))
    catch_up(owner)
    _stepped(owner, engine, [("a", 0), ("b", 1)])
    owner.revoked(tps(1))
    assert ("commit",) in log and [e for e in log if e[0] == "send" and e[1] == "cl"]  # state written first
    assert set(engine.table.slots) == {"a"} and owner.owned == {0}


def test_eager_rebalance_keeps_the_state_of_partitions_assigned_back() -> None:
    owner, engine, consumer, log, _ = make_owner(False)
    owner.assigned(tps(0, 1, 2))
    catch_up(owner)
    _stepped(owner, engine, [("a", 0), ("b", 1), ("c", 2)])
    owner.revoked(tps(0, 1, 2))  # eager: everything is revoked
    assert ("commit",) in log and engine.resident == 3
    owner.assigned(tps(0, 2, 3))
    assert set(engine.table.slots) == {"a", "c"} and owner.to_restore == {3} and consumer.paused == {3}


def test_a_failed_transaction_resets_every_owned_partition_to_the_changelog() -> None:
    owner, engine, consumer, log, _ = make_owner(True, committed={0: 3})
    owner.assigned(tps(0))
    catch_up(owner)
    _stepped(owner, engine, [("a", 0)])
    owner.committer.producer.fail["commit"] = KafkaClientError("abortable", "aborted by the coordinator")
    assert not owner.committer.commit()
    assert catch_up(owner) is True  # the records of that poll are dropped: consumed again
    assert engine.resident == 0  # nothing committed for "a": it starts over from the committed offset
    assert consumer.positions == {0: 3} and owner.reader.reads == [[0], [0]] and consumer.paused == set()


def test_lost_partitions_abort_and_drop() -> None:
    owner, engine, _, log, _ = make_owner(True)
    owner.assigned(tps(0))
    catch_up(owner)
    _stepped(owner, engine, [("a", 0)])
    owner.lost(tps(0))
    assert log[-1] == ("abort",) and engine.resident == 0 and owner.owned == set()
    assert owner.committer.failed == "aborted"  # reset harmless: nothing left owned
    assert catch_up(owner) is True and owner.reader.reads == [[0]]


def test_revoked_partition_that_was_never_restored_is_simply_forgotten() -> None:
    owner, _, consumer, _, _ = make_owner(True)
    owner.assigned(tps(0, 1))
    owner.revoked(tps(1))
    assert owner.to_restore == {0}
    catch_up(owner)
    assert owner.reader.reads == [[0]]
    assert np.array_equal(sorted(consumer.positions), [0])


def test_offsets_refused_twice_without_a_rebalance_make_the_member_join_again() -> None:
    owner, engine, consumer, _, _ = make_owner(True, committed={0: 0})
    owner.assigned(tps(0))
    catch_up(owner)
    for attempt in (1, 2):
        _stepped(owner, engine, [("a", 0)])
        owner.committer.producer.fail["offsets"] = KafkaClientError("group", "UNKNOWN_MEMBER_ID")
        assert not owner.committer.commit()
        assert catch_up(owner) is True
        # first refusal: reset and restore as usual; second at the same generation: leave and join again
        assert consumer.subscriptions == (0 if attempt == 1 else 1)
    assert owner.owned == set() and engine.resident == 0 and consumer.rebalance is owner.rebalance
    owner.assigned(tps(0))  # the new membership's assignment restores everything again
    assert owner.to_restore == {0}


def test_a_refusal_after_a_rebalance_does_not_rejoin() -> None:
    owner, engine, consumer, _, _ = make_owner(True)
    owner.assigned(tps(0))
    catch_up(owner)
    for generation in (4, 5):  # the consumer saw the rebalance between the two refusals
        consumer.generation_id = generation
        _stepped(owner, engine, [("a", 0)])
        owner.committer.producer.fail["offsets"] = KafkaClientError("group", "ILLEGAL_GENERATION")
        owner.committer.commit()
        catch_up(owner)
    assert consumer.subscriptions == 0


def test_the_transaction_timeout_is_a_setting_reaching_the_producer(tmp_path) -> None:
    from forecaster.config import Settings
    from forecaster.service.build import producer_options

    settings = Settings(
        service={"transaction_timeout_ms": 120_000, "instance_id": "i1"},
        kafka={"group_id": "g"},
        state={"spill_dir": tmp_path},
    )
    options = producer_options(settings)
    assert options.transaction_timeout_ms == 120_000 and options.transactional_id == "g-i1"
    assert producer_options(Settings()).transaction_timeout_ms == 60_000
    at_least_once = Settings(service={"processing_guarantee": "at_least_once"})
    assert producer_options(at_least_once).transactional_id is None
    with pytest.raises(ValueError):
        Settings(service={"transaction_timeout_ms": 999})


def test_evictions_without_input_are_committed_in_their_own_transaction() -> None:
    waiting = [True]
    committer, log, _, outcomes = make_committer(changes=[(2, b"gone", b"evicted state")])
    committer.waiting = lambda: waiting[0]
    committer.interval_ms = 0
    assert committer.due()  # nothing was polled, but an eviction waits
    assert committer.commit() and outcomes == [True]
    assert log[1:] == [("begin",), ("send", "cl", b"gone", 2), ("commit",)]  # no offsets: none moved
    waiting[0] = False
    assert not committer.due()


def test_a_member_dropped_by_the_group_does_not_commit_its_offsets() -> None:
    committer, log, _, outcomes = make_committer()
    committer.consumer.generation = lambda: -1  # the client noticed, it has not joined again yet
    committer.track([rec(0, 1)])
    assert not committer.commit()
    assert log[-1] == ("abort",) and not any(e[0] == "offsets" for e in log)
    assert committer.failed == "aborted" and outcomes == [False]


def test_a_write_the_broker_does_not_allow_aborts_and_stops() -> None:
    committer, log, _, _ = make_committer(
        fail={"commit": KafkaClientError("auth", "TOPIC_AUTHORIZATION_FAILED")}
    )
    committer.track([rec(0, 1)])
    with pytest.raises(KafkaClientError):
        committer.commit()
    assert log[-1] == ("abort",) and not committer.open  # nothing of it commits


class FlakyReader(FakeReader):
    """Fails its first ``failures`` reads as librdkafka does just after a broker restart."""

    def __init__(self, latest, failures: int, reason: str = "other"):
        super().__init__(latest)
        self.failures, self.reason = failures, reason

    def read(self, parts, divert=None):
        if self.failures:
            self.failures -= 1
            raise KafkaClientError(self.reason, "read the offsets of cl[0]: Local: Unknown partition")
        return super().read(parts, divert)


def test_a_restore_that_fails_on_a_passing_broker_error_is_tried_again_on_the_next_turn() -> None:
    source = _engine()
    source.process(["x"], [5], [1.0])
    latest = {0: {"x": changelog.encode(source.snapshot("x"))}}
    owner, engine, consumer, _, reports = make_owner(True, committed={0: 3})
    waits = []
    owner.reader = FlakyReader(latest, failures=2)
    owner._restore_backoff = Backoff(first=0.1, jitter=0.0, sleep=waits.append)
    owner.assigned(tps(0))
    catch_up(owner)
    catch_up(owner)  # two turns fail: still paused, nothing consumed, nothing raised
    assert consumer.paused == {0} and owner.to_restore == {0} and waits == [0.1, 0.2]
    catch_up(owner)
    assert consumer.paused == set() and owner.to_restore == set() and consumer.positions == {0: 3}
    assert set(engine.table.slots) == {"x"} and len(reports) == 1


def test_a_restore_refused_for_lack_of_rights_is_not_tried_again() -> None:
    owner, _, _, _, _ = make_owner(True, committed={0: 3})
    owner.reader = FlakyReader({}, failures=1, reason="auth")
    owner.assigned(tps(0))
    with pytest.raises(KafkaClientError):
        catch_up(owner)
