"""Hot swap: the first model, the watcher, the swap with re-warm, and refusals that keep the old model."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_faults import (
    CORRUPTIONS,
    CodeRunningPayload,
    _replace_weights,
    _saved_state,
    _torch_bytes,
    nan_weights,
)
from prometheus_client import CollectorRegistry

from forecaster.checkpoints.hotswap import INIT_VERSION, ModelSwapper, initial_model
from forecaster.checkpoints.store import LATEST_FILE, promote, save_checkpoint
from forecaster.config import Settings
from forecaster.engine.engine import Engine
from forecaster.engine.rewarm import RewarmJob
from forecaster.model import CELLS, RecurrentForecaster
from forecaster.scaling import Scaling

SCALING = Scaling(halflife=12.0)
WINDOW = 8


def model_of(cell: str = "gru", seed: int = 0, **kwargs) -> RecurrentForecaster:
    torch.manual_seed(seed)
    options = dict(hidden_size=6, num_layers=2, horizon=3)
    options.update(kwargs)
    return RecurrentForecaster(cell, **options).eval()


def long_memory(model: RecurrentForecaster) -> RecurrentForecaster:
    """The same model made to remember far back (gates that mostly keep the state), so that where a
    re-warm starts shows in its forecasts."""
    hidden = model.hidden_size
    with torch.no_grad():
        for layer in range(model.num_layers):
            if model.cell in ("gru", "lstm"):  # update gate (gru: r, z, n) / forget gate (lstm: i, f, g, o)
                getattr(model.rnn, f"bias_ih_l{layer}")[hidden : 2 * hidden] += 4.0
            else:
                weight = getattr(model.rnn, f"weight_hh_l{layer}")
                weight.copy_(0.97 * torch.linalg.qr(torch.randn(hidden, hidden))[0])
    return model


def publish(root: Path, model: RecurrentForecaster, scaling: Scaling = SCALING) -> str:
    version = save_checkpoint(root, model, scaling)
    promote(root, version)
    return version


def settings_for(root: Path) -> Settings:
    return Settings(
        model={"hidden_size": 6, "num_layers": 2, "horizon": 3, "seed": 7},
        scaling=SCALING.settings,
        checkpoints={"dir": root},
    )


def swaps(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("forecaster_model_swaps_total", {"result": result})


# ---- the first model ----------------------------------------------------------------------------------


def test_without_checkpoints_a_seeded_untrained_model_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        model, version = initial_model(settings_for(tmp_path), "cpu")
    expected = model_of(seed=7)
    assert version == INIT_VERSION
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), expected.state_dict().values(), strict=True)
    )
    assert "untrained" in caplog.text


def test_latest_serves(tmp_path: Path) -> None:
    publish(tmp_path, model_of(seed=1))
    version = publish(tmp_path, model_of(seed=2))
    model, got = initial_model(settings_for(tmp_path), "cpu")
    assert got == version
    assert torch.equal(model.head.weight, model_of(seed=2).head.weight)


def test_a_bad_latest_falls_back_to_the_newest_valid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    older = publish(tmp_path, model_of(seed=1))
    newer = publish(tmp_path, model_of(seed=2))
    bad = save_checkpoint(tmp_path, model_of(seed=3), SCALING)
    promote(tmp_path, bad)
    nan_weights(tmp_path / bad)
    with caplog.at_level(logging.ERROR):
        _, version = initial_model(settings_for(tmp_path), "cpu")
    assert version == newer != older
    assert bad in caplog.text and "NaN" in caplog.text


def test_only_bad_checkpoints_serve_an_untrained_model(tmp_path: Path) -> None:
    bad = publish(tmp_path, model_of(seed=3))
    nan_weights(tmp_path / bad)
    assert initial_model(settings_for(tmp_path), "cpu")[1] == INIT_VERSION


def test_a_garbage_pointer_falls_back(tmp_path: Path) -> None:
    version = publish(tmp_path, model_of(seed=1))
    (tmp_path / LATEST_FILE).write_text("../../somewhere\n")
    assert initial_model(settings_for(tmp_path), "cpu")[1] == version


def test_a_checkpoint_trained_with_another_scaling_is_not_served(tmp_path: Path) -> None:
    publish(tmp_path, model_of(seed=1), Scaling(halflife=99.0))
    assert initial_model(settings_for(tmp_path), "cpu")[1] == INIT_VERSION


# ---- swapping ---------------------------------------------------------------------------------------


def stream(n_values: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: 50.0 + np.cumsum(rng.normal(0.0, 1.0, n)) for name, n in n_values.items()}


def feed(engine: Engine, data: dict[str, np.ndarray], batches: int = 3) -> None:
    """All values of ``data`` through the engine, interleaved, in a few calls."""
    rows = [(name, t, v) for name, values in data.items() for t, v in enumerate(values)]
    rows.sort(key=lambda r: r[1])
    for part in np.array_split(np.arange(len(rows)), batches):
        chosen = [rows[i] for i in part]
        engine.process([r[0] for r in chosen], [1000 + r[1] for r in chosen], [r[2] for r in chosen])


def expected_after_swap(model: RecurrentForecaster, values: np.ndarray, extra: float) -> np.ndarray:
    """The new model from the zero state over the retained window (the last WINDOW scaled inputs), then
    over one more value: the forecast after it, in data units."""
    x, stats = SCALING.transform(np.append(values, extra))  # (T + 1,), (T + 1, N_STATS)
    with torch.no_grad():
        y, _ = model(x[-WINDOW - 1 :][None, :, None])  # (1, <= WINDOW + 1, horizon)
    return SCALING.denormalize(stats[-1:], y[0, -1:]).numpy()[0]


@pytest.mark.parametrize("cell", CELLS)
def test_swap_rewarms_every_series_over_its_window(tmp_path: Path, cell: str) -> None:
    registry = CollectorRegistry()
    engine = Engine(model_of(cell, seed=1), version="init", window=WINDOW, scaling=SCALING, capacity=2)
    data = stream({"short": 5, "long": 30, "exact": WINDOW})
    feed(engine, data)
    swapper = ModelSwapper(tmp_path, "init", registry=registry, scaling=SCALING)
    new_model = long_memory(model_of(cell, seed=2))
    version = publish(tmp_path, new_model)
    # Step 1. Validated off the hot path: nothing changes in the engine yet.
    assert swapper.check_now() == version == swapper.pending_version
    assert engine.version == "init"
    # Step 2. The swap at a batch boundary.
    assert swapper.swap_if_ready(engine) == version
    assert engine.version == version == swapper.current_version
    assert swaps(registry, "ok") == 1 and swaps(registry, "refused") == 0
    assert registry.get_sample_value("forecaster_model_swap_seconds_count") == 1
    assert swapper.swap_if_ready(engine) is None and swapper.check_now() is None
    # Step 3. Each state is the new model's pass over the retained window; the next forecast follows it.
    names = list(data)
    out = engine.process(names, [5000] * len(names), [51.0] * len(names))
    assert out.version == version
    for name in names:
        forecast = expected_after_swap(new_model, data[name], 51.0)
        np.testing.assert_allclose(out.forecasts[out.series.index(name)], forecast, rtol=1e-5, atol=1e-4)


def test_state_right_after_swap_equals_the_window_pass(tmp_path: Path) -> None:
    engine = Engine(model_of("lstm", seed=1), version="init", window=WINDOW, scaling=SCALING)
    data = stream({"a": 20, "b": 3})
    feed(engine, data)
    new_model = long_memory(model_of("lstm", seed=2))
    swapper = ModelSwapper(tmp_path, "init", registry=CollectorRegistry())
    publish(tmp_path, new_model)
    swapper.check_now()
    swapper.swap_if_ready(engine)
    for name, values in data.items():
        x, _ = SCALING.transform(values)
        with torch.no_grad():
            _, (h, c) = new_model(x[-WINDOW:][None, :, None])
        slot = engine.table.slots[name]
        torch.testing.assert_close(engine.table.h[:, slot], h[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(engine.table.c[:, slot], c[:, 0], rtol=1e-5, atol=1e-5)


def serving_engine(tmp_path: Path, registry: CollectorRegistry) -> tuple[Engine, ModelSwapper, str]:
    """An engine serving a published v1 through a swapper, with some history."""
    engine = Engine(model_of(seed=1), version="init", window=WINDOW, scaling=SCALING)
    feed(engine, stream({"a": 12, "b": 4}))
    swapper = ModelSwapper(tmp_path, "init", registry=registry, scaling=SCALING, horizon=3, window=WINDOW)
    good = publish(tmp_path, model_of(seed=2))
    swapper.check_now()
    assert swapper.swap_if_ready(engine) == good
    return engine, swapper, good


def assert_still_serving(engine: Engine, version: str) -> None:
    out = engine.process(["a"], [10_000], [49.0])
    assert engine.version == version and out.version == version and len(out) == 1


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_bad_checkpoint_is_refused_once_and_the_old_model_keeps_serving(tmp_path: Path, name: str) -> None:
    registry = CollectorRegistry()
    engine, swapper, good = serving_engine(tmp_path, registry)
    bad = save_checkpoint(tmp_path, model_of(seed=3), SCALING)
    CORRUPTIONS[name][0](tmp_path / bad)
    (tmp_path / LATEST_FILE).write_text(bad + "\n")  # an operator (or a bug) publishes it anyway
    assert swapper.check_now() is None
    assert swapper.swap_if_ready(engine) is None
    assert swaps(registry, "refused") == 1
    for _ in range(3):  # the same bad version is not retried
        swapper.check_now()
    assert swaps(registry, "refused") == 1
    assert_still_serving(engine, good)


def test_a_pickle_payload_is_refused_without_running(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    engine, swapper, good = serving_engine(tmp_path, registry)
    bad = save_checkpoint(tmp_path, model_of(seed=3), SCALING)
    marker = tmp_path / "payload-ran"
    state = dict(_saved_state(tmp_path / bad))
    state["head.weight"] = CodeRunningPayload(marker)
    _replace_weights(tmp_path / bad, _torch_bytes(state))
    (tmp_path / LATEST_FILE).write_text(bad + "\n")
    assert swapper.check_now() is None
    assert not marker.exists()
    assert swaps(registry, "refused") == 1
    assert_still_serving(engine, good)


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda root: publish(root, model_of(seed=3), Scaling(halflife=99.0)), "scaling"),
        (lambda root: publish(root, model_of(seed=3, horizon=5)), "horizon"),
        (lambda root: publish(root, model_of(seed=3, season=2 * WINDOW, base_seasons=1)), "state.window"),
    ],
)
def test_an_incompatible_checkpoint_is_refused(tmp_path: Path, make, why: str, caplog) -> None:
    registry = CollectorRegistry()
    engine, swapper, good = serving_engine(tmp_path, registry)
    with caplog.at_level(logging.ERROR):
        make(tmp_path)
        assert swapper.check_now() is None
    assert why in caplog.text
    assert swaps(registry, "refused") == 1
    assert_still_serving(engine, good)


def test_a_bad_pointer_is_counted_once(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    engine, swapper, good = serving_engine(tmp_path, registry)
    (tmp_path / LATEST_FILE).write_text("not/a/version\n")
    for _ in range(3):
        assert swapper.check_now() is None
    assert swaps(registry, "refused") == 1
    assert_still_serving(engine, good)


def test_a_failed_rewarm_is_refused_and_keeps_the_version(tmp_path: Path) -> None:
    class Broken:
        def rewarm(self, model, version):
            raise RuntimeError("device out of memory")

    registry = CollectorRegistry()
    swapper = ModelSwapper(tmp_path, "init", registry=registry)
    publish(tmp_path, model_of(seed=2))
    swapper.check_now()
    assert swapper.swap_if_ready(Broken()) is None
    assert swapper.current_version == "init"
    assert swaps(registry, "refused") == 1 and swaps(registry, "ok") == 0


def test_a_version_being_swapped_in_is_not_validated_again_meanwhile(tmp_path: Path) -> None:
    """The watcher thread polls while the service thread re-warms: between handing the new version over and
    naming it current, the watcher must not take it for a new one (it would be swapped in twice)."""
    registry = CollectorRegistry()
    swapper = ModelSwapper(tmp_path, "init", registry=registry)
    version = publish(tmp_path, model_of(seed=2))
    assert swapper.check_now() == version
    seen = []

    class Engine:
        def rewarm(self, model, version):
            seen.append(swapper.check_now())  # what the watcher thread would do at this moment

    assert swapper.swap_if_ready(Engine()) == version
    assert seen == [None] and swapper.pending_version is None
    assert swapper.swap_if_ready(Engine()) is None and swaps(registry, "ok") == 1


def test_rollback_swaps_back(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    engine, swapper, first = serving_engine(tmp_path, registry)
    second = publish(tmp_path, model_of(seed=4))
    swapper.check_now()
    assert swapper.swap_if_ready(engine) == second
    promote(tmp_path, first)
    swapper.check_now()
    assert swapper.swap_if_ready(engine) == first
    assert_still_serving(engine, first)


def test_the_watcher_thread_loads_new_versions(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    engine = Engine(model_of(seed=1), version="init", window=WINDOW, scaling=SCALING)
    swapper = ModelSwapper(tmp_path, "init", registry=registry, poll_seconds=0.05).start()
    try:
        version = publish(tmp_path, model_of(seed=2))
        deadline = time.monotonic() + 30.0
        while swapper.pending_version is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert swapper.swap_if_ready(engine) == version
    finally:
        swapper.stop()
    assert swapper._thread is None
    assert engine.version == version


# ---- re-warm in the background, catch-up at the swap ---------------------------------------------------


def send_values(engine: Engine, name: str, values: np.ndarray, first_ts: int) -> list[str]:
    out = engine.process([name] * len(values), first_ts + np.arange(len(values)), values)
    return [out.version] * len(out)


@pytest.mark.parametrize(
    "old_cell, new_cell, new_shape",
    [
        ("gru", "gru", {}),
        ("lstm", "lstm", {}),
        ("rnn", "rnn", {}),
        ("gru", "lstm", {"hidden_size": 10, "num_layers": 1}),
    ],
)
def test_background_rewarm_catches_up_every_value_exactly(
    tmp_path: Path, old_cell, new_cell, new_shape
) -> None:
    registry = CollectorRegistry()
    engine = Engine(model_of(old_cell, seed=1), version="init", window=WINDOW, scaling=SCALING, capacity=4)
    data = stream({"a": 30, "b": 5, "c": 20, "d": 12, "e": 10}, seed=3)
    feed(engine, data)
    copied = {name: len(v) for name, v in data.items()}  # values stepped when the windows are copied
    new_model = long_memory(model_of(new_cell, seed=2, **new_shape))
    swapper = ModelSwapper(tmp_path, "init", registry=registry, scaling=SCALING, background_above=0)
    version = publish(tmp_path, new_model)
    swapper.check_now()
    # Step 1. This boundary copies the windows and starts the re-warm; the old model keeps serving.
    assert swapper.swap_if_ready(engine) is None
    assert swapper.check_now() is None  # the version being re-warmed is not loaded again
    rng = np.random.default_rng(5)
    since = {"a": 3, "c": WINDOW + 2, "d": 1, "f": 4}  # c: more than the ring holds; f: a new series
    versions = []
    for name, n in since.items():
        more = 50.0 + rng.normal(size=n)
        versions += send_values(engine, name, more, first_ts=100_000)
        data[name] = np.concatenate([data.get(name, np.zeros(0)), more])
    engine.table.evict(["e"])
    assert set(versions) == {"init"}
    assert swapper.wait_rewarm(30.0)
    # Step 2. The next boundary catches up and swaps.
    assert swapper.swap_if_ready(engine) == version == engine.version
    assert (
        swaps(registry, "ok") == 1 and registry.get_sample_value("forecaster_model_swap_seconds_count") == 1
    )
    assert swapper.check_now() is None and swapper.swap_if_ready(engine) is None  # swapped once
    assert engine.table.slot_of("e") is None
    # Step 3. Each series runs on from the new model's pass over one contiguous run of its inputs: the
    # window it had at the copy plus everything since, or its current window where that was impossible.
    names = ["a", "b", "c", "d", "f"]
    out = engine.process(names, [200_000] * len(names), [51.0] * len(names))
    assert out.version == version
    for name in names:
        values = np.append(data[name], 51.0)
        x, stats = SCALING.transform(values)
        stepped = len(values) - 1
        caught_up = name in copied and stepped - copied[name] <= WINDOW
        start = copied[name] - min(copied[name], WINDOW) if caught_up else stepped - min(stepped, WINDOW)
        with torch.no_grad():
            y, _ = new_model(x[start:][None, :, None])
        expected = SCALING.denormalize(stats[-1:], y[0, -1:]).numpy()[0]
        np.testing.assert_allclose(
            out.forecasts[out.series.index(name)],
            expected,
            rtol=1e-5,
            atol=1e-4,
            err_msg=f"series {name} (start {start})",
        )


def test_a_failed_background_rewarm_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    engine = Engine(model_of(seed=1), version="init", window=WINDOW, scaling=SCALING)
    feed(engine, stream({"a": 12}))
    swapper = ModelSwapper(tmp_path, "init", registry=registry, background_above=0)
    version = publish(tmp_path, model_of(seed=2))
    swapper.check_now()
    monkeypatch.setattr(swapper._ready.model, "warm", lambda *a: (_ for _ in ()).throw(RuntimeError("oom")))
    assert swapper.swap_if_ready(engine) is None
    assert swapper.wait_rewarm(30.0)
    assert swapper.swap_if_ready(engine) is None
    assert swaps(registry, "refused") == 1 and engine.version == "init"
    assert swapper.check_now() is None  # not retried
    assert version in swapper._refused


@pytest.mark.parametrize("rows_per_copy", [None, 1])
def test_catch_up_in_several_passes_loses_nothing(rows_per_copy) -> None:
    engine = Engine(model_of("gru", seed=1), version="init", period_ms=0, window=WINDOW, scaling=SCALING)
    data = stream({"a": 20, "b": 9, "c": 3}, seed=8)
    feed(engine, data)
    # Values stepped when each window is copied: one series per boundary with rows_per_copy=1 (a now, b
    # after the first round of new values below, c after the second; c gets none).
    copied = {"a": 20, "b": 9 + (2 if rows_per_copy == 1 else 0), "c": 3}
    new_model = long_memory(model_of("gru", seed=2))
    job = RewarmJob(new_model, "v2", engine, final_values=0, max_passes=3, rows_per_copy=rows_per_copy)
    rng = np.random.default_rng(9)
    ts = 100_000
    swapped = None
    while swapped is None:  # values keep arriving between boundaries until the job swaps
        for name in ("a", "b"):
            more = 50.0 + rng.normal(size=2)
            out = engine.process([name, name], [ts, ts + 1], more)
            assert out.version == "init"
            data[name] = np.concatenate([data[name], more])
        ts += 2
        assert job.wait(30.0)
        swapped = job.at_boundary(engine)
    assert swapped == {"caught_up": 3, "rewarmed": 0, "copies": 3 if rows_per_copy == 1 else 1, "passes": 3}
    names = list(data)
    out = engine.process(names, [ts + 10] * 3, [51.0] * 3)
    for name in names:
        values = np.append(data[name], 51.0)
        x, stats = SCALING.transform(values)
        start = copied[name] - min(copied[name], WINDOW)
        with torch.no_grad():
            y, _ = new_model(x[start:][None, :, None])
        np.testing.assert_allclose(
            out.forecasts[out.series.index(name)],
            SCALING.denormalize(stats[-1:], y[0, -1:]).numpy()[0],
            rtol=1e-5,
            atol=1e-4,
        )


# ---- models that forecast over a seasonal baseline ----------------------------------------------------------


def test_a_baseline_longer_than_the_window_is_not_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path)
    fits = publish(tmp_path, model_of(season=4, base_seasons=1))
    too_long = publish(tmp_path, model_of(season=300, base_seasons=1))  # the default window is 256
    model, version = initial_model(settings)
    assert version == fits != too_long and model.context == 3
    assert "state.window" in caplog.text


def test_background_rewarm_of_a_residual_model_takes_the_baseline_from_the_window() -> None:
    """Values stepped while the job runs are caught up without their past; the forecast at the swap must
    still read the baseline from the retained window, as a re-warm at the boundary does."""
    data = stream({"a": 5, "b": 3}, seed=4)
    new_model = model_of("lstm", seed=2, season=2, base_seasons=2)
    with torch.no_grad():
        new_model.head.bias.normal_()
    background = Engine(model_of(seed=1), version="init", window=WINDOW, scaling=SCALING)
    direct = Engine(model_of(seed=1), version="init", window=WINDOW, scaling=SCALING)
    feed(background, data)
    feed(direct, data)
    job = RewarmJob(new_model, "v2", background, final_values=0)
    for engine in (background, direct):  # fewer than WINDOW values in all: both re-warms see every value
        engine.process(["a", "b", "a"], [10_000, 10_000, 10_001], [3.0, -2.0, 4.0])
    assert job.wait(30.0)
    while (swapped := job.at_boundary(background)) is None:
        assert job.wait(30.0)
    assert swapped["caught_up"] == 2
    direct.rewarm(new_model, "v2")
    for name in ("a", "b"):
        slot_b, slot_d = background.table.slots[name], direct.table.slots[name]
        torch.testing.assert_close(
            background.table.forecast[slot_b], direct.table.forecast[slot_d], atol=1e-5, rtol=0
        )
