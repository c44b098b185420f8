"""Batched snapshots (the changelog's path): ``take_many`` / ``put_many`` / ``drop`` against the one-series path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forecaster.engine import snapshot as snap
from forecaster.engine.engine import Engine
from forecaster.errors import StateError
from forecaster.model import RecurrentForecaster


def _engine(cell: str = "gru", version: str = "v1", seed: int = 0, **kwargs) -> Engine:
    torch.manual_seed(seed)
    model = RecurrentForecaster(cell, hidden_size=6, num_layers=2, horizon=3)
    return Engine(model, version=version, window=5, capacity=2, **kwargs)


def _feed(engine: Engine, n_series: int = 7, n_values: int = 9, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    names = [f"s{i}" for i in range(n_series)]
    for t in range(n_values):
        engine.process(names, [t + 1] * n_series, rng.normal(10.0, 2.0, n_series))
    return names


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("host_views", [True, False])
def test_take_many_equals_take_byte_for_byte(cell: str, host_views: bool) -> None:
    engine = _engine(cell, host_views=host_views)
    names = _feed(engine)
    picked = names[::2] + names[1:2]
    assert engine.snapshot_many(picked) == [engine.snapshot(s) for s in picked]
    assert engine.snapshot_many([]) == []
    with pytest.raises(StateError):
        engine.snapshot_many(["nowhere"])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_restore_many_continues_exactly_like_the_source(cell: str) -> None:
    source = _engine(cell)
    names = _feed(source)
    target = _engine(cell)
    refused = target.restore_many(list(zip(names, source.snapshot_many(names), strict=True)))
    assert refused == [] and target.resident == len(names)
    assert target.take_dirty() == set()  # restored states are what the snapshots say: nothing to write back
    nxt = np.linspace(5.0, 6.0, len(names))
    a = source.process(names, [100] * len(names), nxt)
    b = target.process(names, [100] * len(names), nxt)
    np.testing.assert_array_equal(a.forecasts, b.forecasts)
    assert target.process(names, [100] * len(names), nxt).duplicates == len(names)  # last ts restored


def test_restore_many_refuses_bad_snapshots_and_loads_the_rest() -> None:
    source = _engine()
    names = _feed(source, n_series=3)
    good = source.snapshot_many(names)
    flipped = bytearray(good[1])
    flipped[len(flipped) // 2] ^= 0xFF
    target = _engine()
    refused = target.restore_many([(names[0], good[0]), (names[1], bytes(flipped)), (names[2], b"junk")])
    assert [s for s, _ in refused] == [names[1], names[2]]
    assert all(isinstance(e, StateError) for _, e in refused)
    assert set(target.table.slots) == {names[0]}


def test_restore_many_rewarms_snapshots_of_another_version_like_restore() -> None:
    source = _engine(version="old", seed=0)
    names = _feed(source, n_series=4)
    data = source.snapshot_many(names)
    one, many = _engine(version="new", seed=5), _engine(version="new", seed=5)
    for name, blob in zip(names, data, strict=True):
        one.restore(name, blob)
    many.restore_many(list(zip(names, data, strict=True)))
    nxt = np.arange(4, dtype=np.float64)
    np.testing.assert_allclose(
        one.process(names, [50] * 4, nxt).forecasts, many.process(names, [50] * 4, nxt).forecasts, atol=1e-6
    )


def test_drop_forgets_without_an_eviction() -> None:
    evicted = []
    engine = _engine(on_evict=lambda s, b: evicted.append(s))
    names = _feed(engine, n_series=3)
    assert engine.drop([names[0], "never-seen"]) == [names[0]]
    assert evicted == [] and engine.evictions_total == 0 and engine.resident == 2
    out = engine.process([names[0]], [1], [3.0])  # comes back as a new series: ts 1 steps again
    assert len(out) == 1 and engine.table.count[engine.table.slots[names[0]]] == 1


def test_put_many_header_cache_still_checks_shapes() -> None:
    source = _engine()
    names = _feed(source, n_series=2)
    data = source.snapshot_many(names)
    torch.manual_seed(0)
    other = Engine(RecurrentForecaster("gru", hidden_size=7, num_layers=2, horizon=3), window=5)
    loaded, _, refused = snap.put_many(other.table, list(zip(names, data, strict=True)), now=0.0)
    assert loaded == [] and len(refused) == 2 and "shape" in str(refused[0][1])
