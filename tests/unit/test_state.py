"""StateTable: slots, growth, eviction (TTL, LRU), dirty tracking, retained window, snapshots."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from forecaster.engine import snapshot as snap
from forecaster.engine.state import StateTable
from forecaster.errors import StateError


def _table(**kwargs) -> StateTable:
    options = dict(num_layers=2, hidden_size=4, horizon=3, window=5, capacity=2)
    options.update(kwargs)
    return StateTable(**options)


def _fill(table: StateTable, series: str, seed: int) -> None:
    """Give a resident series distinctive contents in every per-slot array."""
    slot = table.slots[series]
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        table.h[:, slot] = torch.randn(table.num_layers, table.hidden_size, generator=g)
        if table.c is not None:
            table.c[:, slot] = torch.randn(table.num_layers, table.hidden_size, generator=g)
        table.forecast[slot] = torch.randn(table.horizon, generator=g)
        table.stats[slot] = torch.randn(3, generator=g, dtype=torch.float64)
        table.ring[slot] = torch.randn(table.window_size, generator=g)
    table.last_ts[slot] = 1000 + seed
    table.count[slot] = 7 + seed


def _contents(table: StateTable, series: str) -> list[np.ndarray]:
    slot = table.slots[series]
    arrays = [table.h[:, slot], table.forecast[slot], table.stats[slot], table.ring[slot]]
    if table.c is not None:
        arrays.append(table.c[:, slot])
    return [a.clone().numpy() for a in arrays] + [np.array([table.last_ts[slot], table.count[slot]])]


def test_growth_doubles_and_keeps_every_series() -> None:
    table = _table(capacity=2)
    names = [f"s{i}" for i in range(2)]
    table.acquire(names, now=0.0)
    for i, name in enumerate(names):
        _fill(table, name, i)
    before = {name: _contents(table, name) for name in names}
    table.acquire([f"t{i}" for i in range(5)], now=1.0)
    assert table.capacity == 8 and table.resident == 7
    for name in names:
        for a, b in zip(before[name], _contents(table, name), strict=True):
            assert np.array_equal(a, b)


def test_new_slots_start_clean_and_freed_slots_are_reused() -> None:
    table = _table(capacity=4)
    (slot_a,), new = table.acquire(["a"], now=0.0)
    assert new.tolist() == [True]
    _fill(table, "a", 3)
    table.evict(["a"])
    (slot_b,), _ = table.acquire(["b"], now=1.0)
    assert slot_b == slot_a and table.capacity == 4
    assert not table.h[:, slot_b].any() and not table.stats[slot_b].any() and table.count[slot_b] == 0
    (again,), new = table.acquire(["b"], now=2.0)
    assert again == slot_b and new.tolist() == [False]


def test_ttl_eviction_hands_snapshots_to_the_callback() -> None:
    evicted: dict[str, bytes] = {}
    table = _table(on_evict=lambda s, data: evicted.__setitem__(s, data))
    table.acquire(["old", "fresh"], now=0.0)
    _fill(table, "old", 1)
    table.acquire(["fresh"], now=50.0)
    assert table.evict_idle(now=70.0, ttl_seconds=30.0) == ["old"]
    assert table.resident == 1 and table.evictions_total == 1 and list(evicted) == ["old"]
    other = _table()
    other.restore("old", evicted["old"], now=0.0)
    assert other.count[other.slots["old"]] == 8


def test_lru_eviction_at_max_series() -> None:
    evicted: list[str] = []
    table = _table(max_series=3, on_evict=lambda s, _: evicted.append(s))
    for t, name in enumerate(["a", "b", "c"]):
        table.acquire([name], now=float(t))
    table.acquire(["a"], now=3.0)  # a is now the most recent
    table.acquire(["d"], now=4.0)
    assert evicted == ["b"] and set(table.slots) == {"a", "c", "d"}
    table.acquire(["e", "f"], now=5.0)
    assert evicted == ["b", "c", "a"] and table.resident == 3 and table.evictions_total == 3


def test_lru_never_evicts_a_series_of_the_same_batch() -> None:
    table = _table(max_series=2)
    table.acquire(["a"], now=0.0)
    table.acquire(["b"], now=1.0)
    table.acquire(["a", "c"], now=2.0)  # a is the least recent, but it is in this batch
    assert set(table.slots) == {"a", "c"}


def test_take_dirty_returns_and_clears() -> None:
    table = _table()
    slots, _ = table.acquire(["a", "b", "c"], now=0.0)
    table.mark_dirty(slots[[0, 2]])
    assert table.take_dirty() == {"a", "c"}
    assert table.take_dirty() == set()


@pytest.mark.parametrize("count", [3, 5, 12])
def test_window_is_chronological_and_right_aligned(count: int) -> None:
    table = _table(window=5)
    (slot,), _ = table.acquire(["a"], now=0.0)
    for k in range(count):  # as the engine writes: position = count % W
        table.ring_flat[slot * table.window_size + table.count[slot] % table.window_size] = k + 1
        table.count[slot] += 1
    x, lengths = table.window(np.array([slot]))
    n = min(count, 5)
    expected = np.zeros(5, dtype=np.float32)
    expected[5 - n :] = np.arange(count - n + 1, count + 1)
    assert lengths.tolist() == [n]
    assert x.shape == (1, 5, 1) and np.array_equal(x[0, :, 0].numpy(), expected)


@pytest.mark.parametrize("lstm", [False, True])
def test_snapshot_restore_round_trip(lstm: bool) -> None:
    table = _table(lstm=lstm, version="v7")
    table.acquire(["a", "b"], now=0.0)
    _fill(table, "a", 5)
    data = table.snapshot("a")
    assert data.startswith(snap.MAGIC)
    other = _table(lstm=lstm, capacity=1)
    other.acquire(["z"], now=0.0)
    assert other.restore("a", data, now=1.0) == "v7"
    for x, y in zip(_contents(table, "a"), _contents(other, "a"), strict=True):
        assert np.array_equal(x, y)
    assert "a" in other.take_dirty()


def _reseal(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_corrupt_snapshots_raise_state_error() -> None:
    table = _table()
    table.acquire(["a"], now=0.0)
    _fill(table, "a", 2)
    good = table.snapshot("a")
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    body = good[:-4]
    wrong_format = body[: len(snap.MAGIC)] + struct.pack("<H", 99) + body[len(snap.MAGIC) + 2 :]
    cases = {
        "flipped byte": bytes(flipped),
        "truncated": good[:-10],
        "empty": b"",
        "bad magic": b"XXXXXXX" + good[7:],
        "unknown format": _reseal(wrong_format),
        "trailing bytes": _reseal(body + b"\0\0\0\0"),
    }
    for name, data in cases.items():
        with pytest.raises(StateError):
            _table().restore("a", data, now=0.0)
            pytest.fail(f"{name}: restored without error")
    with pytest.raises(StateError, match="shape"):
        _table(hidden_size=5).restore("a", good, now=0.0)
    with pytest.raises(StateError, match="shape"):
        _table(window=6).restore("a", good, now=0.0)
    with pytest.raises(StateError):
        table.snapshot("missing")


def test_state_bytes_counts_every_per_slot_array() -> None:
    table = _table(num_layers=2, hidden_size=4, horizon=3, window=5, capacity=8)
    # h, forecast, stats, 2 rings, last ts, count, last seen, dirty, period, learning, first ts, imputed marks
    per_slot = 2 * 4 * 4 + 3 * 4 + 3 * 8 + 5 * 4 + 5 * 4 + 8 + 8 + 8 + 1 + 8 + 1 + 9 * 8 + 5
    assert table.state_bytes == 8 * per_slot
    lstm = _table(num_layers=2, hidden_size=4, horizon=3, window=5, capacity=8, lstm=True)
    assert lstm.state_bytes == 8 * (per_slot + 2 * 4 * 4)
