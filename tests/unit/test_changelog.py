"""The state changelog: envelope format and its refusals, the series ledger (records per commit, evicted
series, drop, load), and reading partitions to a stable end. The real-broker behaviour is in
tests/integration/test_exactly_once.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forecaster.engine import snapshot as snap
from forecaster.engine.engine import Engine
from forecaster.errors import ChangelogRecordError, StateError
from forecaster.model import RecurrentForecaster
from forecaster.service.exactly_once import changelog
from forecaster.service.exactly_once.changelog import ChangelogContents, ChangelogReader
from forecaster.service.exactly_once.ledger import SeriesLedger


def _engine(version: str = "v1", seed: int = 0, **kwargs) -> Engine:
    torch.manual_seed(seed)
    model = RecurrentForecaster("gru", hidden_size=5, num_layers=1, horizon=2)
    return Engine(model, version=version, window=6, capacity=4, clock=lambda: 1000.0, **kwargs)


def _feed(engine: Engine, names: list[str], steps: int = 4, start: int = 1) -> None:
    rng = np.random.default_rng(len(names) + start)
    for t in range(start, start + steps):
        engine.process(names, [t] * len(names), rng.normal(50.0, 5.0, len(names)))


# ---- envelope ---------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(payload=st.binary(max_size=64), evicted=st.booleans())
def test_envelope_round_trip(payload: bytes, evicted: bool) -> None:
    assert changelog.decode(changelog.encode(payload, evicted)) == (payload, evicted)


@pytest.mark.parametrize(
    "value, reason",
    [
        (None, "corrupt"),
        (b"", "corrupt"),
        (b"FCC", "corrupt"),
        (b"XXXX\x01\x00abc", "corrupt"),
        (b"FCCL\x02\x00" + b"x" * 10, "unknown_version"),
        (
            b"FCCL\x01\x00" + snap.MAGIC + (snap.FORMAT_VERSION + 1).to_bytes(2, "little") + b"rest",
            "unknown_version",
        ),
    ],
)
def test_envelopes_that_cannot_be_read_are_refused_with_a_reason(value, reason: str) -> None:
    with pytest.raises(ChangelogRecordError) as caught:
        changelog.decode(value)
    assert caught.value.reason == reason and caught.value.reason in changelog.REFUSALS
    assert isinstance(caught.value, StateError)


def test_snapshot_errors_map_to_refusal_reasons() -> None:
    engine = _engine()
    _feed(engine, ["a"])
    good = engine.snapshot("a")
    flipped = good[:-1] + bytes([good[-1] ^ 1])
    other_shape = Engine(RecurrentForecaster("gru", hidden_size=7, num_layers=1, horizon=2), window=6)
    reasons = {}
    for name, data, table in (("crc", flipped, engine.table), ("shape", good, other_shape.table)):
        with pytest.raises(StateError) as caught:
            snap.decode(data, snap.table_shape(table))
        reasons[name] = changelog.refusal(caught.value)
    assert reasons == {"crc": "corrupt", "shape": "incompatible"}


# ---- the ledger ----------------------------------------------------------------------------------------


def test_changes_are_the_dirty_series_at_their_input_partition_then_nothing() -> None:
    engine = _engine()
    ledger = SeriesLedger(engine)
    _feed(engine, ["a", "b", "c"])
    ledger.note(["a", "b", "c"], [2, 0, 2])
    records = ledger.changes()
    assert sorted((p, k) for p, k, _ in records) == [(0, b"b"), (2, b"a"), (2, b"c")]
    for _, key, value in records:
        payload, evicted = changelog.decode(value)
        assert payload == engine.snapshot(key.decode()) and not evicted
    assert ledger.changes() == []  # nothing changed since
    _feed(engine, ["b"], steps=1, start=10)
    assert [k for _, k, _ in ledger.changes()] == [b"b"]


def test_evicted_series_are_written_flagged_and_come_back_with_their_state() -> None:
    engine = _engine(max_series=2)
    ledger = SeriesLedger(engine)
    engine.table.on_evict = ledger.on_evict
    reference = _engine(max_series=10)
    for e in (engine, reference):
        _feed(e, ["a", "b"])
    ledger.note(["a", "b"], [0, 1])
    ledger.changes()
    engine.table.last_seen[engine.table.slots["a"]] = 0.0  # a is the least recently seen
    _feed(engine, ["c"], steps=1, start=1)
    _feed(reference, ["c"], steps=1, start=1)
    ledger.note(["c"], [1])
    assert "a" not in engine.table.slots and "a" in ledger.store and "a" not in ledger.partition_of
    written = {k: changelog.decode(v) for _, k, v in ledger.changes()}
    assert written[b"a"][1] is True and written[b"c"][1] is False  # a: the evicted flag
    # a comes back: revived before it steps, it continues exactly where it was.
    assert ledger.revive(["a", "a", "zzz"]) == 1
    assert "a" not in ledger.store and ledger.partition_of["a"] == 0
    got = engine.process(["a"], [50], [42.0])
    want = reference.process(["a"], [50], [42.0])
    np.testing.assert_array_equal(got.forecasts, want.forecasts)


def test_drop_forgets_a_partitions_series_everywhere() -> None:
    engine = _engine()
    ledger = SeriesLedger(engine)
    _feed(engine, ["a", "b", "c"])
    ledger.note(["a", "b", "c"], [0, 1, 1])
    ledger.store.put("d", 1, b"snapshot")
    ledger.store.put("e", 0, b"snapshot")
    assert ledger.drop({1}) == 2
    assert set(engine.table.slots) == {"a"} and ledger.partition_of == {"a": 0}
    assert "d" not in ledger.store and "e" in ledger.store
    assert engine.evictions_total == 0  # dropped, not evicted
    assert ledger.drop(None) == 1 and engine.resident == 0 and ledger.partition_of == {}


def test_load_restores_good_records_keeps_evicted_on_the_host_and_refuses_the_rest() -> None:
    source = _engine()
    _feed(source, ["good", "gone", "bad"])
    snaps = dict(zip(["good", "gone"], source.snapshot_many(["good", "gone"]), strict=True))
    contents = ChangelogContents(
        {
            0: {"good": changelog.encode(snaps["good"]), "tomb": None},
            1: {
                "gone": changelog.encode(snaps["gone"], evicted=True),
                "bad": b"garbage",
                "future": b"FCCL\x07\x00" + snaps["good"],
                "torn": changelog.encode(snaps["good"][:-3]),
            },
        },
        records=9,
    )
    target = _engine()
    ledger = SeriesLedger(target)
    report = ledger.load(contents)
    assert set(target.table.slots) == {"good"} and "gone" in ledger.store and len(ledger.store) == 1
    assert report.resident == 1 and report.evicted == 1 and report.records == 9
    assert report.refused == {"corrupt": 2, "unknown_version": 1}
    assert ledger.partition_of == {"good": 0} and ledger.store.take(["gone"])[0][:2] == ("gone", 1)
    assert target.take_dirty() == set()  # restored states need no rewrite
    np.testing.assert_array_equal(
        target.process(["good"], [99], [1.0]).forecasts, source.process(["good"], [99], [1.0]).forecasts
    )


# ---- reading to a stable end ---------------------------------------------------------------------------------


class FakeReaderConsumer:
    """A partition's records, end offsets that may change per call, positions moved by poll."""

    def __init__(self, records: dict[int, list], ends: list[dict[int, int]]):
        self.records, self.ends_seq = records, list(ends)
        self.pos: dict = {}

    def end_offsets(self, tps, timeout):
        ends = self.ends_seq.pop(0) if len(self.ends_seq) > 1 else self.ends_seq[0]
        return {tp: ends[tp.partition] for tp in tps}

    def assign(self, start):
        self.pos = {tp: offset or 0 for tp, offset in start.items()}

    def poll(self, max_records, timeout):
        out = []
        for tp, at in self.pos.items():
            batch = self.records[tp.partition][at : at + 2]
            out.extend(SimpleNamespace(topic=tp.topic, partition=tp.partition, **vars(r)) for r in batch)
            if batch:
                self.pos[tp] = batch[-1].offset + 1
        return out

    def position(self, tps):
        return {tp: self.pos[tp] for tp in tps}

    def close(self):
        pass


def _rec(offset: int, key: str, value: bytes | None) -> SimpleNamespace:
    return SimpleNamespace(offset=offset, key=key.encode(), value=value)


def test_reader_keeps_the_latest_value_per_series_up_to_the_end() -> None:
    records = {0: [_rec(0, "a", b"1"), _rec(1, "b", b"2"), _rec(2, "a", b"3"), _rec(3, "b", None)], 1: []}
    consumer = FakeReaderConsumer(records, [{0: 4, 1: 0}])
    reader = ChangelogReader(
        "cl", consumer, FakeReaderConsumer(records, [{0: 4, 1: 0}]), sleep=lambda s: None
    )
    contents = reader.read([1, 0])
    assert contents.latest == {0: {"a": b"3", "b": None}, 1: {}} and contents.records == 4


def test_reader_waits_while_a_transaction_is_open_then_reads_what_it_committed() -> None:
    records = {0: [_rec(0, "a", b"old"), _rec(1, "a", b"new")]}
    stable = FakeReaderConsumer(records, [{0: 1}, {0: 1}, {0: 2}])  # the open transaction settles
    high = FakeReaderConsumer(records, [{0: 2}])
    waits = []
    reader = ChangelogReader("cl", stable, high, stable_timeout=60.0, sleep=waits.append)
    assert reader.read([0]).latest == {0: {"a": b"new"}}
    assert len(waits) == 2


def test_reader_gives_up_waiting_and_restores_what_is_committed() -> None:
    records = {0: [_rec(0, "a", b"committed"), _rec(1, "a", b"open")]}
    now = [0.0]
    reader = ChangelogReader(
        "cl",
        FakeReaderConsumer(records, [{0: 1}]),
        FakeReaderConsumer(records, [{0: 2}]),
        stable_timeout=5.0,
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + 1.0),
    )
    assert reader.read([0]).latest == {0: {"a": b"committed"}}


def test_reader_that_stops_short_of_the_end_gives_up_instead_of_hanging() -> None:
    from forecaster.errors import KafkaSetupError

    records = {0: [_rec(0, "a", b"x")]}  # the end says 3, but nothing past offset 0 ever comes
    now = [0.0]
    reader = ChangelogReader(
        "cl",
        FakeReaderConsumer(records, [{0: 3}]),
        FakeReaderConsumer(records, [{0: 3}]),
        stall_timeout=5.0,
        clock=lambda: now.__setitem__(0, now[0] + 1.0) or now[0],
        sleep=lambda s: None,
    )
    with pytest.raises(KafkaSetupError, match="stopped short"):
        reader.read([0])
