"""Hot swap under traffic: ``forecaster serve`` (a real process, real broker) swaps models while values flow."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from kafka import KafkaProducer

from forecaster.checkpoints.hotswap import fresh_model
from forecaster.checkpoints.store import LATEST_FILE, MANIFEST_FILE, WEIGHTS_FILE, promote, save_checkpoint
from forecaster.engine.engine import reference_forecast
from forecaster.model import RecurrentForecaster
from forecaster.records import encode_input
from forecaster.scaling import Scaling

START_MS = 1_700_000_000_000
WINDOW = 16
N_SERIES = 8
N_TICKS = 160


def new_model(seed: int, settings) -> RecurrentForecaster:
    args = settings.model.model_dump()
    args.pop("seed")
    torch.manual_seed(seed)
    return RecurrentForecaster(**args).eval()


def publish_nan_checkpoint(root: Path, model: RecurrentForecaster, scaling: Scaling) -> str:
    """A checkpoint whose weights hold a NaN (with a manifest that vouches for them), made LATEST."""
    import hashlib
    import io

    version = save_checkpoint(root, model, scaling)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.weight"][0, 0] = float("nan")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (root / version / WEIGHTS_FILE).write_bytes(buffer.getvalue())
    manifest = json.loads((root / version / MANIFEST_FILE).read_text())
    manifest["weights"].update(
        sha256=hashlib.sha256(buffer.getvalue()).hexdigest(), bytes=len(buffer.getvalue())
    )
    (root / version / MANIFEST_FILE).write_text(json.dumps(manifest))
    (root / LATEST_FILE).write_text(version + "\n")
    return version


class Traffic(threading.Thread):
    """One value per series per tick, ticks every ``pause`` seconds; ``reached(tick)`` waits for a tick."""

    def __init__(self, bootstrap: str, topic: str, pause: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.pause = bootstrap, topic, pause
        self.values = {
            f"s{i}": 100.0 + 10.0 * np.random.default_rng(i).normal(size=N_TICKS).cumsum() / 5
            for i in range(N_SERIES)
        }
        self.tick = -1
        self._moved = threading.Condition()

    def run(self) -> None:
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=2)
        for tick in range(N_TICKS):
            for name, values in self.values.items():
                producer.send(
                    self.topic,
                    key=name.encode(),
                    value=encode_input(name, START_MS + tick * 1000, float(values[tick])),
                )
            producer.flush()
            with self._moved:
                self.tick = tick
                self._moved.notify_all()
            time.sleep(self.pause)
        producer.close()

    def reached(self, tick: int, timeout: float = 60.0) -> None:
        with self._moved:
            assert self._moved.wait_for(lambda: self.tick >= tick, timeout), (
                f"traffic stuck before tick {tick}"
            )


def swaps(service, result: str) -> float:
    return service.metrics().get(("forecaster_model_swaps_total", (("result", result),)), 0.0)


def test_swaps_under_traffic_skip_nothing_and_rewarm_over_the_window(topics, serve, broker, tmp_path):
    settings = topics.settings()
    scaling = Scaling.from_settings(settings.scaling)
    root = tmp_path / "checkpoints"
    service = serve(
        FORECASTER_STATE__WINDOW=str(WINDOW),
        FORECASTER_SERVICE__CHECKPOINT_POLL_SECONDS="0.05",
        # The models' own passes are checked below; the choice after a swap: tests/unit/test_choice.py.
        FORECASTER_CHOICE__ENABLED="false",
    ).start()
    traffic = Traffic(topics.bootstrap, topics.input)
    traffic.start()
    # Step 1. Publish v1, a bad checkpoint, then v2, while the values flow.
    models = {"init": fresh_model(settings)}
    traffic.reached(40)
    models[v1 := save_checkpoint(root, new_model(11, settings), scaling)] = new_model(11, settings)
    promote(root, v1)
    broker.wait_for(lambda: swaps(service, "ok") >= 1, timeout=30, what="the swap to v1")
    traffic.reached(80)
    bad = publish_nan_checkpoint(root, new_model(12, settings), scaling)
    broker.wait_for(
        lambda: swaps(service, "refused") >= 1, timeout=30, what="the refusal of the bad checkpoint"
    )
    traffic.reached(100)
    models[v2 := save_checkpoint(root, new_model(13, settings), scaling)] = new_model(13, settings)
    promote(root, v2)
    traffic.join(120)
    broker.wait_for(lambda: swaps(service, "ok") >= 2, timeout=30, what="the swap to v2")
    order = ["init", v1, v2]

    # Step 2. Exactly one forecast per value, in order, versions never going back, the bad one never used.
    total = N_SERIES * N_TICKS
    forecasts = broker.read(topics.output, count=total, timeout=60)
    time.sleep(0.5)
    assert len(broker.read(topics.output)) == total
    by_series: dict[str, list[dict]] = defaultdict(list)
    for record in sorted(forecasts, key=lambda r: (r.partition, r.offset)):
        by_series[record.json()["series"]].append(record.json())
    assert swaps(service, "refused") == 1
    assert {b["model_version"] for bodies in by_series.values() for b in bodies} == set(order)
    assert bad not in order
    for name, bodies in by_series.items():
        values = traffic.values[name]
        assert [b["ts"] for b in bodies] == [START_MS + t * 1000 for t in range(N_TICKS)], name
        rank = [order.index(b["model_version"]) for b in bodies]
        assert rank == sorted(rank), f"{name}: versions went backwards"
        assert set(rank) == {0, 1, 2}, f"{name}: not every version served it"
        # Step 3. Under each version, the forecasts are the model's pass from the zero state: the first
        # model over the whole history, each new one over the window retained at its swap and on from there.
        got = np.array([b["forecast"] for b in bodies])  # (T, horizon)
        x, stats = scaling.transform(values)  # (T,), (T, N_STATS)
        first = {v: rank.index(i) for i, v in enumerate(order)}
        np.testing.assert_allclose(
            got[: first[v1]],
            reference_forecast(models["init"], values[: first[v1]], scaling),
            rtol=1e-5,
            atol=1e-4,
        )
        for version, end in ((v1, first[v2]), (v2, N_TICKS)):
            k = first[version]
            start = k - min(k, WINDOW)
            with torch.no_grad():
                y, _ = models[version](x[start:end][None, :, None])  # (1, end - start, horizon)
            expected = scaling.denormalize(stats[start:end], y[0]).numpy()[k - start :]
            np.testing.assert_allclose(
                got[k:end],
                expected,
                rtol=1e-5,
                atol=1e-4,
                err_msg=f"{name} under {version} (swapped in at value {k})",
            )
    assert service.terminate() == 0


def test_a_rollback_made_with_the_cli_survives_a_restart_whose_latest_is_broken(topics, serve, tmp_path):
    """Promote v1, roll back to v0 with ``forecaster checkpoints promote``, then LATEST names a broken
    version: a restarted ``forecaster serve`` serves v0 (the operator's last choice), not v1 (the newest)."""
    import os
    import subprocess
    import sys

    settings = topics.settings()
    scaling = Scaling.from_settings(settings.scaling)
    root = tmp_path / "checkpoints"
    v0 = save_checkpoint(root, new_model(21, settings), scaling)
    v1 = save_checkpoint(root, new_model(22, settings), scaling)
    env = {**os.environ, "FORECASTER_CHECKPOINTS__DIR": str(root)}
    for version in (v0, v1, v0):  # publish v0, promote v1, roll back to v0
        done = subprocess.run(
            [sys.executable, "-m", "forecaster", "checkpoints", "promote", version],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    service = serve().start()
    assert service.metrics()[("forecaster_model_info", (("cell", "gru"), ("version", v0)))] == 1
    assert service.terminate() == 0
    broken = publish_nan_checkpoint(root, new_model(23, settings), scaling)  # LATEST -> a broken version
    restarted = serve().start()
    info = {labels for name, labels in restarted.metrics() if name == "forecaster_model_info"}
    assert info == {(("cell", "gru"), ("version", v0))}, (info, v0, v1, broken)
    assert f"serving checkpoint {v0}" in restarted.log_path.read_text()
    assert restarted.terminate() == 0
