"""Benchmark of the hot swap's re-warm, and how far a re-warmed state is from the full-history one; prints JSON.

    python bench/rewarm.py [--device cpu|cuda] [--series N] [--window W] [--quick]

1. ``rewarm``: every resident series restarts from zero and runs the new model over its retained window,
   for N resident series x W retained values (default 100k x 256 on CPU, 1M x 256 with ``--device
   cuda``): in the background as the service does it for large tables (the time until the swap, the
   longest pause of a boundary that copied windows, the pause of the one that swapped) and at the
   boundary (``Engine.rewarm``, one pause) for
   up to ``--boundary-limit`` series. The windows are filled directly in the state table (the fill is not
   what is measured); median, min and max over repeats.
2. ``loop``: the service's loop around a swap: batches of values through ``Engine.process`` with
   ``ModelSwapper.swap_if_ready`` after each, over a smaller resident set; the p50/p99 batch time in
   steady state next to the batches around the swap, for the re-warm at the boundary and in the
   background (copy of the windows, batches served while the new model warms, catch-up and swap).
3. ``distance``: a briefly trained model on synthetic series; for W in 16, 64, 256, 1024, the state after
   running from zero over the last W values against the state after the whole history, and the same for
   the forecast (in data units, next to the model's own forecast error so that the size is meaningful).
Model: GRU, hidden 64, 2 layers, horizon 12, float32.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from forecaster.checkpoints.hotswap import ModelSwapper
from forecaster.checkpoints.store import promote, save_checkpoint
from forecaster.engine.engine import Engine
from forecaster.engine.rewarm import RewarmJob
from forecaster.model import RecurrentForecaster
from forecaster.scaling import Scaling
from forecaster.tools.synthetic import generate
from forecaster.train.fit import fit

MODEL = {"cell": "gru", "hidden_size": 64, "num_layers": 2, "horizon": 12}


def model_of(seed: int, **overrides: Any) -> RecurrentForecaster:
    torch.manual_seed(seed)
    return RecurrentForecaster(**{**MODEL, **overrides}).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def resident_engine(n_series: int, window: int, device: torch.device, seed: int = 0) -> Engine:
    """An engine with ``n_series`` resident series whose ring buffers hold ``window`` (scaled) inputs."""
    engine = Engine(
        model_of(1), version="v1", device=device, window=window, capacity=n_series, max_series=n_series
    )
    table = engine.table
    slots, _ = table.acquire([f"s{i}" for i in range(n_series)], now=time.time())
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.as_tensor(slots, device=device)
    with torch.inference_mode():  # the table's tensors are inference tensors
        table.ring.index_copy_(0, idx, torch.randn(n_series, window, device=device, generator=generator))
        table.stats[idx, 0] = float(window + 7)
        table.stats[idx, 2] = 1.0
    table.count[slots] = window + 7  # a ring that has wrapped around
    return engine


def bench_rewarm(
    n_series: int, window: int, device: torch.device, repeats: int, boundary_limit: int
) -> dict[str, Any]:
    """Re-warm of every resident series: in the background (what the service does for large tables: copy
    of the windows, warm on another thread, catch-up and swap) and, up to ``boundary_limit`` series, at
    the boundary (``Engine.rewarm``, all in one pause)."""
    engine = resident_engine(n_series, window, device)
    if device.type == "cuda":
        engine.rewarm(model_of(2), "warmup")  # the first call pays kernel selection and allocations
    boundaries, pauses, walls, swaps = [], [], [], []
    for r in range(repeats):
        sync(device)
        began = started = time.perf_counter()
        job = RewarmJob(model_of(3 + r), f"v{r + 3}", engine)
        sync(device)
        paused = [time.perf_counter() - started]
        counts = None
        while counts is None:  # no traffic here: each boundary copies more windows, the last one swaps
            job.wait()
            started = time.perf_counter()
            counts = job.at_boundary(engine)
            sync(device)
            paused.append(time.perf_counter() - started)
        walls.append(time.perf_counter() - began)
        assert counts["caught_up"] == n_series, counts
        boundaries.append(len(paused))
        pauses.append(max(paused[:-1]))
        swaps.append(paused[-1])
    report: dict[str, Any] = {
        "series": n_series,
        "window": window,
        "background": {
            "seconds": summary(walls),
            "values_per_second": n_series * window / statistics.median(walls),
            "boundaries": boundaries[0],
            "max_copy_pause_seconds": summary(pauses),
            "swap_pause_seconds": summary(swaps),
        },
    }
    del engine, job
    boundary_series = min(n_series, boundary_limit)
    engine = resident_engine(boundary_series, window, device)
    times = []
    for r in range(repeats):
        sync(device)
        started = time.perf_counter()
        engine.rewarm(model_of(20 + r), f"w{r}")
        sync(device)
        times.append(time.perf_counter() - started)
    report["at_boundary"] = {
        "series": boundary_series,
        "seconds": summary(times),
        "values_per_second": boundary_series * window / statistics.median(times),
    }
    return report


def bench_loop(
    n_series: int, window: int, batch: int, batches: int, device: torch.device, background: bool
) -> dict[str, Any]:
    """Batch times of the service loop (process, then swap_if_ready) with one swap in the middle."""
    engine = resident_engine(n_series, window, device)
    names = [f"s{i}" for i in range(n_series)]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        swapper = ModelSwapper(
            root,
            "v1",
            registry=CollectorRegistry(),
            device=device,
            background_above=0 if background else 2**62,
        )
        ts = 1_700_000_000_000
        phases: dict[str, list[float]] = {"steady": [], "copy": [], "during": [], "swap": []}
        phase, i = "steady", 0
        while i < batches or phase in ("copy", "during"):
            if i == batches // 2 and phase == "steady":  # published and validated off the hot path
                promote(root, save_checkpoint(root, model_of(9), Scaling()))
                assert swapper.check_now() is not None
                phase = "armed"
            chosen = rng.choice(n_series, size=batch, replace=False)
            ts += 1
            sync(device)
            started = time.perf_counter()
            engine.process([names[j] for j in chosen], np.full(batch, ts), rng.normal(size=batch))
            swapped = swapper.swap_if_ready(engine)
            sync(device)
            elapsed = time.perf_counter() - started
            if swapped is not None:
                phases["swap"].append(elapsed)
                phase = "done"
            elif phase == "armed":
                phases["copy"].append(elapsed)
                phase = "during"
            elif i > 0:  # the first batch pays one-off allocations
                phases["during" if phase == "during" else "steady"].append(elapsed)
            i += 1
    return {
        "mode": "background" if background else "at the boundary",
        "series": n_series,
        "window": window,
        "batch": batch,
        "steady_batches": len(phases["steady"]),
        "steady_p50_seconds": float(np.percentile(phases["steady"], 50)),
        "steady_p99_seconds": float(np.percentile(phases["steady"], 99)),
        "copy_batch_seconds": phases["copy"][0] if phases["copy"] else None,
        "batches_during_rewarm": len(phases["during"]),
        "during_rewarm_p99_seconds": float(np.percentile(phases["during"], 99)) if phases["during"] else None,
        "swap_batch_seconds": phases["swap"][0] if phases["swap"] else None,
    }


def bench_distance(windows: list[int], n_series: int, n_values: int, epochs: int) -> dict[str, Any]:
    """How far re-warming over the last W values lands from running over the whole history."""
    frame = generate(n_series, n_values, seed=11)
    values = [g["value"].to_numpy() for _, g in frame.groupby("series", sort=False)]
    scaling = Scaling()
    model = model_of(3)
    trained = fit(
        model,
        values,
        scaling,
        epochs=epochs,
        chunk_length=64,
        batch_series=32,
        learning_rate=5e-3,
        validation_fraction=0.1,
        patience=epochs,
        progress=False,
    )
    x, stats = scaling.transform(np.stack(values))  # (n, T), (n, T, N_STATS)
    last = stats[:, -1]  # (n, N_STATS)
    with torch.no_grad():
        y_full, h_full = model(x[:, :, None])  # (n, T, horizon), (layers, n, hidden)
        f_full = scaling.denormalize(last, y_full[:, -1]).numpy()  # (n, horizon)
        # The model's own typical error, for scale: forecasts made 200 values before the end vs what happened.
        origin = n_values - 1 - 200
        f_past = scaling.denormalize(stats[:, origin], y_full[:, origin]).numpy()  # (n, horizon)
        actual = np.stack([v[origin + 1 : origin + 1 + MODEL["horizon"]] for v in values])  # (n, horizon)
        model_mae = float(np.abs(f_past - actual).mean())
        rows = []
        for w in windows:
            if w > n_values:
                continue
            y_w, h_w = model(x[:, -w:, None])  # from the zero state over the last w inputs
            f_w = scaling.denormalize(last, y_w[:, -1]).numpy()
            state_gap = (h_w - h_full).norm(dim=-1) / h_full.norm(dim=-1).clamp(min=1e-12)  # (layers, n)
            forecast_gap = np.abs(f_w - f_full)  # (n, horizon)
            rows.append(
                {
                    "window": w,
                    "state_relative_l2_mean": float(state_gap.mean()),
                    "state_relative_l2_max": float(state_gap.max()),
                    "forecast_abs_diff_mean": float(forecast_gap.mean()),
                    "forecast_abs_diff_max": float(forecast_gap.max()),
                    "forecast_diff_over_model_mae": float(forecast_gap.mean()) / model_mae,
                }
            )
    return {
        "series": n_series,
        "history": n_values,
        "train_epochs": trained.epochs,
        "train_loss": trained.train_losses[-1],
        "model_mae": model_mae,
        "by_window": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--series", type=int, help="resident series (default 100k on cpu, 1M on cuda)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    parser.add_argument("--skip-distance", action="store_true")
    parser.add_argument(
        "--boundary-limit",
        type=int,
        default=20_000,
        help="most series re-warmed at the boundary (Engine.rewarm holds big intermediates)",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n_series = args.series or (1_000_000 if device.type == "cuda" else 100_000)
    repeats = args.repeats
    distance = dict(windows=[16, 64, 256, 1024], n_series=64, n_values=4096, epochs=3)
    loop = dict(n_series=20_000, batch=1000, batches=60)
    if args.quick:
        n_series, repeats = min(n_series, 2000), 2
        distance = dict(windows=[16, 64, 256], n_series=8, n_values=512, epochs=1)
        loop = dict(n_series=2000, batch=200, batches=20)
    report: dict[str, Any] = {
        "bench": "rewarm",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": MODEL,
        "quick": args.quick,
    }
    report["rewarm"] = bench_rewarm(n_series, args.window, device, repeats, args.boundary_limit)
    print(json.dumps(report["rewarm"]), file=sys.stderr)
    report["loop"] = [
        bench_loop(window=args.window, device=device, background=b, **loop) for b in (False, True)
    ]
    print(json.dumps(report["loop"]), file=sys.stderr)
    if not args.skip_distance:
        report["distance"] = bench_distance(**distance)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
