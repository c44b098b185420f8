"""Why the residual net learns little: what is left in its baseline's errors, and who can find it; prints JSON.

    python bench/residuals.py [--sets nottem,us_employment] [--quick]
    python bench/residuals.py --dump /tmp/r && python bench/residuals_arima.py /tmp/r   # AutoARIMA too

For each data set of ``bench/quality.py`` the trainer's own steps pick the seasons and the baseline on the
earlier part of every series (as ``forecaster train`` does). Along each whole series, in the scaled units
the net is trained in, the baseline's one-step error ``r[t] = x[t] - base[t-1, h1]`` is what the residual net
must learn to forecast at step 1. This reports, per set:

* ``residual_scale``: the mean absolute residual over the mean absolute scaled value (how small the
  net's target is next to its input);
* ``acf``: the residuals' autocorrelation at lags 1, 2, 3, the season and twice the season (pooled over
  series): structure a linear model of the recent residuals can use;
* ``ar``: an AR model on the last ``p`` residuals (and the residual one season back), least squares fitted
  on the earlier part, scored one step ahead on the held-out part: its MAE over the residual's own MAE
  (what a net reading its baseline's recent errors could take at h1; below 1 is there to take);
* (``bench/residuals_arima.py`` on ``--dump``'s files) statsforecast's AutoARIMA fitted on each series'
  earlier residuals: its orders, and its one-step MAE on the held-out residuals over theirs;
* ``net``: the net as the trainer fits it (``value``: the value alone, what is served) and with the
  baseline's recent errors as a second input (``errors``), each scored on the held-out part against the
  untrained baseline, at h1 and all steps (``bench/net_inputs.py``'s fitting code).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import net_inputs  # noqa: E402  (the trainer's fitting on ready batches)
import quality  # noqa: E402  (the data sets and their held-out cut)

from forecaster.config import Settings  # noqa: E402
from forecaster.scaling import Scaling  # noqa: E402
from forecaster.train.choice import choose_baseline  # noqa: E402
from forecaster.train.fit import Batch, chunk_targets, make_batches  # noqa: E402
from forecaster.train.history import History  # noqa: E402
from forecaster.train.run import baseline_model, resolve_seasons  # noqa: E402

AR_LAGS = 3
EPOCHS, PATIENCE = 0, 5  # --epochs, --patience (0: the set's epochs)


def residuals(model: nn.Module, batch: Batch) -> np.ndarray:
    """(B, L) the baseline's one-step error at each position, scaled (NaN at the first and past the end)."""
    with torch.no_grad():
        base = model.scaled_baseline(batch.values, batch.stats, batch.scaling, 0, batch.x.shape[1])
    x = batch.x[..., 0].double().numpy()
    out = np.full(x.shape, np.nan)
    out[:, 1:] = x[:, 1:] - base[:, :-1, 0].double().numpy()
    past_end = np.arange(x.shape[1])[None, :] >= batch.n[:, None]
    out[past_end] = np.nan
    out[torch.isnan(batch.v[:, : x.shape[1]]).numpy()] = np.nan  # missing periods: no error
    return out


def pooled_acf(series: list[np.ndarray], lags: list[int]) -> dict[str, float]:
    out = {}
    for lag in lags:
        a, b = [], []
        for r in series:
            r = r - np.nanmean(r)
            if len(r) > lag:
                a.append(r[lag:])
                b.append(r[:-lag])
        if not a:
            continue
        x, y = np.concatenate(a), np.concatenate(b)
        ok = np.isfinite(x) & np.isfinite(y)
        out[str(lag)] = float(np.corrcoef(x[ok], y[ok])[0, 1]) if ok.sum() > 10 else math.nan
    return out


def ar_share(train: list[np.ndarray], test_from: list[int], season: int) -> dict[str, Any]:
    """One linear model over all series: r[t] on r[t-1..t-p] (and r[t-season], r[t-season-1]); fitted on the
    earlier positions, scored on the later ones."""
    lags = list(range(1, AR_LAGS + 1)) + ([season, season + 1] if season > AR_LAGS + 1 else [])
    rows: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    targets: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for r, cut in zip(train, test_from, strict=True):
        top = max(lags)
        if len(r) <= top + 1:
            continue
        features = np.stack([r[top - lag : len(r) - lag] for lag in lags], 1)  # (n - top, p)
        target = r[top:]
        where = np.arange(top, len(r))
        for part, sel in (("train", where < cut), ("test", where >= cut)):
            rows[part].append(features[sel])
            targets[part].append(target[sel])
    if not rows["train"] or not rows["test"]:
        return {}
    xs = {k: np.concatenate(v) for k, v in rows.items()}
    ys = {k: np.concatenate(v) for k, v in targets.items()}
    ok = {k: np.isfinite(xs[k]).all(1) & np.isfinite(ys[k]) for k in xs}
    coef, *_ = np.linalg.lstsq(xs["train"][ok["train"]], ys["train"][ok["train"]], rcond=None)
    pred = xs["test"][ok["test"]] @ coef
    y = ys["test"][ok["test"]]
    return {
        "lags": lags,
        "coefficients": [round(float(c), 3) for c in coef],
        "test_mae_over_residual_mae": round(float(np.abs(y - pred).mean() / np.abs(y).mean()), 4),
        "points": int(len(y)),
    }


def with_errors(batches: list[Batch], model: nn.Module) -> None:
    """Append the baseline's one-step error at each position as a second input (0 where there is none)."""
    for batch in batches:
        r = np.nan_to_num(residuals(model, batch), nan=0.0)
        batch.x = torch.cat([batch.x, torch.from_numpy(r).float().unsqueeze(-1)], -1)


def step_errors(model: nn.Module, batches: list[Batch], warmup: int) -> np.ndarray:
    """Scaled MAE per step of the forecasts whose targets lie in the held-out part."""
    abs_sum, count = None, None
    model.eval()
    with torch.no_grad():
        for batch in batches:
            length, h = batch.x.shape[1], None
            for start in range(0, length, 256):
                stop = min(start + 256, length)
                y, h = net_inputs._forward(model, batch, start, stop, h)
                target, mask = chunk_targets(batch, start, stop, model.horizon, warmup, "validation")
                e = ((y - target).abs() * mask).sum((0, 1)).double().numpy()
                c = mask.sum((0, 1)).double().numpy()
                abs_sum = e if abs_sum is None else abs_sum + e
                count = c if count is None else count + c
    return abs_sum / np.maximum(count, 1)


def run_set(data: quality.DataSet, quick: bool, dump: str | None, nets: bool) -> dict[str, Any]:
    frame = data.load()
    limit = 24 if quick and frame["series"].nunique() > 24 else data.max_series
    if limit is not None:
        frame = frame[frame["series"].isin(sorted(frame["series"].unique())[:limit])]
    start = quality.cut(frame, data.test_fraction)
    epochs = min(data.epochs, 15) if quick else data.epochs
    settings = Settings(
        model={
            "hidden_size": data.hidden_size,
            "num_layers": data.num_layers,
            "horizon": data.horizon,
            "seed": 0,
        },
        train={"epochs": epochs, "chunk_length": data.chunk_length, "patience": PATIENCE},
        state={"device": "cpu", "window": data.window},
    )
    early = frame[frame["ts"] < start]
    history = History.from_long(early["series"].to_numpy(), early["ts"].to_numpy(), early["value"].to_numpy())
    whole = History.from_long(frame["series"].to_numpy(), frame["ts"].to_numpy(), frame["value"].to_numpy())
    scaling = Scaling.from_settings(settings.scaling)
    seasons = resolve_seasons(settings, history)
    baseline, mix = choose_baseline(settings, history.values, scaling, seasons.season, seasons.more)
    untrained = baseline_model(settings, baseline, mix)
    season = int(baseline.get("season", 1))
    test_from = [int((t < start).sum()) for t in whole.ts]
    batches = []
    for i, v in enumerate(whole.values):  # one batch per series: each keeps its own held-out share
        (b,) = make_batches([v], scaling, data.horizon, 1, 1.0 - test_from[i] / max(len(v), 1))
        b.rows = [i]
        batches.append(b)
    res = [residuals(untrained, b)[0, : int(b.n[0])] for b in batches]
    x_abs = np.nanmean(np.concatenate([b.x[0, : int(b.n[0]), 0].abs().numpy() for b in batches]))
    r_all = np.concatenate(res)
    out: dict[str, Any] = {
        "series": len(res),
        "baseline": baseline,
        "residual_scale": round(float(np.nanmean(np.abs(r_all)) / x_abs), 4),
        "acf": {k: round(v, 3) for k, v in pooled_acf(res, [1, 2, 3, season, 2 * season]).items()},
        "ar": ar_share(res, test_from, season),
    }
    if dump is not None:  # for bench/residuals_arima.py (statsforecast wants pandas < 3: its own venv)
        arrays = {f"r{i}": r for i, r in enumerate(res)}
        np.savez(Path(dump) / f"{data.name}.npz", test_from=np.array(test_from), season=season, **arrays)
    if nets:
        out["net"] = fit_nets(settings, baseline, mix, history, batches, untrained, data)
    print(json.dumps({data.name: out}), file=sys.stderr)
    return out


def fit_nets(settings, baseline, mix, history, test_batches, untrained, data) -> dict[str, Any]:
    train = settings.train
    base = step_errors(untrained, test_batches, train.warmup)
    result = {}
    for variant in ("value", "errors"):
        torch.manual_seed(0)
        model = baseline_model(settings, baseline, mix)
        fit_batches = make_batches(
            history.values,
            Scaling.from_settings(settings.scaling),
            data.horizon,
            train.batch_series,
            train.validation_fraction,
        )
        scored = test_batches
        if variant == "errors":
            model.rnn = nn.GRU(2, model.hidden_size, model.num_layers, batch_first=True)
            model.input_size = 2
            with_errors(fit_batches, untrained)
            scored = [Batch(**{**b.__dict__}) for b in test_batches]
            with_errors(scored, untrained)
        started = time.perf_counter()
        fitted = net_inputs.fit_variant(
            model, fit_batches, train, train.epochs, train.patience, train.learning_rate, train.loss
        )
        mae = step_errors(model, scored, train.warmup)
        result[variant] = {
            "epochs": fitted["epochs"],
            "seconds": round(time.perf_counter() - started, 1),
            "h1_vs_baseline": round(float(mae[0] / base[0]), 4),
            "last_vs_baseline": round(float(mae[-1] / base[-1]), 4),
            "mean_vs_baseline": round(float(mae.mean() / base.mean()), 4),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sets", default="nottem,air_passengers,aus_arrivals,gasoline,us_employment,mixed_daily"
    )
    parser.add_argument("--quick", action="store_true", help="at most 15 epochs and 24 series per set")
    parser.add_argument(
        "--dump", help="a folder: each set's residuals as <set>.npz (bench/residuals_arima.py)"
    )
    parser.add_argument("--no-nets", action="store_true", help="the residuals' structure only")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--epochs", type=int, default=0, help="every net's epochs (default: the set's)")
    parser.add_argument("--patience", type=int, default=5, help="epochs without a better validation loss")
    args = parser.parse_args(argv)
    global EPOCHS, PATIENCE
    EPOCHS, PATIENCE = args.epochs, args.patience
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"bench": "residuals", "quick": args.quick, "sets": {}}
    for name in args.sets.split(","):
        report["sets"][name] = run_set(quality.DATASETS[name], args.quick, args.dump, not args.no_nets)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
