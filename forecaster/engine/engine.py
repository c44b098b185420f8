"""The engine: a batch of observations -> ordered rounds -> gather / step / scatter -> forecasts.

No Kafka in here: the service, the replay tool, the notebooks and the benchmarks drive the same code.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from forecaster.engine import snapshot as snap
from forecaster.engine.calibrator import Calibrator
from forecaster.engine.choice import Choice, reference_choice
from forecaster.engine.chooser import Chooser
from forecaster.engine.intervals import Intervals
from forecaster.engine.recalibrate import recalibrate
from forecaster.engine.rewarm import rows_per_call
from forecaster.engine.scores import CoverageAccumulator, CoverageStats, ErrorAccumulator, ErrorStats
from forecaster.engine.state import NO_TS, StateTable
from forecaster.engine.view import answer_asks
from forecaster.model import RecurrentForecaster
from forecaster.records.input import MAX_ABS_VALUE
from forecaster.scaling import Scaling
from forecaster.timegrid import DEFAULT_MAX_GAP, grid_steps, impute, impute_reach, resolve_period

# Missing periods a series still checking its period steps through after one value (a longer gap may say
# that the series is spaced otherwise than its first guess: it is not filled while the series learns).
MAX_LEARNING_GAP = 2


def resolve_device(setting: str) -> str:
    """``auto`` -> cuda when available, else cpu."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if setting == "auto" else setting


@dataclass
class Plan:
    """``Engine._plan``'s answer: the rows to step in stepped order and the round bounds within them; with
    missing periods, every step (``step_rows`` -1: a missing period of ``step_slots``) by round instead."""

    rows: np.ndarray
    bounds: list[int]
    step_rows: np.ndarray | None = None
    step_slots: np.ndarray | None = None
    imputed: int = 0
    restarts: int = 0
    step_ms: np.ndarray | None = None  # (len(ts),) the period each input row steps with, by input row


@dataclass
class EngineOutput:
    """One row per stepped value, in stepped order (round by round).

    ``index`` gives each row's position in the arguments of ``process`` (to find its input record).
    """

    series: list[str]
    ts: np.ndarray  # (n,) int64 epoch ms
    forecasts: np.ndarray  # (n, horizon) float32 forecasts in data units
    version: str
    duplicates: int = 0
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (n,) int64
    lower: np.ndarray | None = None  # (n, levels, horizon) float32 data units; None without intervals
    upper: np.ndarray | None = None  # (n, levels, horizon) float32
    clipped: int = 0  # values stepped nearer their series' range than they were (``Scaling.winsorize``)
    step_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (n,) period; 0: none
    imputed: int = 0  # missing periods stepped through (``forecaster.timegrid``) before these values
    restarts: int = 0  # gaps longer than ``max_gap_periods`` stepped through only to the season's phase

    def __len__(self) -> int:
        return len(self.series)


class Engine:
    """Forecasts for a stream of (series, ts, value), one recurrent step per new value.

    >>> model = RecurrentForecaster("gru", hidden_size=8, num_layers=1, horizon=2)
    >>> engine = Engine(model, version="v1", window=16)
    >>> out = engine.process(["a", "b", "a"], [2, 1, 1], [0.5, 1.0, 0.25])
    >>> out.series, out.ts.tolist(), out.forecasts.shape, out.index.tolist()
    (['a', 'b', 'a'], [1, 1, 2], (3, 2), [2, 1, 0])
    >>> engine.process(["a"], [2], [9.0]).duplicates
    1
    """

    def __init__(
        self,
        model: RecurrentForecaster,
        version: str = "init",
        device: torch.device | str = "cpu",
        window: int = 256,
        capacity: int = 1024,
        max_series: int = 1_000_000,
        ttl_seconds: float = 7 * 24 * 3600.0,
        scaling: Scaling | None = Scaling(),  # noqa: B008 - immutable
        clock: Callable[[], float] = time.time,
        on_evict: Callable[[str, bytes], None] | None = None,
        host_views: bool | None = None,
        intervals: Intervals | None = Intervals(),  # noqa: B008 - immutable
        choice: Choice | None = None,
        period_ms: int | None = None,
        max_gap_periods: int = DEFAULT_MAX_GAP,
    ) -> None:
        if period_ms is not None and period_ms < 0 or max_gap_periods < 0:
            raise ValueError("period_ms and max_gap_periods must be >= 0")
        self.device = torch.device(device)
        self.intervals = intervals
        self.scaling = scaling if scaling is not None else Scaling(kind="none")
        self.clock = clock
        self.ttl_seconds = ttl_seconds
        self.model = model.to(self.device).eval()
        self.version = version
        self.table = StateTable(
            model.num_layers,
            model.hidden_size,
            model.horizon,
            window=window,
            lstm=model.is_lstm,
            device=self.device,
            capacity=capacity,
            max_series=max_series,
            on_evict=on_evict,
            version=version,
            host_views=host_views,
            intervals=intervals,
            choice=choice,
            season=model.season,
            period=model.period_ms if period_ms is None else period_ms,
        )
        self.table.learn = period_ms is None  # a period given is every series' grid: nothing to learn
        # None: the model's period (``model.period_ms``), which a series whose first spacings say otherwise
        # replaces by its own (where the model has none, every series learns its own: ``observe_ts``); 0:
        # value by value (no grid); P > 0: every series on that grid.
        self.period_ms = period_ms
        self.max_gap_periods = max_gap_periods
        self.imputed_total = 0  # missing periods stepped through
        self.restarts_total = 0  # gaps stepped through only to the season's phase
        self.duplicates_total = 0
        self.values_total = 0
        self.clipped_total = 0  # values stepped as ``Scaling.winsorize`` moved them
        self._clipped: Any = 0  # of the current call (a tensor on a GPU until the call ends)
        self._cpu = self.table.host_views  # numpy on the host; False: torch tensors on the device
        self._errors: dict[str, ErrorAccumulator] = {}
        self._coverage: dict[str, CoverageAccumulator] = {}
        self.calibrator = None if intervals is None else Calibrator(intervals, self.table, self.scaling)
        self.choice = choice
        self.chooser = None if choice is None else Chooser(choice, self.table)
        self.asks: deque[Any] = deque()  # reads from other threads (forecaster.engine.view.ask_series)

    @classmethod
    def from_settings(cls, model: RecurrentForecaster, settings: Any, **kwargs: Any) -> Engine:
        """Build from ``Settings`` (state and scaling sections); ``kwargs`` override (version, clock...)."""
        options = dict(
            device=resolve_device(settings.state.device),
            window=settings.state.window,
            capacity=settings.state.initial_capacity,
            max_series=settings.state.max_series,
            ttl_seconds=settings.state.ttl_seconds,
            scaling=Scaling.from_settings(settings.scaling),
            intervals=Intervals.from_settings(settings.intervals),
            choice=Choice.from_settings(settings.choice),
            period_ms=resolve_period(settings.state.period, None),  # "auto": None, the model's
            max_gap_periods=settings.state.max_gap_periods,
        )
        options.update(kwargs)
        return cls(model, **options)

    # ---- the hot path --------------------------------------------------------------------------------

    def process(self, series: Sequence[str], ts: Sequence[int], values: Sequence[float]) -> EngineOutput:
        """Step every new value once, in ts order per series; returns the forecast made after each."""
        if self.asks:  # a reader on another thread waits for a batch boundary: this is one
            answer_asks(self)
        series = series if isinstance(series, list | tuple) else list(series)  # positional indexing below
        ts = np.asarray(ts, dtype=np.int64).reshape(-1)
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if not len(series) == len(ts) == len(values):
            raise ValueError(
                f"series, ts and values differ in length: {len(series)}, {len(ts)}, {len(values)}"
            )
        if len(values) and not np.abs(values).max() <= MAX_ABS_VALUE:  # NaN and inf fail it too
            raise ValueError(
                f"values must be finite and within ±{MAX_ABS_VALUE:g}: beyond it a series' scale overflows"
                " float32 (validate records before the engine)"
            )
        if self.scaling.positive and not (values > 0.0).all():
            raise ValueError(
                f"values must be > 0 with {self.scaling.kind} scaling (validate records before the engine)"
            )
        if len(ts) == 0:
            return self._output([], ts, [], 0, ts)
        # Step 1. the slot of every row (new series get one, possibly evicting LRU ones).
        row_slots = self.table.locate(series, self.clock())
        # Step 2. which values are new, the missing periods before each, and in which round each steps.
        plan = self._plan(row_slots, ts)
        rows, bounds = plan.rows, plan.bounds
        duplicates = len(ts) - len(rows)
        # Step 3. one batched step per round (missing periods first, each in a round of its own).
        forecasts, self._clipped = [], 0
        with torch.inference_mode():
            if plan.step_rows is None:
                slots = row_slots[rows]
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                    forecasts.append(self._step(slots[lo:hi], values[rows[lo:hi]]))
            else:
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                    step_rows, step_slots = plan.step_rows[lo:hi], plan.step_slots[lo:hi]
                    real = step_rows >= 0
                    if not real.all():
                        self._step(step_slots[~real], None)
                    if real.any():
                        forecasts.append(self._step(step_slots[real], values[step_rows[real]]))
        self.table.mark_dirty(row_slots[rows])
        self.duplicates_total += duplicates
        self.values_total += len(rows)
        self.imputed_total += plan.imputed
        self.restarts_total += plan.restarts
        out_names = [series[i] for i in rows.tolist()]
        out = self._output(out_names, ts[rows], forecasts, duplicates, rows)
        out.step_ms = plan.step_ms[rows]
        out.imputed, out.restarts = plan.imputed, plan.restarts
        out.clipped, self._clipped = int(self._clipped), 0
        self.clipped_total += out.clipped
        return out

    def _plan(self, row_slots: np.ndarray, ts: np.ndarray) -> Plan:
        """Rows to step, in stepped order (round by round), the round bounds, and the missing periods.

        A value is dropped when its ts is not newer than its series' newest one (or an earlier value of
        the same series in this batch), or for a series with a period when it falls in the same period
        (``forecaster.timegrid.grid_steps``: of two, the first given wins). Round k holds the k-th step of
        every series, a missing period's step included; sets each series' newest ts.
        """
        tb = self.table
        last_ts, period = tb.last_ts, tb.period
        sorted_slots = row_slots if len(row_slots) == 1 else np.sort(row_slots)
        if not (sorted_slots[1:] == sorted_slots[:-1]).any():  # one value per series: input order
            c, t, order = row_slots, ts, None
            before = last_ts[c]
            # The common case first: each value the next period of its series (or, without a period, newer).
            per, dt = period[c], t - before
            if (
                ((2 * np.abs(dt - per) < per) | ((per == 0) & (dt > 0))).all() and before.min() != NO_TS
            ) and not (self.period_ms is None and tb.learning[c].any()):
                last_ts[c] = t
                return Plan(np.arange(len(t)), [0, len(t)], step_ms=per)
        else:
            order = np.lexsort((ts, row_slots))  # by series, then ts; stable
            c, t = row_slots[order], ts[order]
            first = np.empty(len(c), dtype=bool)
            first[0] = True
            np.not_equal(c[1:], c[:-1], out=first[1:])
            before = last_ts[c]
            before[~first] = np.maximum(before[~first], t[np.flatnonzero(~first) - 1])
        fresh = before == NO_TS
        per = period[c]
        step_ms = per
        if fresh.any():
            per = np.where(fresh, 0, per)  # a first value has no predecessor: it steps as it is
            before = np.where(fresh, t - 1, before)
        steps, missing, restart = grid_steps(t - before, per, self.max_gap_periods, self.model.season)
        if order is None:
            last_ts[c] = np.maximum(last_ts[c], t)  # the newest ts seen, a same-period value's too
        else:
            np.maximum.at(last_ts, c, t)
        if self.period_ms is None and tb.learning[c].any():
            step_ms = step_ms.copy()
            learning = np.flatnonzero(tb.learning[c])
            self._learn(learning, c, t, t - before, (steps, missing, restart, step_ms))
        keep = np.flatnonzero(steps)
        rows = keep if order is None else order[keep]
        by_row = np.zeros(len(ts), np.int64)
        by_row[rows] = step_ms[keep]
        c, missing = c[keep], missing[keep]
        gaps = int(missing.sum())
        if order is None and gaps == 0:
            return Plan(rows, [0, len(rows)], step_ms=by_row)
        # The step of each kept value: after its series' earlier values and the missing periods before it.
        m = len(rows)
        if m == 0:
            return Plan(rows, [0], step_ms=by_row)
        width = missing + 1  # rounds each value takes
        starts = np.flatnonzero(np.concatenate(([True], c[1:] != c[:-1])))  # first row of each series
        ends = np.append(starts[1:], m)
        done = np.cumsum(width)
        offset = np.repeat(done[starts] - width[starts], ends - starts)  # rounds before the series' first
        rank = done - 1 - offset  # the round of each value
        if gaps == 0:
            rows = rows[np.argsort(rank, kind="stable")]
            return Plan(rows, np.concatenate(([0], np.cumsum(np.bincount(rank)))).tolist(), step_ms=by_row)
        # Missing periods: value i has missing[i] of them in the rounds rank[i] - missing[i] .. rank[i] - 1.
        holes = np.flatnonzero(missing)
        hole_of = np.repeat(holes, missing[holes])
        first_hole = np.repeat(np.cumsum(missing[holes]) - missing[holes], missing[holes])
        hole_rank = rank[hole_of] - missing[hole_of] + np.arange(gaps) - first_hole
        all_rank = np.concatenate((rank, hole_rank))
        all_rows = np.concatenate((rows, np.full(gaps, -1, dtype=np.int64)))
        all_slots = np.concatenate((c, c[hole_of]))
        by_round = np.argsort(all_rank, kind="stable")
        bounds = np.concatenate(([0], np.cumsum(np.bincount(all_rank)))).tolist()
        step_rows = all_rows[by_round]
        return Plan(
            step_rows[step_rows >= 0],
            bounds,
            step_rows,
            all_slots[by_round],
            gaps,
            int(restart[keep].sum()),
            by_row,
        )

    def _learn(
        self,
        at: np.ndarray,
        c: np.ndarray,
        t: np.ndarray,
        dt: np.ndarray,
        out: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    ) -> None:
        """The values ``at`` (positions in ``c``/``t``, series by series in ts order) of series still
        learning their period, as they would come one by one: each newer value is one more of the series'
        first timestamps (``StateTable.times``); the one that fills them settles its period
        (``StateTable.settle_period``), and its series' later values in this batch step on that grid. While
        it learns, a series steps on the checkpoint's period (or value by value without one) and fills no
        gap longer than ``MAX_LEARNING_GAP`` (a long gap may say that it is spaced otherwise). Rewrites
        ``out``: ``steps``, ``missing``, ``restart``, ``step_ms``."""
        tb = self.table
        steps, missing, restart, step_ms = out
        slots = c[at]
        newer = dt[at] > 0
        first = np.ones(len(at), dtype=bool)
        np.not_equal(slots[1:], slots[:-1], out=first[1:])  # a series' rows are together, in ts order
        before = np.cumsum(newer) - newer  # newer rows before each row, over all series
        rank = before - np.repeat(before[first], np.diff(np.append(np.flatnonzero(first), len(at))))
        free = (tb.times[slots] == NO_TS).sum(1)  # (n,) first timestamps each series still needs
        seen = newer & (rank < free)
        tb.times[slots[seen], tb.times.shape[1] - free[seen] + rank[seen]] = t[at[seen]]
        for slot in slots[seen & (rank == free - 1)].tolist():  # once in a series' life
            tb.settle_period(slot)
        after = rank >= free  # stepped after its series settled, within this batch
        while_learning = at[~after]
        capped = restart[while_learning] | (missing[while_learning] > MAX_LEARNING_GAP)
        missing[while_learning[capped]] = 0
        restart[while_learning[capped]] = False
        settled = at[after]
        if len(settled):
            period = tb.period[c[settled]]
            steps[settled], missing[settled], restart[settled] = grid_steps(
                dt[settled], period, self.max_gap_periods, self.model.season
            )
            step_ms[settled] = period

    def _step(self, slots: np.ndarray, v: np.ndarray | None) -> tuple[Any, ...]:
        """Score, scale, step and store one value for each of ``slots`` (distinct); returns forecasts (and
        their lower and upper bounds with intervals on). ``v`` None: a missing period of each, stepped
        with its imputed value (``forecaster.timegrid.impute``) and scored by nothing."""
        tb, scaling = self.table, self.scaling
        count = tb.count[slots]  # (n,)
        imputed = v is None
        if imputed:  # from the values before it in the ring, as to_grid fills (forecaster.timegrid.impute)
            season = self.model.season
            back = np.arange(min(impute_reach(season), tb.window_size), 0, -1)  # (L,) oldest first
            at = (count[:, None] - back) % tb.window_size + (slots * tb.window_size)[:, None]  # (n, L)
            before_first = count[:, None] < back
            if self._cpu:
                recent = np.where(before_first, np.nan, tb.values_flat[at].astype(np.float64))
            else:
                recent = tb.values_flat[torch.from_numpy(at).to(self.device)].double()
                recent = recent.masked_fill(torch.from_numpy(before_first).to(self.device), float("nan"))
            v = impute(recent, season, scaling.positive)
        if self._cpu:
            idx, idx_t = slots, torch.from_numpy(slots)
        else:
            idx = idx_t = torch.from_numpy(slots).to(self.device, non_blocking=True)
            if not imputed:
                v = torch.from_numpy(v).to(self.device, non_blocking=True)
        before = tb.stats_a[idx]  # (n, N_STATS)
        calibrated = scored = None
        if not imputed:
            # Step 1. score the value against the one-step-ahead forecast made at the previous step.
            has = count > 0  # (n,) a previous forecast exists
            err = v - tb.forecast_a[idx, 0]  # (n,) float64
            n_scored = int(has.sum())
            if n_scored < len(slots):
                err = err * (has if self._cpu else torch.from_numpy(has).to(self.device))
            acc = self._errors.get(self.version) or self._accumulator(err)
            acc.count += n_scored
            acc.sums[0] += abs(err).sum()
            acc.sums[1] += err @ err
            # Step 1b. a value far out of its series' range steps as the statistics fold it in (a glitch
            # of 1e29 counts in the error above, but not in the state).
            v, moved = scaling.winsorize(before, v)
            if moved is not None:
                self._clipped += int(moved.sum()) if self._cpu else moved.sum()
            if self.intervals is not None:  # Step 1c. score the forecasts of 1..H steps earlier, calibrate
                calibrated = self.calibrator.score(slots, idx, count, v, self._coverage_accumulator)
            if self.chooser is not None:  # Step 1d. score every candidate's forecasts
                scored = self.chooser.score(slots, idx, count, v)
        elif not self._cpu:  # nothing scored: the calibrator and the choice as they stand
            if self.intervals is not None:
                calibrated = tb.mean_err_a[idx], tb.mult_a[idx]
            if self.chooser is not None:
                scored = tb.choice_n_a[idx], tb.choice_err_a[idx], tb.choice_sq_a[idx]
        # Step 2. scale, and keep the model input and the value in the ring buffers.
        stats = scaling.update(before, v)  # (n, N_STATS)
        scale = scaling.scale(stats)  # (n,)
        x = scaling.normalize(stats, v, scale)  # (n,) float32
        at = slots * tb.window_size + count % tb.window_size  # (n,) flat ring positions
        at = at if self._cpu else torch.from_numpy(at).to(self.device)
        tb.ring_flat[at] = x
        tb.values_flat[at] = v if self._cpu else v.float()
        if tb.gaps is not None:
            tb.gaps[slots, count % tb.window_size] = imputed
        # Step 3. one recurrent step for every series of the round (with the values before this one, for a
        # model that forecasts over a seasonal baseline).
        past = self._past(slots, count, stats) if self.model.context else None
        y, h = self.model.step((torch.from_numpy(x) if self._cpu else x)[:, None], tb.gather(idx_t), past)
        tb.scatter(idx_t, h)
        # Step 4. forecasts back in data units (the model's, or per step the naive one its series picked);
        # remember them for the next score.
        f = scaling.denormalize(stats, y.numpy() if self._cpu else y, scale)  # (n, horizon) float64
        f = f.astype(np.float32) if self._cpu else f.float()
        if self.chooser is not None:
            f = self.chooser.pick(slots, count, f, scored)
        tb.forecast_a[idx] = f
        tb.stats_a[idx] = stats
        tb.count[slots] = count + 1
        if self.intervals is None:
            return (f,)
        # Step 5. bounds around the new forecasts (their centres and scales kept for the next scores).
        lo, hi = self.calibrator.bounds(slots, count, f, stats, scale, calibrated)
        return f, lo, hi

    def _past(self, slots: np.ndarray, count: np.ndarray, stats: Any) -> torch.Tensor:
        """The ``model.context`` values each series stepped before its current one, from the ring buffer of
        values, in the units of its current input (``stats``: its statistics now); NaN before its first
        value, and for values the window no longer retains (a window shorter than the baseline's reach:
        the trainer never picks one, the service refuses such a checkpoint). (n, context) float32."""
        tb, context, w = self.table, self.model.context, self.table.window_size
        ordinal = count[:, None] - context + np.arange(context)  # (n, context) ordinals of those values
        at = slots[:, None] * w + ordinal % w  # (n, context) flat ring positions
        gone = (ordinal < 0) | (ordinal <= count[:, None] - w)  # (n, context) not (or no longer) in the ring
        if self._cpu:
            past = np.where(gone, np.nan, tb.values_flat[at].astype(np.float64))  # (n, context) data units
            return torch.from_numpy(self.scaling.rescale(stats, past))  # NaN stays NaN
        past = self.scaling.rescale(stats, tb.values_flat[torch.from_numpy(at).to(self.device)].double())
        return past.masked_fill(torch.from_numpy(gone).to(self.device), float("nan"))

    def _accumulator(self, like: Any) -> ErrorAccumulator:
        acc = self._errors.get(self.version)
        if acc is None:
            acc = self._errors[self.version] = ErrorAccumulator(like)
        return acc

    def _coverage_accumulator(self, like: Any) -> CoverageAccumulator:
        """The coverage sums of the serving version (made like ``like`` on first use)."""
        acc = self._coverage.get(self.version)
        if acc is None:
            horizon, steps = self.model.horizon, self.intervals.score_steps(self.model.horizon)
            levels = len(self.intervals.levels)
            acc = self._coverage[self.version] = CoverageAccumulator(like, levels, horizon, steps)
        return acc

    def _concat(self, parts: list[Any], shape: tuple[int, ...]) -> np.ndarray:
        if not parts:
            return np.zeros((0, *shape), dtype=np.float32)
        if self._cpu:
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        return torch.cat(parts).cpu().numpy()

    def _output(
        self, names: list[str], ts: np.ndarray, rounds: list[tuple[Any, ...]], dup: int, rows: np.ndarray
    ) -> EngineOutput:
        """``rounds``: (forecasts, [lower, upper]) of each round."""
        horizon = self.model.horizon
        f = self._concat([r[0] for r in rounds], (horizon,))
        out = EngineOutput(names, ts, f, self.version, dup, rows.astype(np.int64, copy=False))
        if self.intervals is not None:
            shape = (len(self.intervals.levels), horizon)
            out.lower = self._concat([r[1] for r in rounds], shape)
            out.upper = self._concat([r[2] for r in rounds], shape)
        return out

    # ---- errors, state, models -----------------------------------------------------------------------

    @property
    def errors(self) -> dict[str, ErrorStats]:
        """Cumulative online one-step-ahead error per model version."""
        return {version: acc.stats() for version, acc in self._errors.items()}

    @property
    def coverage(self) -> dict[str, CoverageStats]:
        """Cumulative online coverage of the intervals per model version (empty without intervals)."""
        labels = self.intervals.labels if self.intervals is not None else []
        return {version: acc.stats(labels) for version, acc in self._coverage.items()}

    def choice_sources(self) -> dict[tuple[int, str], int]:
        """Resident series per (step, source of their forecast) at step 1 and the last step; empty
        without the per-series choice."""
        return self.chooser.sources() if self.chooser is not None else {}

    def period_counts(self) -> dict[str, int]:
        """Resident series with a period, still learning it, and without one (``{"period", "learning",
        "none"}``)."""
        tb = self.table
        slots = tb.occupied()
        learning = tb.learning[slots]
        with_period = int((tb.period[slots] > 0).sum())
        return {
            "period": with_period,
            "learning": int((learning & (tb.period[slots] == 0)).sum()),
            "none": int((~learning & (tb.period[slots] == 0)).sum()),
        }

    @property
    def resident(self) -> int:
        return self.table.resident

    @property
    def evictions_total(self) -> int:
        return self.table.evictions_total

    @property
    def state_bytes(self) -> int:
        return self.table.state_bytes

    def evict_idle(self, now: float | None = None) -> list[str]:
        """Evict series idle longer than ``ttl_seconds`` (snapshots go to ``on_evict``)."""
        return self.table.evict_idle(self.clock() if now is None else now, self.ttl_seconds)

    def take_dirty(self) -> set[str]:
        return self.table.take_dirty()

    def snapshot(self, series: str) -> bytes:
        return self.table.snapshot(series)

    def restore(self, series: str, data: bytes) -> None:
        """Load a series' snapshot; a state made by another model version is re-warmed with this one."""
        version = self.table.restore(series, data, self.clock())
        if version != self.version:
            self._rewarm_slots(np.array([self.table.slots[series]], dtype=np.int64))

    def snapshot_many(self, series: Sequence[str]) -> list[bytes]:
        """Snapshots of many resident series in one gather (the changelog writes these at every commit)."""
        return snap.take_many(self.table, series)

    def restore_many(
        self, items: Sequence[tuple[str, bytes]], keep: Iterable[str] = ()
    ) -> list[tuple[str, Any]]:
        """Load many snapshots (distinct series) at once, never evicting a series of ``keep`` to make room
        (the batch about to step); those made by another model version are re-warmed with this one in
        batched calls. Returns the refused ones as (series, StateError)."""
        names, versions, refused = snap.put_many(self.table, items, self.clock(), keep)
        stale = [self.table.slots[n] for n, v in zip(names, versions, strict=True) if v != self.version]
        if stale:
            self._rewarm_slots(np.array(stale, dtype=np.int64))
        return refused

    def drop(self, series: Sequence[str]) -> list[str]:
        """Forget these series without an eviction (their state is kept elsewhere)."""
        return self.table.drop(series)

    def set_model(self, model: RecurrentForecaster, version: str) -> None:
        """Use ``model`` from the next value on, keeping the states as they are (same shape only)."""
        shape = (model.num_layers, model.hidden_size, model.horizon, model.is_lstm)
        tb = self.table
        if shape != (tb.num_layers, tb.hidden_size, tb.horizon, tb.lstm):
            raise ValueError(f"model shape {shape} does not fit the state table; use rewarm()")
        if model.season != tb.season:  # another seasonal naive candidate: the choice starts over
            tb.fit_model(model)
            occupied = tb.occupied()
            tb.reset_choice(occupied[tb.count[occupied] > 0])
        self.model, self.version, tb.version = model.to(self.device).eval(), version, version
        self._follow_period(model)

    def _follow_period(self, model: RecurrentForecaster) -> None:
        """New series start with the period of the model now serving (unless one was set): those resident
        keep theirs."""
        if self.period_ms is None:
            self.table.default_period = model.period_ms

    def rewarm(self, model: RecurrentForecaster, version: str) -> None:
        """Switch to ``model``: every resident series restarts from the zero state and runs the new model
        over its retained window; last forecasts are recomputed. A different shape is fine."""
        model = model.to(self.device).eval()
        self.table.fit_model(model)
        self.model, self.version, self.table.version = model, version, version
        self._follow_period(model)
        self._rewarm_slots(self.table.occupied())

    def rewarm_series(self, slots: np.ndarray) -> None:
        """Re-warm these resident slots with the current model over their retained windows (their state
        and last forecast recomputed, as a swap does)."""
        self._rewarm_slots(np.asarray(slots, dtype=np.int64))

    def _rewarm_slots(self, slots: np.ndarray) -> None:
        tb = self.table
        slots = slots[tb.count[slots] > 0]
        with torch.inference_mode():
            rows = rows_per_call(tb.window_size, self.device)  # bounds the (rows, W) intermediates
            for lo in range(0, len(slots), rows):
                chunk = slots[lo : lo + rows]
                x, lengths = tb.window(chunk)  # (n, W, 1), (n,)
                recent = tb.recent(chunk, self.scaling) if self.model.context else None  # (n, W)
                y, h = self.model.warm(x, lengths, recent)  # (n, horizon)
                stats = tb.stats.index_select(0, torch.from_numpy(chunk).to(self.device))  # (n, N_STATS)
                tb.write_states(chunk, h, self.scaling.denormalize(stats, y))
                tb.reset_choice(chunk)  # a new model: its own errors from now on
                recalibrate(tb, self.model, self.scaling, chunk)  # the calibrator over the window too


def reference_forecast(
    model: RecurrentForecaster,
    values: Any,
    scaling: Scaling | None = Scaling(),  # noqa: B008 - immutable
    choice: Choice | None = None,
    window: int = 256,
    missing: np.ndarray | None = None,
) -> np.ndarray:
    """The plain full-sequence path for one series: scale, one ``model(x)`` over all T values (with the
    baseline of each in its units), back to data units with the statistics at each t. Returns (T, horizon)
    float64. With ``choice``, what an engine of that choice and ``window`` emits: the per-series choice
    over those forecasts (``reference_choice``), float32. ``missing`` (T,) bool: ``values`` lie on the
    series' time grid (``forecaster.timegrid.to_grid``) and these periods were missing, stepped as the
    engine steps them (without ``choice``, which scores only the values that came)."""
    if missing is not None and choice is not None:
        raise ValueError("reference_forecast: missing periods with the per-series choice are not modelled")
    if choice is not None:
        made = reference_forecast(model, values, scaling).astype(np.float32)
        return reference_choice(made, values, choice, model.season, window)
    scaling = scaling if scaling is not None else Scaling(kind="none")
    raw = np.array(values, dtype=np.float64)
    x, stats, v = scaling.transform_values(raw, missing, model.season)  # (T,), (T, N_STATS), (T,)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            base = model.scaled_baseline(v[None], stats[None], scaling, 0, len(v))  # (1, T, H)
            y, _ = model(
                x.to(device)[None, :, None], base=None if base is None else base.to(device)
            )  # (1, T, H)
    finally:
        model.train(was_training)
    return scaling.denormalize(stats, y[0].cpu()).numpy()
