"""The state table: series id -> slot, and everything the engine keeps per slot.

On the device (torch): hidden state ``h`` (layers, capacity, hidden) and, for an LSTM, ``c``; the last
forecast (capacity, horizon) float32 in data units; scaling statistics (capacity, N_STATS) float64; ring
buffers of the last W model inputs (``ring``, what a re-warm replays) and of the same W values in data
units (``values``, what a model's baseline reads), (capacity, W) float32 each. On the host (numpy): last event ts (int64
epoch ms), count of values ever stepped, last-seen wall time, a dirty flag. With prediction intervals
(``intervals``, see ``forecaster.engine.intervals``) also the calibrator's state: the centres of the last
H forecasts ``past`` (capacity, H, H), their scales ``past_scale`` (capacity, H) and the normalised
half-widths of their bounds ``past_half`` (capacity, H, L, H), the mean absolute k-step error
``mean_err`` (capacity, H) and the coverage multipliers ``mult`` (capacity, L, H), float32
on the device, and on the host the ordinal of the first forecast to score ``score_from``. With the
per-series choice (``choice``, see ``forecaster.engine.choice``) also the model's last H forecasts
``model_past`` (capacity, H, H), the mean k-step errors of each candidate ``choice_err`` (capacity, C, H),
the mean squared differences of the model's and each naive one's ``choice_sq`` (capacity, C - 1, H) and
their counts ``choice_n`` (capacity, H), float32 on the device, and on the host the ordinal of the
first model forecast to score ``choose_from``. Capacity doubles when full
(amortised growth); freed slots are reused. Idle series are evicted after ``ttl_seconds`` and the least
recently seen one when a new series would pass ``max_series``; an optional ``on_evict(series, snapshot)``
receives each evicted series' snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Any

import numpy as np
import torch

from forecaster.engine import snapshot as snap
from forecaster.engine.choice import Choice, naive_reach
from forecaster.engine.intervals import WARMUP, Intervals, centers, units
from forecaster.scaling import Scaling
from forecaster.timegrid import LEARN_SPACINGS, TOLERANCE, estimate_period

NO_TS = np.iinfo(np.int64).min  # last ts of a slot that has seen nothing
MAX_PERIOD_LOGS = 20  # series whose own period (or its lack) is logged; the rest show it in /series/<id>
log = logging.getLogger(__name__)


def _grow_rows(a: np.ndarray | None, capacity: int, width: int, fill: Any, dtype: Any) -> np.ndarray:
    """A (capacity, width) host array filled with ``fill``, keeping the rows of ``a``."""
    new = np.full((capacity, width), fill, dtype=dtype)
    if a is not None:
        keep = min(len(a), capacity)
        new[:keep] = a[:keep]
    return new


def _inference(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a method under inference mode, so the table's tensors are all inference tensors."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return fn(*args, **kwargs)

    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


class StateTable:
    """Per-series state, one slot per resident series.

    >>> table = StateTable(num_layers=2, hidden_size=8, horizon=3, window=4, capacity=2)
    >>> slots, new = table.acquire(["a", "b", "c"], now=0.0)
    >>> slots.tolist(), new.tolist(), table.capacity, table.resident
    ([0, 1, 2], [True, True, True], 4, 3)
    >>> table.evict_idle(now=10.0, ttl_seconds=5.0), table.resident
    (['a', 'b', 'c'], 0)
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        horizon: int,
        window: int = 256,
        lstm: bool = False,
        device: torch.device | str = "cpu",
        capacity: int = 1024,
        max_series: int = 1_000_000,
        on_evict: Callable[[str, bytes], None] | None = None,
        version: str = "init",
        host_views: bool | None = None,
        intervals: Intervals | None = None,
        choice: Choice | None = None,
        season: int = 1,
        period: int | None = 0,
    ) -> None:
        if min(num_layers, hidden_size, horizon, window, capacity, max_series) < 1:
            raise ValueError("num_layers, hidden_size, horizon, window, capacity and max_series must be >= 1")
        self.num_layers, self.hidden_size, self.horizon, self.window_size = (
            num_layers,
            hidden_size,
            horizon,
            window,
        )
        self.lstm = lstm
        self.intervals = intervals
        self.levels = len(intervals.levels) if intervals is not None else 0
        self.choice = choice
        self.season = season  # of the model's baseline: the seasonal naive candidate's
        # The period new series start with (ms; 0: none yet), and whether their first spacings are
        # watched (``observe_ts``): None learns every series' period, 0 steps value by value (no grid).
        self.default_period = period or 0
        self.learn = period != 0
        self.irregular_logged = 0
        self.candidates = naive_reach(season, horizon, window) if choice is not None else 0
        self.device = torch.device(device)
        # Index per-slot arrays through numpy views (CPU only; cheaper per call than torch indexing).
        # False runs the torch path a GPU table takes, which tests use to cover it on a CPU.
        self.host_views = self.device.type == "cpu" if host_views is None else host_views
        if self.host_views and self.device.type != "cpu":
            raise ValueError("host_views needs a CPU table")
        self.max_series = max_series
        self.on_evict = on_evict
        self.version = version  # model version that made the states (written into snapshots)
        self.evictions_total = 0
        self.slots: dict[str, int] = {}
        self._series: list[str | None] = []
        self._free: list[int] = []
        self._last_fresh = np.zeros(0, dtype=np.int64)  # slots the last locate() handed to new series
        self.capacity = 0
        self._allocate(capacity)

    # ---- storage -------------------------------------------------------------------------------------

    @_inference
    def _allocate(self, capacity: int) -> None:
        """(Re)allocate every array at ``capacity`` slots, keeping the first ``self.capacity`` rows."""
        old, keep = self.capacity, min(self.capacity, capacity)
        dev = self.device

        def grow(
            t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, dim: int = 0
        ) -> torch.Tensor:
            new = torch.zeros(shape, dtype=dtype, device=dev)
            if t is not None and keep:
                new.narrow(dim, 0, keep).copy_(t.narrow(dim, 0, keep))
            return new

        def grow_np(a: np.ndarray | None, fill: Any, dtype: Any) -> np.ndarray:
            new = np.full(capacity, fill, dtype=dtype)
            if a is not None and keep:
                new[:keep] = a[:keep]
            return new

        first = old == 0
        layers, hidden = self.num_layers, self.hidden_size
        self.h = grow(None if first else self.h, (layers, capacity, hidden), torch.float32, 1)
        prev_c = None if first else self.c
        self.c = grow(prev_c, (layers, capacity, hidden), torch.float32, 1) if self.lstm else None
        self.forecast = grow(None if first else self.forecast, (capacity, self.horizon), torch.float32)
        self.stats = grow(None if first else self.stats, (capacity, Scaling.N_STATS), torch.float64)
        self.ring = grow(None if first else self.ring, (capacity, self.window_size), torch.float32)
        self.values = grow(None if first else self.values, (capacity, self.window_size), torch.float32)
        if self.levels:
            h, lv = self.horizon, self.levels
            self.past = grow(None if first else self.past, (capacity, h, h), torch.float32)
            self.past_scale = grow(None if first else self.past_scale, (capacity, h), torch.float32)
            self.past_half = grow(None if first else self.past_half, (capacity, h, lv, h), torch.float32)
            self.mean_err = grow(None if first else self.mean_err, (capacity, h), torch.float32)
            self.mult = grow(None if first else self.mult, (capacity, lv, h), torch.float32)
            self.score_from = grow_np(None if first else self.score_from, 0, np.int64)
        if self.candidates:
            h, c = self.horizon, self.candidates
            self.model_past = grow(None if first else self.model_past, (capacity, h, h), torch.float32)
            self.choice_err = grow(None if first else self.choice_err, (capacity, c, h), torch.float32)
            self.choice_sq = grow(None if first else self.choice_sq, (capacity, c - 1, h), torch.float32)
            self.choice_n = grow(None if first else self.choice_n, (capacity, h), torch.float32)
            self.choose_from = grow_np(None if first else self.choose_from, 0, np.int64)
        self.last_ts = grow_np(None if first else self.last_ts, NO_TS, np.int64)
        self.period = grow_np(None if first else self.period, 0, np.int64)
        self.learning = grow_np(None if first else self.learning, False, bool)
        self.times = _grow_rows(None if first else self.times, capacity, LEARN_SPACINGS + 1, NO_TS, np.int64)
        self.gaps = _grow_rows(None if first else self.gaps, capacity, self.window_size, False, bool)
        self.count = grow_np(None if first else self.count, 0, np.int64)
        self.last_seen = grow_np(None if first else self.last_seen, np.inf, np.float64)  # inf: free
        self.dirty = grow_np(None if first else self.dirty, False, bool)
        self._series.extend([None] * (capacity - old))
        self._free[:0] = range(capacity - 1, old - 1, -1)  # new slots go under the free ones; low first
        self.capacity = capacity
        self._views()

    def _views(self) -> None:
        # Arrays the engine indexes per step: numpy views on CPU (cheap fancy indexing), tensors elsewhere.
        cpu = self.host_views
        self.forecast_a = self.forecast.numpy() if cpu else self.forecast
        self.stats_a = self.stats.numpy() if cpu else self.stats
        self.ring_flat = self.ring.view(-1).numpy() if cpu else self.ring.view(-1)  # [slot * W + pos]
        self.values_flat = self.values.view(-1).numpy() if cpu else self.values.view(-1)  # same positions
        # numpy fancy indexing beats index_select / index_copy_ on CPU
        self._h_a = self.h.numpy() if cpu else None
        self._c_a = self.c.numpy() if cpu and self.c is not None else None
        if self.levels:
            self.past_flat = (
                self.past.view(-1).numpy() if cpu else self.past.view(-1)
            )  # [(slot*H + j)*H + k-1]
            self.past_scale_flat = self.past_scale.view(-1).numpy() if cpu else self.past_scale.view(-1)
            h = self.horizon
            self.past_rows = self.past.view(-1, h).numpy() if cpu else self.past.view(-1, h)  # [slot*H + j]
            half = self.past_half
            self.past_half_flat = half.view(-1).numpy() if cpu else half.view(-1)  # [((slot*H+j)*L+l)*H+k-1]
            lv = self.levels
            self.half_size = h * lv * h  # a slot's emitted half-widths
            self.past_half_rows = half.view(-1, lv, h).numpy() if cpu else half.view(-1, lv, h)  # [slot*H+j]
            self.mean_err_a = self.mean_err.numpy() if cpu else self.mean_err
            self.mult_a = self.mult.numpy() if cpu else self.mult
        if self.candidates:
            h = self.horizon
            self.model_past_flat = self.model_past.view(-1).numpy() if cpu else self.model_past.view(-1)
            self.model_past_rows = self.model_past.view(-1, h).numpy() if cpu else self.model_past.view(-1, h)
            self.choice_err_a = self.choice_err.numpy() if cpu else self.choice_err
            self.choice_sq_a = self.choice_sq.numpy() if cpu else self.choice_sq
            self.choice_n_a = self.choice_n.numpy() if cpu else self.choice_n

    @_inference
    def fit_model(self, model: Any) -> None:
        """Reshape the model-shaped arrays when ``model`` differs in layers, hidden size, horizon or cell,
        and the choice's when it differs in season (a swap resets the choice: ``reset_choice``)."""
        shape = (model.num_layers, model.hidden_size, model.horizon, model.is_lstm)
        if shape != (self.num_layers, self.hidden_size, self.horizon, self.lstm):
            self.reshape_model(*shape)
        self.season = model.season
        candidates = naive_reach(model.season, model.horizon, self.window_size) if self.choice else 0
        if candidates != self.candidates:
            self.candidates = candidates
            self._new_choice()

    def _new_choice(self) -> None:
        """The choice's arrays, empty, at the current capacity, horizon and candidates."""
        if self.candidates:
            h, c, dev = self.horizon, self.candidates, self.device
            self.model_past = torch.zeros(self.capacity, h, h, device=dev)
            self.choice_err = torch.zeros(self.capacity, c, h, device=dev)
            self.choice_sq = torch.zeros(self.capacity, c - 1, h, device=dev)
            self.choice_n = torch.zeros(self.capacity, h, device=dev)
            self.choose_from = np.zeros(self.capacity, dtype=np.int64)
        self._views()

    def reshape_model(self, num_layers: int, hidden_size: int, horizon: int, lstm: bool) -> None:
        """Fit the model-shaped arrays to a new model: states and forecasts start from zero."""
        self.num_layers, self.hidden_size, self.horizon, self.lstm = num_layers, hidden_size, horizon, lstm
        shape = (num_layers, self.capacity, hidden_size)
        self.h = torch.zeros(shape, device=self.device)
        self.c = torch.zeros(shape, device=self.device) if lstm else None
        self.forecast = torch.zeros(self.capacity, horizon, device=self.device)
        if self.levels:  # the calibrator starts over at the new horizon (reset_pending sets score_from)
            h, lv = horizon, self.levels
            self.past = torch.zeros(self.capacity, h, h, device=self.device)
            self.past_scale = torch.ones(self.capacity, h, device=self.device)
            self.past_half = torch.zeros(self.capacity, h, lv, h, device=self.device)
            self.mean_err = torch.ones(self.capacity, h, device=self.device)
            self.mult = torch.as_tensor(self.intervals.prior, dtype=torch.float32, device=self.device)
            self.mult = self.mult[:, None].expand(self.capacity, lv, h).contiguous()
        self._new_choice()  # the choice starts over too (reset_choice sets choose_from)

    @property
    def resident(self) -> int:
        return len(self.slots)

    @property
    def state_bytes(self) -> int:
        """Bytes held by the per-slot tensors and arrays (all capacity, used or not)."""
        tensors = [self.h, self.forecast, self.stats, self.ring, self.values] + (
            [self.c] if self.c is not None else []
        )
        arrays = [self.last_ts, self.count, self.last_seen, self.dirty, self.period, self.learning]
        arrays += [self.times, self.gaps]
        if self.levels:
            tensors += [self.past, self.past_scale, self.past_half, self.mean_err, self.mult]
            arrays.append(self.score_from)
        if self.candidates:
            tensors += [self.model_past, self.choice_err, self.choice_sq, self.choice_n]
            arrays.append(self.choose_from)
        return sum(t.numel() * t.element_size() for t in tensors) + sum(a.nbytes for a in arrays)

    # ---- slots ---------------------------------------------------------------------------------------

    def acquire(
        self, series: Sequence[str], now: float, keep: Iterable[str] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        """Slots of ``series`` (distinct ids), allocating new ones; marks them all seen at ``now``.

        Returns (slots int64, is_new bool). Making room evicts the least recently seen series not in
        ``series`` nor in ``keep``; if every resident series is in either the table goes past
        ``max_series``.
        """
        slots = self.locate(series, now, keep)
        return slots, np.isin(slots, self._last_fresh) if len(self._last_fresh) else np.zeros(
            len(slots), bool
        )

    @_inference
    def locate(self, series: Sequence[str], now: float, keep: Iterable[str] = ()) -> np.ndarray:
        """Slot of every row of ``series`` (ids may repeat), allocating slots for new ids (evicting the
        least recently seen series not in ``series`` nor in ``keep`` if needed); marks them all seen at
        ``now``."""
        slots = np.fromiter(map(self.slots.get, series, repeat(-1)), dtype=np.int64, count=len(series))
        unknown = np.flatnonzero(slots < 0)
        self._last_fresh = unknown[:0]
        if len(unknown):
            names = list(dict.fromkeys(series[i] for i in unknown.tolist()))  # distinct, in order
            fresh = self._allocate_series(names, protected=slots[slots >= 0], keep=keep)
            if len(names) == len(unknown):
                slots[unknown] = fresh
            else:
                where = dict(zip(names, fresh.tolist(), strict=True))
                slots[unknown] = [where[series[i]] for i in unknown.tolist()]
            self._last_fresh = fresh
        self.last_seen[slots] = now
        return slots

    def _allocate_series(
        self, names: list[str], protected: np.ndarray, keep: Iterable[str] = ()
    ) -> np.ndarray:
        """Clean slots for new ``names``, making room first (never evicting ``protected`` slots nor ``keep``
        series); returns them in the order of ``names``."""
        n_new = len(names)
        over = self.resident + n_new - self.max_series
        if over > 0:
            kept = [self.slots[name] for name in set(keep) if name in self.slots]
            if kept:
                protected = np.concatenate([protected, np.array(kept, dtype=np.int64)])
            self._evict_lru(over, protected=protected)
        if n_new > len(self._free):
            capacity = self.capacity
            while capacity - self.resident < n_new:
                capacity *= 2
            self._allocate(capacity)
        fresh = np.array(self._free[-n_new:][::-1], dtype=np.int64)
        del self._free[-n_new:]
        for name, slot in zip(names, fresh.tolist(), strict=True):
            self.slots[name] = slot
            self._series[slot] = name
        self._clear(fresh)
        return fresh

    def _clear(self, slots: np.ndarray) -> None:
        idx = torch.from_numpy(slots).to(self.device)
        for t in (self.h, self.c):
            if t is not None:
                t.index_fill_(1, idx, 0.0)
        for t in (self.forecast, self.stats, self.ring, self.values):
            t.index_fill_(0, idx, 0.0)
        if self.levels:
            self.past.index_fill_(0, idx, 0.0)
            self.past_scale.index_fill_(0, idx, 1.0)  # finite scores from rows not written yet
            self.past_half.index_fill_(0, idx, 0.0)
            self.mean_err.index_fill_(0, idx, 1.0)  # prior spread: one unit of the series' scale
            self.mult.index_copy_(0, idx, self._prior_mult(len(slots)))
            self.score_from[slots] = WARMUP - 1
        if self.candidates:
            for t in (self.model_past, self.choice_err, self.choice_sq, self.choice_n):
                t.index_fill_(0, idx, 0.0)
            self.choose_from[slots] = 0
        self.last_ts[slots] = NO_TS
        self.period[slots] = self.default_period
        self.learning[slots] = self.learn
        self.times[slots] = NO_TS
        self.gaps[slots] = False
        self.count[slots] = 0
        self.dirty[slots] = False

    def observe_ts(self, slot: int, ts: int) -> None:
        """Keep one more of a learning series' first timestamps; with ``LEARN_SPACINGS`` spacings its
        period is settled: the checkpoint's (``default_period``) when they agree with it, else their own
        (``estimate_period``), else none (value by value, logged once per series)."""
        row = self.times[slot]
        free = np.flatnonzero(row == NO_TS)
        row[free[0]] = ts
        if len(free) == 1:
            self.settle_period(slot)

    def settle_period(self, slot: int) -> None:
        """A learning series whose first timestamps are all in (``times``) gets its period."""
        row = self.times[slot]
        self.learning[slot] = False
        own, default = estimate_period(row), self.default_period
        if default and own and abs(own - default) <= TOLERANCE * default:
            return  # the checkpoint's period it is
        self.period[slot] = own
        if own == 0 or default:
            self._log_period(slot, own, default)

    def _log_period(self, slot: int, own: int, default: int) -> None:
        """Say once per series (the first ``MAX_PERIOD_LOGS`` of them) that it keeps a period of its own."""
        self.irregular_logged += 1
        if self.irregular_logged > MAX_PERIOD_LOGS:
            return
        name = self._series[slot]
        if own == 0:
            log.info(
                "series %r has no stable spacing: it steps value by value (a step is its next value)", name
            )
        else:
            log.info(
                "series %r is spaced %d ms apart, not %d ms as the checkpoint's: its period is %d ms",
                name,
                own,
                default,
                own,
            )
        if self.irregular_logged == MAX_PERIOD_LOGS:
            log.info("more series with a period of their own are not logged (see /series/<id>)")

    def _prior_mult(self, n: int) -> torch.Tensor:
        prior = torch.as_tensor(self.intervals.prior, dtype=torch.float32, device=self.device)  # (L,)
        return prior[:, None].expand(n, self.levels, self.horizon)  # (n, L, H)

    @_inference
    def reset_pending(self, slots: np.ndarray, scaling: Scaling) -> None:
        """After a re-warm of ``slots``: the forecasts still awaiting their values were made by the model
        before; score from the re-warmed last forecast on (the calibrator keeps its spreads, which are
        per step and in the units of the scaling, as a start for the new model)."""
        if not self.levels or not len(slots):
            return
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        count = self.count[slots]  # (n,) > 0
        row = torch.as_tensor((count - 1) % self.horizon, device=self.device)  # (n,) ring row of it
        center = centers(scaling, self.forecast.index_select(0, idx))  # (n, H)
        scale = units(scaling, self.stats.index_select(0, idx))  # (n,)
        self.past[idx, row] = center
        self.past_scale[idx, row] = scale
        half = self.mult.index_select(0, idx) * self.mean_err.index_select(0, idx)[:, None, :]  # (n, L, H)
        self.past_half[idx, row] = half
        self.score_from[slots] = count - 1

    @_inference
    def reset_choice(self, slots: np.ndarray) -> None:
        """After a re-warm of ``slots`` (each with a value): the model is new, so the choice starts over
        from its last forecast (no errors yet: the model's forecasts are emitted until ``min_errors``)."""
        if not self.candidates or not len(slots):
            return
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        count = self.count[slots]  # (n,) > 0
        row = torch.as_tensor((count - 1) % self.horizon, device=self.device)  # (n,) ring row of it
        self.model_past[idx, row] = self.forecast.index_select(0, idx)
        for t in (self.choice_err, self.choice_sq, self.choice_n):
            t.index_fill_(0, idx, 0.0)
        self.choose_from[slots] = count - 1

    def slot_of(self, series: str) -> int | None:
        return self.slots.get(series)

    def occupied(self) -> np.ndarray:
        """Slots of every resident series, ascending."""
        return np.flatnonzero(np.isfinite(self.last_seen))

    def series_at(self, slots: Iterable[int]) -> list[str]:
        return [self._series[s] for s in slots]  # type: ignore[misc]

    # ---- eviction ------------------------------------------------------------------------------------

    def evict(self, series: Iterable[str]) -> list[str]:
        """Drop these series (snapshots go to ``on_evict``); returns those that were resident."""
        gone = [s for s in series if s in self.slots]
        for name in gone:
            if self.on_evict is not None:
                self.on_evict(name, self.snapshot(name))
            slot = self.slots.pop(name)
            self._series[slot] = None
            self.last_seen[slot] = np.inf
            self.dirty[slot] = False
            self._free.append(slot)
        self.evictions_total += len(gone)
        return gone

    def drop(self, series: Iterable[str]) -> list[str]:
        """Forget these series (no ``on_evict``, not counted as evictions): their state lives on elsewhere,
        e.g. in the changelog of a partition this instance no longer owns. Returns those that were resident."""
        gone = [s for s in series if s in self.slots]
        for name in gone:
            slot = self.slots.pop(name)
            self._series[slot] = None
            self.last_seen[slot] = np.inf
            self.dirty[slot] = False
            self._free.append(slot)
        return gone

    def evict_idle(self, now: float, ttl_seconds: float) -> list[str]:
        """Evict every series not seen for longer than ``ttl_seconds``; returns them."""
        idle = np.flatnonzero(self.last_seen < now - ttl_seconds)
        return self.evict(self.series_at(idle.tolist()))

    def _evict_lru(self, n: int, protected: np.ndarray) -> None:
        """Evict the ``n`` least recently seen series, never those in ``protected`` (this batch's)."""
        seen = self.last_seen.copy()  # free slots hold inf
        seen[protected] = np.inf
        candidates = np.flatnonzero(np.isfinite(seen))
        n = min(n, len(candidates))
        if n <= 0:
            return
        pick = candidates[np.argpartition(seen[candidates], n - 1)[:n]] if n < len(candidates) else candidates
        pick = pick[np.argsort(seen[pick], kind="stable")]
        self.evict(self.series_at(pick.tolist()))

    # ---- dirty tracking ------------------------------------------------------------------------------

    def mark_dirty(self, slots: np.ndarray) -> None:
        self.dirty[slots] = True

    def take_dirty(self) -> set[str]:
        """Series changed since the last call (then forgotten)."""
        slots = np.flatnonzero(self.dirty)
        self.dirty[slots] = False
        return set(self.series_at(slots.tolist()))

    # ---- hidden state --------------------------------------------------------------------------------

    def gather(self, idx: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """States of slots ``idx`` (device int64): (layers, n, hidden), or (h, c) for an LSTM."""
        if self._h_a is not None:
            ix = idx.numpy()
            h = torch.from_numpy(self._h_a[:, ix])  # (layers, n, hidden)
            return (h, torch.from_numpy(self._c_a[:, ix])) if self._c_a is not None else h
        h = self.h.index_select(1, idx)  # (layers, n, hidden)
        return (h, self.c.index_select(1, idx)) if self.c is not None else h

    def scatter(self, idx: torch.Tensor, state: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> None:
        """Write states of slots ``idx`` back (the inverse of ``gather``)."""
        if self._h_a is not None:
            ix = idx.numpy()
            if self._c_a is not None:
                self._h_a[:, ix] = state[0].numpy()
                self._c_a[:, ix] = state[1].numpy()
            else:
                self._h_a[:, ix] = state.numpy()  # type: ignore[union-attr]
        elif self.c is not None:
            self.h.index_copy_(1, idx, state[0])
            self.c.index_copy_(1, idx, state[1])
        else:
            self.h.index_copy_(1, idx, state)  # type: ignore[arg-type]

    @_inference
    def write_states(self, slots: np.ndarray, state: Any, forecast: torch.Tensor | None = None) -> None:
        """Scatter states (and optionally last forecasts, data units) for host ``slots``."""
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        self.scatter(idx, state)
        if forecast is not None:
            self.forecast.index_copy_(0, idx, forecast.to(self.forecast.dtype))

    def _in_order(
        self, ring: torch.Tensor, slots: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``slots`` of ``ring`` oldest first and right-aligned (n, W), the mask of the positions before
        each series' values (n, W), and lengths (n,) int64 = min(count, W)."""
        count = torch.as_tensor(self.count[slots], device=self.device)  # (n,)
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        w = self.window_size
        cols = (count[:, None] - w + torch.arange(w, device=self.device)) % w  # (n, W) ring positions
        lengths = count.clamp(max=w)  # (n,)
        before = torch.arange(w, device=self.device) < (w - lengths)[:, None]  # (n, W)
        return ring.index_select(0, idx).gather(1, cols), before, lengths

    @_inference
    def window(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Retained inputs of ``slots``, oldest first and right-aligned: x (n, W, 1) with zeros before
        each series' values, and lengths (n,) int64 = min(count, W)."""
        x, before, lengths = self._in_order(self.ring, slots)  # (n, W)
        return x.masked_fill(before, 0.0).unsqueeze(-1), lengths  # (n, W, 1)

    @_inference
    def recent(self, slots: np.ndarray, scaling: Scaling) -> torch.Tensor:
        """Retained values of ``slots`` in the units of each series' newest input (its current statistics),
        oldest first and right-aligned, NaN before each series' values: (n, W) float32, what a model's
        baseline reads (``RecurrentForecaster.readout`` / ``warm``)."""
        v, before, _ = self._in_order(self.values, slots)  # (n, W) data units
        stats = self.stats.index_select(0, torch.as_tensor(slots, dtype=torch.long, device=self.device))
        return scaling.rescale(stats, v.double()).masked_fill(before, float("nan"))

    # ---- snapshots (format and copying in forecaster.engine.snapshot) ---------------------------------------

    def snapshot(self, series: str) -> bytes:
        """Everything needed to continue ``series`` elsewhere, as versioned bytes (no pickle)."""
        return snap.take(self, series)

    def restore(self, series: str, data: bytes, now: float) -> str:
        """Load a snapshot into ``series``' slot (allocating one); returns the model version it names.

        Raises ``StateError`` for corrupt bytes, an unknown format version or a shape that does not fit.
        """
        return snap.put(self, series, data, now)
