"""Replay: a series file through the engine, as the service would see it, and the quality of what came out.

Rows are read by ``forecaster.data.read_series`` (bad rows skipped with their line numbers), put in event-time
order (ties keep file order, as ``forecaster produce`` sends them) and fed to one ``Engine`` in batches of
rows, the way the service feeds it polled batches: same engine, same checkpoint, same forecasts. A value
whose ts is not newer than its series' last one is a duplicate, dropped and counted, as in the service.

Series are put on a time grid as the service puts them (``Engine.from_settings``: ``state.period``, by
default the model's period, a series spaced otherwise learning its own from its first values): a value that
comes ``k`` periods after the one before is stepped through the ``k - 1`` missing ones (``forecaster.timegrid``).

The forecasts are then scored against what happened: step ``k`` of a series with a period against its value
``k`` periods after the origin (``forecaster.tools.pairing``: a missing period is never scored), of a series
without one against its ``k``-th next value; next to the seasonal-naive and last-value baselines read on the
same grid, on exactly the same points (``forecaster.train.baselines``): per horizon step and overall MAE, RMSE,
MASE (Hyndman & Koehler's: errors scaled by each series' in-sample seasonal-naive MAE, over the values before
the first scored forecast, or the whole series when every forecast is scored) and the relative MAE (MAE over
a baseline's MAE); with intervals on, the coverage and the interval (Winkler) score of each level per step
(``forecaster.tools.interval_score``), on the same origins.

>>> import io
>>> from forecaster.model import RecurrentForecaster
>>> model = RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2)
>>> rows = "series,ts,value\\n" + "".join(f"a,{t},{t % 3}\\n" for t in range(1, 13)) + "a,5,9\\na,6,x\\n"
>>> result = replay(io.StringIO(rows), Engine(model, version="v1"), season=3, progress=False)
>>> len(result.rows), result.duplicates, [b.line for b in result.bad_rows]
(12, 1, [15])
>>> result.errors["seasonal_naive"].overall_mae()
0.0
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from forecaster.data import BadRow, read_series
from forecaster.engine.engine import Engine
from forecaster.timegrid import DEFAULT_MAX_GAP
from forecaster.tools.interval_score import IntervalScores
from forecaster.tools.pairing import SeriesGrid
from forecaster.train.baselines import ForecastErrors, detect_season, error_report, relative_mae
from forecaster.train.seasons import calendar_seasons

BASELINES = ("seasonal_naive", "last_value")
SHOW_BAD_ROWS = 5  # line numbers listed in the summary; the rest are counted


@dataclass
class Stepped:
    """What the engine emitted, one row per stepped value, in stepped order."""

    series: list[str]
    ts: np.ndarray  # (n,) int64 epoch ms
    values: np.ndarray  # (n,) float64: the value stepped
    forecasts: np.ndarray  # (n, horizon) float32
    versions: list[str]  # (n,) model version of each forecast
    duplicate_lines: list[int] = field(default_factory=list)
    clipped: int = 0  # values moved nearer their series' running mean (``Scaling.winsorize``)
    lower: np.ndarray | None = None  # (n, levels, horizon) float32; None without intervals
    upper: np.ndarray | None = None
    labels: list[str] = field(default_factory=list)  # level names ("80", "95")
    step_ms: np.ndarray | None = None  # (n,) int64: the period each row stepped with (0: none); None: all 0
    imputed: int = 0  # missing periods the engine stepped through
    grid_season: int = 1  # the engine model's season: it imputes a missing period, keeps a restart's phase
    max_gap: int = DEFAULT_MAX_GAP  # the engine's max_gap_periods: a longer gap is a restart

    def __len__(self) -> int:
        return len(self.series)

    @property
    def horizon(self) -> int:
        return int(self.forecasts.shape[1])

    def by_series(self) -> dict[str, np.ndarray]:
        """Row positions of each series, in stepped (hence time) order."""
        codes, names = pd.factorize(np.asarray(self.series, dtype=object))
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
        return {str(name): order[a:b] for name, a, b in zip(names, bounds[:-1], bounds[1:], strict=True)}

    def periods(self) -> np.ndarray:
        """(n,) int64: the period each row stepped with (0: none)."""
        return self.step_ms if self.step_ms is not None else np.zeros(len(self), np.int64)

    def grids(self) -> list[SeriesGrid]:
        """Each series' time grid, in ``by_series`` order: where its forecasts are scored."""
        step_ms = self.periods()
        return [
            SeriesGrid.of(
                self.ts[at], self.values[at], step_ms[at], season=self.grid_season, max_gap=self.max_gap
            )
            for at in self.by_series().values()
        ]

    def target_times(self) -> np.ndarray:
        """(n, horizon) int64 epoch ms: when each step's value is expected, ``ts + k * step_ms``; -1 for a
        series without a period (a step is its next value, whenever that comes)."""
        step_ms = self.periods()[:, None]
        k = np.arange(1, self.horizon + 1)[None, :]
        return np.where(step_ms > 0, self.ts[:, None] + k * step_ms, -1)


@dataclass
class ReplayResult:
    """Forecasts of a replayed file and their errors per method (``model`` and the baselines)."""

    rows: Stepped
    errors: dict[str, ForecastErrors]
    season: int
    bad_rows: list[BadRow] = field(default_factory=list)
    out_of_order: int = 0  # rows whose ts is older than a row of the same series above them in the file
    intervals: IntervalScores | None = None  # coverage and Winkler score per level and step

    @property
    def duplicates(self) -> int:
        return len(self.rows.duplicate_lines)

    @property
    def horizon(self) -> int:
        return self.rows.horizon

    def series_with_a_period(self) -> int:
        """Series whose last value was stepped on a time grid."""
        periods = self.rows.periods()
        return sum(int(periods[at[-1]] > 0) for at in self.rows.by_series().values())

    def metrics(self) -> dict[str, Any]:
        """JSON-ready figures: per method MAE/RMSE/MASE overall and by horizon; the model's relative MAE vs
        each baseline."""
        points = int(self.errors["model"].count.sum())
        report = error_report(self.errors, BASELINES, season=self.season, horizon=self.horizon, points=points)
        if self.intervals is not None:
            report["intervals"] = self.intervals.report()
        return report


def load_rows(source: str | os.PathLike[str] | IO[str]) -> tuple[pd.DataFrame, list[BadRow], int]:
    """Good rows of a series file in event-time order (ties in file order), the bad rows, and how many
    rows were out of time order within their series in the file (a file sorted by series, then time, is in
    order)."""
    loaded = read_series(source)
    frame = loaded.frame
    # in file order (a wide file's line holds every series' value at one time)
    in_file = frame.sort_values("line", kind="stable")
    out_of_order = int((in_file["ts"] < in_file.groupby("series", sort=False)["ts"].cummax()).sum())
    frame = frame.sort_values(["ts", "line"], kind="stable").reset_index(drop=True)
    return frame, loaded.bad_rows, out_of_order


def step_rows(
    engine: Engine, frame: pd.DataFrame, *, batch_rows: int = 2000, progress: bool | None = None
) -> Stepped:
    """Feed ``frame`` (``series, ts, value, line``, in event-time order) to ``engine`` in batches of rows."""
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    names = frame["series"].to_numpy(dtype=object)
    ts = frame["ts"].to_numpy(dtype=np.int64)
    values = frame["value"].to_numpy(dtype=np.float64)
    lines = frame["line"].to_numpy(dtype=np.int64) if "line" in frame else np.arange(len(frame)) + 2
    series: list[str] = []
    parts: dict[str, list[np.ndarray]] = {
        "ts": [],
        "values": [],
        "forecasts": [],
        "lower": [],
        "upper": [],
        "step_ms": [],
    }
    versions: list[str] = []
    duplicate_lines: list[int] = []
    clipped = imputed = 0
    with tqdm(total=len(frame), unit="values", desc="replay", disable=_disabled(progress)) as bar:
        for lo in range(0, len(frame), batch_rows):
            hi = min(lo + batch_rows, len(frame))
            out = engine.process(names[lo:hi].tolist(), ts[lo:hi], values[lo:hi])
            series.extend(out.series)
            parts["ts"].append(out.ts)
            parts["values"].append(values[lo:hi][out.index])
            parts["forecasts"].append(out.forecasts)
            parts["step_ms"].append(out.step_ms)
            if out.lower is not None:
                parts["lower"].append(out.lower)
                parts["upper"].append(out.upper)
            versions.extend([out.version] * len(out))
            clipped += out.clipped
            imputed += out.imputed
            if out.duplicates:
                stepped = np.zeros(hi - lo, dtype=bool)
                stepped[out.index] = True
                duplicate_lines.extend(lines[lo:hi][~stepped].tolist())
            bar.update(hi - lo)
    horizon = engine.model.horizon
    return Stepped(
        series=series,
        ts=np.concatenate(parts["ts"]) if parts["ts"] else np.zeros(0, np.int64),
        values=np.concatenate(parts["values"]) if parts["values"] else np.zeros(0),
        forecasts=np.concatenate(parts["forecasts"])
        if parts["forecasts"]
        else np.zeros((0, horizon), np.float32),
        versions=versions,
        duplicate_lines=sorted(duplicate_lines),
        clipped=clipped,
        lower=np.concatenate(parts["lower"]) if parts["lower"] else None,
        upper=np.concatenate(parts["upper"]) if parts["upper"] else None,
        labels=engine.intervals.labels if engine.intervals is not None else [],
        step_ms=np.concatenate(parts["step_ms"]) if parts["step_ms"] else np.zeros(0, np.int64),
        imputed=imputed,
        grid_season=engine.model.season,
        max_gap=engine.max_gap_periods,
    )


def score(
    values: Sequence[np.ndarray],
    forecasts: Mapping[str, Sequence[np.ndarray]],
    *,
    horizon: int,
    season: int,
    first_origin: Sequence[int] | None = None,
    grids: Sequence[SeriesGrid] | None = None,
) -> dict[str, ForecastErrors]:
    """Errors of each method in ``forecasts`` (name -> per-series (T_i, >= horizon) arrays) and of both
    baselines, on the points where every method has a forecast and the target exists.

    ``first_origin[i]``: forecasts made before this position of series ``i`` are not scored (default 0);
    MASE's scale is the in-sample seasonal-naive MAE of the values up to that origin (of the whole series
    without ``first_origin``). ``grids[i]``: where series ``i``'s forecasts are scored (``Stepped.grids``;
    default: each value one step).
    """
    errors = {name: ForecastErrors.empty(horizon) for name in [*forecasts, *BASELINES]}
    for i, v in enumerate(values):
        start = 0 if first_origin is None else int(first_origin[i])
        if len(v) < 2 or start >= len(v) - 1:
            continue
        rows = slice(start, len(v) - 1)  # the last value has nothing after it to score
        insample = len(v) if first_origin is None else start + 1
        grid = grids[i] if grids is not None else SeriesGrid.by_value(v)
        scored = grid.errors({name: f[i] for name, f in forecasts.items()}, rows, horizon, season, insample)
        for name, e in scored.items():
            errors[name] = errors[name] + e
    return errors


def replay(
    source: str | os.PathLike[str] | IO[str],
    engine: Engine,
    *,
    season: int | None = None,
    batch_rows: int = 2000,
    score_from: int | None = None,
    progress: bool | None = None,
    max_series_length: int | None = None,
) -> ReplayResult:
    """Replay a series file through ``engine`` and score its forecasts (see ``replay_frame``). Rows the
    service would dead-letter (a series id longer than ``max_series_length``, a value <= 0 under log
    scaling) are bad rows."""
    frame, bad_rows, out_of_order = load_rows(source)
    if max_series_length is not None:  # what the service dead-letters as series_too_long
        long = (frame["series"].str.len() > max_series_length).to_numpy()
        frame, bad_rows = _drop(frame, long, bad_rows, "series_too_long", f"> {max_series_length} characters")
    if engine.scaling.positive:  # the engine scales logarithms: the service dead-letters a value <= 0
        bad = ~(frame["value"].to_numpy() > 0.0)
        frame, bad_rows = _drop(frame, bad, bad_rows, "not_positive", f"with {engine.scaling.kind} scaling")
    result = replay_frame(
        frame, engine, season=season, batch_rows=batch_rows, score_from=score_from, progress=progress
    )
    result.bad_rows, result.out_of_order = bad_rows, out_of_order
    return result


def _drop(
    frame: pd.DataFrame, bad: np.ndarray, bad_rows: list[BadRow], reason: str, detail: str
) -> tuple[pd.DataFrame, list[BadRow]]:
    """``frame`` without the rows ``bad`` marks, and ``bad_rows`` with them (in line order)."""
    if not bad.any():
        return frame, bad_rows
    more = [
        BadRow(int(line), reason, f"{name[:40]!r} {value} {detail}")
        for line, name, value in frame.loc[bad, ["line", "series", "value"]].itertuples(index=False)
    ]
    return frame[~bad].reset_index(drop=True), sorted(bad_rows + more, key=lambda b: b.line)


def replay_frame(
    frame: pd.DataFrame,
    engine: Engine,
    *,
    season: int | None = None,
    batch_rows: int = 2000,
    score_from: int | None = None,
    progress: bool | None = None,
) -> ReplayResult:
    """Step ``frame`` (``series, ts, value`` [, ``line``], in event-time order) and score the forecasts.

    ``season``: of the seasonal-naive baseline and MASE's scale (None: the first season the calendar of the
    timestamps names that the longest series holds twice, else detected from the values). ``score_from`` (epoch
    ms): only forecasts whose next value is at or after this time are scored (an evaluation on the later
    part of a file, after the engine has stepped through the earlier part).
    """
    rows = step_rows(engine, frame, batch_rows=batch_rows, progress=progress)
    groups = list(rows.by_series().values())
    grids = rows.grids()
    values = [rows.values[at] for at in groups]
    if season is None:  # the calendar's first season, as the trainer's reference; else autocorrelation's
        calendar = calendar_seasons([rows.ts[at] for at in groups])[1]
        longest = max((len(v) for v in values), default=0)
        held = [s for s in calendar if longest >= 2 * s]
        season = held[0] if held else detect_season(values)
    first = None if score_from is None else first_origins(rows, score_from)
    errors = score(
        values,
        {"model": [rows.forecasts[at] for at in groups]},
        horizon=rows.horizon,
        season=season,
        first_origin=first,
        grids=grids,
    )
    intervals = score_intervals(rows, first, grids)
    return ReplayResult(rows, errors, season, intervals=intervals)


def score_intervals(
    rows: Stepped, first_origin: Sequence[int] | None = None, grids: Sequence[SeriesGrid] | None = None
) -> IntervalScores | None:
    """Coverage and Winkler score of the emitted intervals per level and step, each against its target on
    the series' grid (``grids``: ``rows.grids()`` when not given); None without intervals."""
    if rows.lower is None or rows.upper is None:
        return None
    scores = IntervalScores.empty(rows.labels, rows.horizon)
    grids = rows.grids() if grids is None else grids
    for i, (at, grid) in enumerate(zip(rows.by_series().values(), grids, strict=True)):
        start = 0 if first_origin is None else int(first_origin[i])
        scores.add(rows.values[at], rows.lower[at], rows.upper[at], start, grid.targets(rows.horizon))
    return scores


def first_origins(rows: Stepped, score_from: int) -> list[int]:
    """Per series (in ``rows.by_series()`` order), the first origin whose next value is at or after
    ``score_from``."""
    return [
        max(int(np.searchsorted(rows.ts[at], score_from, side="left")) - 1, 0)
        for at in rows.by_series().values()
    ]


def forecasts_frame(rows: Stepped) -> pd.DataFrame:
    """One row per stepped value: ``series, ts, model_version, h1..hH``, the target time of each step
    ``at_1..at_H`` (epoch ms, as ``ts``; empty for a series without a period), and with intervals
    ``lower_80_h1 .. upper_95_hH``."""
    frame = pd.DataFrame({"series": rows.series, "ts": rows.ts, "model_version": rows.versions})
    for k in range(rows.horizon):
        frame[f"h{k + 1}"] = rows.forecasts[:, k]
    at = rows.target_times()
    for k in range(rows.horizon):
        frame[f"at_{k + 1}"] = _times(at[:, k])
    if rows.lower is not None and rows.upper is not None:  # lower_80_h1 .. upper_95_hH
        for side, bounds in (("lower", rows.lower), ("upper", rows.upper)):
            for li, label in enumerate(rows.labels):
                for k in range(rows.horizon):
                    frame[f"{side}_{label}_h{k + 1}"] = bounds[:, li, k]
    return frame


def long_frame(rows: Stepped) -> pd.DataFrame:
    """Nixtla's long layout, one row per forecast step: ``unique_id``, ``ds`` (its target time, epoch ms;
    empty for a series without a period), ``cutoff`` (the origin's ts), ``step`` (1..H), ``y_hat``,
    ``lo-80, hi-80, lo-95, hi-95`` (each level of the intervals, when on) and ``model_version``."""
    n, horizon = len(rows), rows.horizon
    origin = np.repeat(np.arange(n), horizon)  # (n * H,) origin-major
    frame = pd.DataFrame(
        {
            "unique_id": np.asarray(rows.series, dtype=object)[origin],
            "ds": _times(rows.target_times().reshape(-1)),
            "cutoff": rows.ts[origin],
            "step": np.tile(np.arange(1, horizon + 1), n),
            "y_hat": rows.forecasts.reshape(-1),
        }
    )
    if rows.lower is not None and rows.upper is not None:
        for li, label in enumerate(rows.labels):
            frame[f"lo-{label}"] = rows.lower[:, li, :].reshape(-1)
            frame[f"hi-{label}"] = rows.upper[:, li, :].reshape(-1)
    frame["model_version"] = np.asarray(rows.versions, dtype=object)[origin]
    return frame


def _times(at: np.ndarray) -> pd.arrays.IntegerArray:
    """Epoch ms as a nullable integer column: -1 (no target time) is written as an empty cell."""
    return pd.arrays.IntegerArray(np.maximum(at, 0).astype(np.int64), at < 0)


def write_forecasts(rows: Stepped, path: str | os.PathLike[str], *, long: bool = False) -> None:
    """The forecasts as CSV, one row per origin (``forecasts_frame``) or per step (``long``: ``long_frame``);
    float32 values written exactly (9 significant digits)."""
    frame = long_frame(rows) if long else forecasts_frame(rows)
    frame.to_csv(path, index=False, float_format="%.9g")


def format_metrics(result: ReplayResult) -> str:
    """A plain-text table: per horizon step and overall, MAE, RMSE, MASE (the model's and the seasonal-naive
    one's) and the model's MAE relative to both baselines."""
    e = result.errors
    model, naive, last = e["model"], e["seasonal_naive"], e["last_value"]
    _, rel_naive = relative_mae(model, naive)
    _, rel_last = relative_mae(model, last)
    header = (
        f"{'step':>7} {'points':>9} {'MAE':>12} {'RMSE':>12} {'MASE':>8} {'snaive MASE':>11} "
        f"{'relMAE/snaive':>13} {'relMAE/last':>11} {'snaive MAE':>12} {'last MAE':>12}"
    )
    lines = [header]
    for k in range(result.horizon):
        lines.append(
            f"{'h' + str(k + 1):>7} {int(model.count[k]):>9} {model.mae()[k]:>12.6g} {model.rmse()[k]:>12.6g} "
            f"{model.mase()[k]:>8.4f} {naive.mase()[k]:>11.4f} {rel_naive[k]:>13.4f} {rel_last[k]:>11.4f} "
            f"{naive.mae()[k]:>12.6g} {last.mae()[k]:>12.6g}"
        )
    lines.append(
        f"{'overall':>7} {int(model.count.sum()):>9} {model.overall_mae():>12.6g} {model.overall_rmse():>12.6g} "
        f"{model.overall_mase():>8.4f} {naive.overall_mase():>11.4f} {relative_mae(model, naive)[0]:>13.4f} "
        f"{relative_mae(model, last)[0]:>11.4f} {naive.overall_mae():>12.6g} {last.overall_mae():>12.6g}"
    )
    if model.unscaled_series:
        lines.append(
            f"MASE leaves out {model.unscaled_series} series without an in-sample scale (a flat history, or a"
            " single value); MAE and RMSE count them"
        )
    return "\n".join(lines)


def format_period(result: ReplayResult, engine: Engine) -> str:
    """One line: the period ``engine`` started series with, how many series had one at the end, the
    missing periods stepped through."""
    if engine.period_ms == 0:
        begin = "no period (state.period none): a step is the next value"
    elif engine.period_ms:
        begin = f"every series on a grid of {duration(engine.period_ms)} (state.period)"
    elif engine.model.period_ms:
        begin = (
            f"series started with the model's period of {duration(engine.model.period_ms)} (one spaced"
            " otherwise learnt its own)"
        )
    else:
        begin = "the model has no period: each series learnt its own from its first values"
    return (
        f"{begin}; {result.series_with_a_period()} of {len(result.rows.by_series())} series stepped on a time"
        f" grid (the rest value by value); {result.rows.imputed} missing periods stepped through (imputed,"
        " never scored)"
    )


def duration(ms: int) -> str:
    """``ms`` in the largest unit it is a whole number of (``90min``, ``1h``, ``7d``), else in ms."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1_000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def format_intervals(scores: IntervalScores) -> str:
    """Per step: coverage and interval (Winkler) score of each level."""
    cov, wink = scores.coverage(), scores.winkler()
    header = f"{'step':>7} {'points':>9}" + "".join(
        f" {'cover ' + label + '%':>10} {'Winkler ' + label + '%':>12}" for label in scores.labels
    )
    lines = [header]
    for k in range(scores.count.shape[0]):
        cells = "".join(f" {cov[i, k]:>10.3f} {wink[i, k]:>12.6g}" for i in range(len(scores.labels)))
        lines.append(f"{'h' + str(k + 1):>7} {int(scores.count[k]):>9}{cells}")
    return "\n".join(lines)


def format_problems(result: ReplayResult) -> list[str]:
    """Lines about the rows that were skipped, dropped as duplicates, moved by the clip, or out of time
    order."""
    lines = []
    if result.bad_rows:
        counts = pd.Series([b.reason for b in result.bad_rows]).value_counts()
        reasons = ", ".join(f"{reason} {n}" for reason, n in counts.items())
        shown = ", ".join(
            f"line {b.line} ({b.reason}{': ' + b.detail if b.detail else ''})"
            for b in result.bad_rows[:SHOW_BAD_ROWS]
        )
        more = (
            f", and {len(result.bad_rows) - SHOW_BAD_ROWS} more"
            if len(result.bad_rows) > SHOW_BAD_ROWS
            else ""
        )
        lines.append(f"skipped {len(result.bad_rows)} bad rows ({reasons}): {shown}{more}")
    if result.duplicates:
        shown = ", ".join(str(line) for line in result.rows.duplicate_lines[:SHOW_BAD_ROWS])
        more = ", ..." if result.duplicates > SHOW_BAD_ROWS else ""
        lines.append(
            f"dropped {result.duplicates} duplicate rows (ts not newer than an earlier row of the same "
            f"series): lines {shown}{more}"
        )
    if result.rows.clipped:
        lines.append(
            f"{result.rows.clipped} values lay farther than scaling.clip running scales from their series'"
            " running mean: stepped at that distance (their errors count them as they are)"
        )
    if result.out_of_order:
        lines.append(
            f"{result.out_of_order} rows were out of time order within their series in the file; replayed in"
            " event-time order"
        )
    return lines


def _disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: True hides, None shows on a terminal only."""
    return {True: False, False: True, None: None}[progress]
