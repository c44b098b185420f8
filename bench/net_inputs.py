"""What makes the recurrent net beat its baseline? An ablation of its inputs and training; prints JSON.

    python bench/net_inputs.py [--sets nottem,us_employment] [--quick]

For each data set of ``bench/quality.py`` the trainer's own steps pick the seasons and the baseline on the
earlier part of every series (as ``forecaster train`` does), then one net per variant is fitted on that
earlier part with the trainer's fitting code (validation: its last fraction, best epoch kept) and scored
on the held-out later part, in the scaled units the net is trained in, against its untrained baseline on
the same points (below 1: the net helps):

* ``value``: what the project serves: the value alone, the trainer's recipe (``train`` settings: the
  absolute error, ``train.loss = "mae"``);
* ``calendar``: the value and the phase of each calendar cycle shorter than the data's reach (year for
  monthly, quarterly and weekly data; week and year for daily; day and week for hourly and finer) as
  sine/cosine pairs of two or three harmonics, read from each value's ``ts``;
* ``small``: one layer of 16 units (short histories);
* ``longer``: a third of the learning rate, twice the epochs and patience;
* ``squared``: trained on the squared error (``train.loss = "mse"``, the trainer's loss until it was
  measured here): it fits the mean, where MAE and MASE score the median.

Only ``value`` can be served: the engine's input is the value alone, so ``calendar`` is measured here
before any of it is built into the engine, its re-warm and its snapshots.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (the data sets and their held-out cut)

from forecaster.config import Settings  # noqa: E402
from forecaster.scaling import Scaling  # noqa: E402
from forecaster.train.choice import choose_baseline  # noqa: E402
from forecaster.train.fit import Batch, _forward, _train_epoch, chunk_targets, make_batches  # noqa: E402
from forecaster.train.history import History  # noqa: E402
from forecaster.train.run import baseline_model, resolve_seasons  # noqa: E402
from forecaster.train.seasons import DAY_MS, calendar_seasons  # noqa: E402

YEAR_MS = 365.2425 * DAY_MS
WEEK_MS = 7 * DAY_MS
EPOCH_THURSDAY_MS = 3 * DAY_MS  # 1970-01-01 was a Thursday: shifts the week's phase to start on Monday
# (period, offset, harmonics) of the calendar cycles each calendar's net sees.
CYCLES: dict[str, tuple[tuple[float, float, int], ...]] = {
    "quarterly": ((YEAR_MS, 0.0, 2),),
    "monthly": ((YEAR_MS, 0.0, 3),),
    "weekly": ((YEAR_MS, 0.0, 3),),
    "daily": ((WEEK_MS, EPOCH_THURSDAY_MS, 2), (YEAR_MS, 0.0, 2)),
    "hourly": ((DAY_MS, 0.0, 2), (WEEK_MS, EPOCH_THURSDAY_MS, 2)),
    "half-hourly": ((DAY_MS, 0.0, 2), (WEEK_MS, EPOCH_THURSDAY_MS, 2)),
    "15-minute": ((DAY_MS, 0.0, 2), (WEEK_MS, EPOCH_THURSDAY_MS, 2)),
    "minutely": ((DAY_MS, 0.0, 2), (WEEK_MS, EPOCH_THURSDAY_MS, 2)),
}
VARIANTS = ("value", "calendar", "small", "longer", "squared")


def calendar_features(ts: np.ndarray, calendar: str) -> np.ndarray:
    """Sine/cosine of each cycle's phase at ``ts`` (epoch ms), (T, F) float32; F = 0 for an irregular one.

    >>> calendar_features(np.array([0, int(YEAR_MS / 4)]), "quarterly").round(3).tolist()
    [[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, -1.0]]
    """
    columns = []
    for period, offset, harmonics in CYCLES.get(calendar, ()):
        phase = 2.0 * math.pi * (((ts.astype(np.float64) + offset) % period) / period)
        for k in range(1, harmonics + 1):
            columns += [np.sin(k * phase), np.cos(k * phase)]
    return np.stack(columns, -1).astype(np.float32) if columns else np.zeros((len(ts), 0), np.float32)


def with_calendar(batches: list[Batch], ts: list[np.ndarray], calendar: str) -> None:
    """Append each value's calendar features to the batches' inputs (padding continues the spacing)."""
    for batch in batches:
        length = batch.x.shape[1]
        extra = []
        for row in batch.rows:
            t = ts[row]
            spacing = float(np.median(np.diff(t))) if len(t) > 1 else DAY_MS
            stamps = np.concatenate([t, t[-1] + spacing * np.arange(1, length - len(t) + 1)])[:length]
            extra.append(calendar_features(stamps, calendar))
        batch.x = torch.cat([batch.x, torch.from_numpy(np.stack(extra))], -1)  # (B, L, 1 + F)


def scaled_errors(model: nn.Module, batches: list[Batch], part: str, warmup: int) -> tuple[float, float]:
    """Scaled MAE and MSE of the forecasts whose targets lie in ``part`` of each series."""
    abs_sum, sq_sum, count = 0.0, 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            length, h = batch.x.shape[1], None
            for start in range(0, length, 256):
                stop = min(start + 256, length)
                y, h = _forward(model, batch, start, stop, h)  # (B, T, H)
                target, mask = chunk_targets(batch, start, stop, model.horizon, warmup, part)
                error = (y - target) * mask
                abs_sum += float(error.abs().sum())
                sq_sum += float((error**2).sum())
                count += int(mask.sum())
    return (abs_sum / count, sq_sum / count) if count else (math.nan, math.nan)


def fit_variant(
    model: nn.Module, batches: list[Batch], train: Any, epochs: int, patience: int, lr: float, loss: str
) -> dict[str, Any]:
    """The trainer's loop (``forecaster.train.fit``) on ready batches: best validation epoch kept."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rng = random.Random(0)
    best, best_state, waited, curve = math.inf, None, 0, []

    class _NoBar:
        def update(self, _n: int) -> None: ...

        def set_postfix(self, **_kw: Any) -> None: ...

    for _ in range(epochs):
        order = rng.sample(batches, len(batches))
        _train_epoch(model, order, optimizer, train.chunk_length, train.warmup, _NoBar(), loss)
        validation = scaled_errors(model, batches, "validation", train.warmup)[loss == "mse"]
        curve.append(round(validation, 5))
        if validation < best:
            best, best_state, waited = validation, copy.deepcopy(model.state_dict()), 0
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"epochs": len(curve), "validation_loss": curve}


def run_set(data: quality.DataSet, quick: bool) -> dict[str, Any]:
    frame = data.load()
    limit = 24 if quick and data.max_series is None and frame["series"].nunique() > 24 else data.max_series
    if limit is not None:
        frame = frame[frame["series"].isin(sorted(frame["series"].unique())[:limit])]
    start = quality.cut(frame, data.test_fraction)
    scaling_kind = (
        "log" if (frame["value"] > 0).all() and data.name in ("air_passengers", "gasoline") else "ewm"
    )
    epochs = min(data.epochs, 15) if quick else data.epochs
    settings = Settings(
        model={
            "hidden_size": data.hidden_size,
            "num_layers": data.num_layers,
            "horizon": data.horizon,
            "seed": 0,
        },
        train={"epochs": epochs, "chunk_length": data.chunk_length, "patience": 5},
        state={"device": "cpu", "window": data.window},
        scaling={"kind": scaling_kind},
    )
    early = frame[frame["ts"] < start]
    history = History.from_long(early["series"].to_numpy(), early["ts"].to_numpy(), early["value"].to_numpy())
    whole = History.from_long(frame["series"].to_numpy(), frame["ts"].to_numpy(), frame["value"].to_numpy())
    scaling = Scaling.from_settings(settings.scaling)
    seasons = resolve_seasons(settings, history)
    baseline, mix = choose_baseline(settings, history.values, scaling, seasons.season, seasons.more)
    calendar, _ = calendar_seasons(history.ts)
    train, horizon = settings.train, data.horizon
    # Held out: each series' values from ``start`` on (its share of the whole), as targets of the test part.
    test_share = [float((t >= start).mean()) for t in whole.ts]
    result: dict[str, Any] = {
        "data_calendar": calendar,
        "calendar_features": calendar_features(np.zeros(1, np.int64), calendar).shape[1],
        "baseline": baseline,
        "scaling": scaling_kind,
        "series": len(history.values),
    }

    def batches_of(fraction_of: History, fraction: float | list[float], features: bool) -> list[Batch]:
        if isinstance(fraction, list):  # per series: one batch per series keeps each one's own split
            out = []
            for i, v in enumerate(fraction_of.values):
                (b,) = make_batches([v], scaling, horizon, 1, fraction[i])
                b.rows = [i]
                out.append(b)
        else:
            out = make_batches(fraction_of.values, scaling, horizon, train.batch_series, fraction)
        if features:
            with_calendar(out, fraction_of.ts, calendar)
        return out

    untrained = baseline_model(settings, baseline, mix)
    test_plain = batches_of(whole, test_share, False)
    base_mae, base_mse = scaled_errors(untrained, test_plain, "validation", train.warmup)
    result["baseline_test"] = {"mae": base_mae, "mse": base_mse}
    for variant in VARIANTS:
        features = variant == "calendar"
        if features and not result["calendar_features"]:
            result[variant] = {"skipped": f"no calendar cycles for {calendar} data"}
            continue
        overrides = {"hidden_size": 16, "num_layers": 1} if variant == "small" else {}
        shaped = settings.model_copy(
            update={"model": settings.model.model_copy(update=overrides)} if overrides else {}
        )
        torch.manual_seed(0)
        model = baseline_model(shaped, baseline, mix)
        if features:  # the same net with a wider input (the baseline still reads the value input)
            model.rnn = nn.GRU(
                1 + result["calendar_features"], model.hidden_size, model.num_layers, batch_first=True
            )
            model.input_size = model.rnn.input_size
        lr = train.learning_rate / 3 if variant == "longer" else train.learning_rate
        epochs_v, patience = (2 * epochs, 10) if variant == "longer" else (epochs, train.patience)
        started = time.perf_counter()
        fitted = fit_variant(
            model,
            batches_of(history, train.validation_fraction, features),
            train,
            epochs_v,
            patience,
            lr,
            "mse" if variant == "squared" else train.loss,
        )
        mae, mse = scaled_errors(model, batches_of(whole, test_share, features), "validation", train.warmup)
        result[variant] = {
            **fitted,
            "seconds": round(time.perf_counter() - started, 1),
            "test_mae_vs_baseline": round(mae / base_mae, 4),
            "test_mse_vs_baseline": round(mse / base_mse, 4),
        }
        print(json.dumps({data.name: {variant: result[variant]}}), file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sets", default="nottem,air_passengers,aus_arrivals,gasoline,us_employment,mixed_daily"
    )
    parser.add_argument("--quick", action="store_true", help="at most 15 epochs and 24 series per set")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"bench": "net_inputs", "quick": args.quick, "variants": VARIANTS, "sets": {}}
    for name in args.sets.split(","):
        report["sets"][name] = run_set(quality.DATASETS[name], args.quick)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
