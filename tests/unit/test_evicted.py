"""The evicted store (a byte budget in memory, the rest in SQLite on disk) and the ledger around it: budget,
exact bytes back, revoke, restart, restore straight to the store, and series churn through the engine.
The real-broker behaviour is in tests/integration/test_exactly_once.py."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from forecaster.config import Settings
from forecaster.engine.engine import Engine
from forecaster.model import RecurrentForecaster
from forecaster.service.exactly_once import changelog
from forecaster.service.exactly_once.changelog import ChangelogReader
from forecaster.service.exactly_once.evicted import ENTRY_OVERHEAD, EvictedStore, spill_path
from forecaster.service.exactly_once.ledger import SeriesLedger


def _snapshots(n: int, size: int = 1000, seed: int = 0) -> dict[str, tuple[int, bytes]]:
    rng = np.random.default_rng(seed)
    return {f"s{i}": (i % 3, rng.integers(0, 256, size + i % 7, dtype=np.uint8).tobytes()) for i in range(n)}


@pytest.fixture
def store(tmp_path):
    store = EvictedStore(memory_bytes=10_000, spill_dir=tmp_path, name="test")
    yield store
    store.close()


def test_memory_stays_within_the_budget_and_the_rest_is_on_disk(store) -> None:
    snaps = _snapshots(100)
    for name, (partition, snapshot) in snaps.items():
        store.put(name, partition, snapshot)
        assert store.stats()["memory_bytes"] <= store.memory_bytes
    stats = store.stats()
    assert stats["memory_series"] + stats["disk_series"] == len(store) == 100
    assert 0 < stats["memory_series"] <= store.memory_bytes // (1000 + ENTRY_OVERHEAD)
    assert stats["disk_bytes"] == sum(len(s) for n, (_, s) in snaps.items()) - (
        stats["memory_bytes"]
        - stats["memory_series"] * ENTRY_OVERHEAD
        - sum(len(n) for n in _in_memory(store))
    )
    assert store.path.is_file() and store.path.stat().st_size > stats["disk_bytes"] * 0.9


def _in_memory(store: EvictedStore) -> list[str]:
    return list(store._memory)


def test_spilled_snapshots_come_back_byte_for_byte_with_their_partition(store) -> None:
    snaps = _snapshots(60)
    for name, (partition, snapshot) in snaps.items():
        store.put(name, partition, snapshot)
    assert store.stats()["disk_series"] > 40
    names = list(snaps)[::-1] + ["never-seen"]
    back = store.take(names)
    assert {n: (p, s) for n, p, s in back} == snaps
    assert len(store) == 0 and store.stats() == {
        "memory_series": 0,
        "memory_bytes": 0,
        "disk_series": 0,
        "disk_bytes": 0,
        "spilled_total": store.stats()["spilled_total"],
    }
    assert store.take(["s1"]) == []  # taken means gone


def test_a_newer_snapshot_replaces_the_older_one_wherever_it_is(store) -> None:
    store.put("old", 2, b"first" * 300)
    for i in range(20):  # pushes "old" to disk
        store.put(f"x{i}", 0, bytes(1000))
    assert "old" not in _in_memory(store) and "old" in store
    store.put("old", 1, b"second")
    assert len(store) == 21
    assert store.take(["old"]) == [("old", 1, b"second")]
    store.discard("x0")
    assert "x0" not in store and len(store) == 19


def test_a_revoked_partition_is_forgotten_in_memory_and_on_disk(store) -> None:
    snaps = _snapshots(60)
    for name, (partition, snapshot) in snaps.items():
        store.put(name, partition, snapshot)
    kept = {n: v for n, v in snaps.items() if v[0] != 1}
    assert store.drop({1}) == len(snaps) - len(kept)
    assert len(store) == len(kept)
    assert store.stats()["disk_bytes"] + sum(
        len(s) for n, (_, s) in kept.items() if n in _in_memory(store)
    ) == sum(len(s) for _, s in kept.values())
    assert {n: (p, s) for n, p, s in store.take(list(snaps))} == kept
    store.put("a", 0, b"a")
    assert store.drop(None) == 1 and len(store) == 0


def test_a_restart_starts_from_an_empty_file_and_the_old_instance_keeps_its_own(tmp_path) -> None:
    first = EvictedStore(memory_bytes=0, spill_dir=tmp_path, name="inst-1")
    first.put("a", 0, b"state of a")
    assert first.stats()["disk_series"] == 1
    second = EvictedStore(memory_bytes=0, spill_dir=tmp_path, name="inst-1")  # the restarted instance
    assert len(second) == 0 and "a" not in second
    second.put("b", 1, b"state of b")
    # The previous process (e.g. a zombie not yet fenced) still reads its own, now unlinked, file.
    assert first.take(["a", "b"]) == [("a", 0, b"state of a")]
    assert second.take(["a", "b"]) == [("b", 1, b"state of b")]
    assert sorted(os.listdir(tmp_path)) == ["evicted-inst-1.sqlite"]  # one file per instance, no journal
    first.close()
    assert second.path.is_file()  # the old one closing leaves the new file under the same name alone
    second.close()
    assert not second.path.exists()


def test_the_file_name_is_one_safe_name_per_instance(tmp_path) -> None:
    assert spill_path(tmp_path, "group-host/1 x").name == "evicted-group-host_1_x.sqlite"


def test_a_budget_of_zero_keeps_nothing_in_memory(tmp_path) -> None:
    store = EvictedStore(memory_bytes=0, spill_dir=tmp_path, name="zero")
    for name, (partition, snapshot) in _snapshots(10).items():
        store.put(name, partition, snapshot)
    assert store.stats()["memory_series"] == 0 and store.stats()["disk_series"] == 10
    store.close()


def test_spill_dir_must_be_a_folder(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        Settings(state={"spill_dir": tmp_path / "file"})
    assert Settings(state={"spill_dir": tmp_path / "new"}).state.spill_dir == tmp_path / "new"
    with pytest.raises(ValueError):
        Settings(state={"evicted_memory_bytes": -1})


# ---- the ledger: restore and churn ---------------------------------------------------------------------


def _engine(seed: int = 0, **kwargs) -> Engine:
    torch.manual_seed(seed)
    model = RecurrentForecaster("gru", hidden_size=5, num_layers=1, horizon=2)
    return Engine(model, version="v1", window=6, capacity=4, **{"clock": lambda: 1000.0, **kwargs})


class _Consumer:
    """One changelog partition's records for ``ChangelogReader`` (the client interface's reader calls);
    every record at once."""

    def __init__(self, records: list) -> None:
        self.records, self.pos = records, {}

    def end_offsets(self, tps, timeout):
        return {tp: len(self.records) for tp in tps}

    def assign(self, start):
        self.pos = dict.fromkeys(start, 0)

    def poll(self, max_records, timeout):
        out = [
            SimpleNamespace(topic=tp[0], partition=tp[1], **vars(r))
            for tp, at in self.pos.items()
            for r in self.records[at:]
        ]
        self.pos = dict.fromkeys(self.pos, len(self.records))
        return out

    def position(self, tps):
        return {tp: self.pos[tp] for tp in tps}


def test_restore_sends_evicted_series_straight_to_the_store_and_the_latest_record_wins(tmp_path) -> None:
    source = _engine()
    for t in range(1, 5):
        source.process(["a", "b", "c", "d"], [t] * 4, [float(t), 2.0 * t, 3.0 * t, 4.0 * t])
    snaps = dict(zip("abcd", source.snapshot_many(list("abcd")), strict=True))
    enc = changelog.encode
    values = [
        ("a", enc(snaps["a"], evicted=True)),  # evicted, then back: resident wins
        ("b", enc(snaps["b"])),
        ("a", enc(snaps["a"])),
        ("b", enc(snaps["b"], evicted=True)),  # resident, then evicted: the store
        ("c", enc(snaps["c"], evicted=True)),
        ("c", None),  # then deleted: nowhere
        ("d", enc(snaps["d"], evicted=True)),
    ]
    records = [SimpleNamespace(offset=i, key=k.encode(), value=v) for i, (k, v) in enumerate(values)]
    reader = ChangelogReader("cl", _Consumer(records), _Consumer(records), sleep=lambda s: None)
    store = EvictedStore(memory_bytes=0, spill_dir=tmp_path, name="restore")
    store.put("stale", 5, b"from before")  # a partition restored again starts clean
    ledger = SeriesLedger(_engine(), store)
    seen = []
    divert = ledger.divert
    ledger.divert = lambda p, n, v: seen.append(n) or divert(p, n, v)
    report = ledger.restore(reader, {5})
    assert seen == [k for k, _ in values]  # every record offered, in order
    assert set(ledger.engine.table.slots) == {"a"} and report.resident == 1
    assert report.evicted == 2 and len(store) == 2 and store.stats()["memory_series"] == 0
    assert sorted(store.take(["b", "c", "d", "stale"])) == [("b", 5, snaps["b"]), ("d", 5, snaps["d"])]
    store.close()


def test_series_churn_keeps_memory_bounded_and_evicted_series_resume_exactly(tmp_path) -> None:
    budget = 3000
    store = EvictedStore(memory_bytes=budget, spill_dir=tmp_path, name="churn")
    engine = _engine(max_series=8)
    reference = _engine(max_series=10_000)
    ledger = SeriesLedger(engine, store)
    engine.table.on_evict = ledger.on_evict
    rng = np.random.default_rng(3)
    for round_ in range(40):  # 5 new series a round, 8 resident: old ones are evicted as new ones arrive
        names = [f"r{round_}-{i}" for i in range(5)]
        if round_ % 4 == 3:  # and some long-gone series come back
            names += [f"r{round_ - 3 - k}-0" for k in (0, 8, 16) if round_ - 3 - k >= 0]
        values = rng.normal(10.0, 2.0, len(names))
        ledger.revive(names)
        got = engine.process(names, [round_ + 1] * len(names), values)
        want = reference.process(names, [round_ + 1] * len(names), values)
        np.testing.assert_array_equal(got.forecasts, want.forecasts)
        ledger.note(got.series, [int(n[1:].split("-")[0]) % 3 for n in got.series])
        ledger.changes()
        assert store.stats()["memory_bytes"] <= budget
        assert set(ledger.partition_of) == set(engine.table.slots)  # only resident series
    assert store.stats()["disk_series"] > 100 and engine.resident <= 8
    store.close()


def test_reviving_a_series_never_evicts_another_series_of_the_same_batch(tmp_path) -> None:
    """Two resident, one evicted; a batch with the evicted one and the least recently seen resident one:
    making room for the revived series must evict the other resident one, not a series about to step
    (which would then step from a fresh state)."""
    ticks = iter(range(1000, 2000))
    engine = _engine(max_series=2, clock=lambda: float(next(ticks)))
    reference = _engine(max_series=10_000)
    store = EvictedStore(memory_bytes=1 << 20, spill_dir=tmp_path, name="protect")
    ledger = SeriesLedger(engine, store)
    engine.table.on_evict = ledger.on_evict
    for t, names in enumerate([["a"], ["b"], ["c"], ["b", "a"], ["c", "a", "b"]], start=1):
        values = [float(t + i) for i in range(len(names))]
        ledger.revive(names)
        got = engine.process(names, [t] * len(names), values)
        want = reference.process(names, [t] * len(names), values)
        np.testing.assert_array_equal(got.forecasts, want.forecasts, err_msg=f"step {t}: {names}")
        ledger.note(got.series, [0] * len(got.series))
        ledger.changes()
    assert engine.evictions_total >= 2
    store.close()
