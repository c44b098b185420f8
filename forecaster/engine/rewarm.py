"""Re-warm off the hot path: the new model runs over copies of the retained windows on another thread
while the old model keeps serving; the values stepped meanwhile are caught up before the swap.

A series' state after the swap is the new model's pass, from the zero state, over the inputs it had
retained when its window was copied followed by every input stepped since: one contiguous run of its
inputs, none skipped or used twice. The ring buffer's per-slot count says how many were stepped since
(the newest entries of the ring). Each batch boundary, while the job runs, copies the next
``rows_per_copy`` windows and the inputs stepped since the last boundary by series already copied; the
background thread catches those up and warms the new windows. Once every window is warmed, further
passes catch up until few enough values are left to step at the boundary that swaps. Series that cannot
be caught up that way (more than W values between two boundaries, evicted and replaced, new since the
job began) are re-warmed over their current window at the swap.

>>> from forecaster.engine.engine import Engine
>>> from forecaster.model import RecurrentForecaster
>>> engine = Engine(RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2), window=4)
>>> _ = engine.process(["a", "a", "b"], [1, 2, 1], [1.0, 2.0, 3.0])
>>> job = RewarmJob(RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2), "v2", engine)
>>> _ = engine.process(["a"], [3], [4.0])          # the old model keeps serving meanwhile
>>> job.wait(10.0)
True
>>> job.at_boundary(engine)
{'caught_up': 2, 'rewarmed': 0, 'copies': 1, 'passes': 0}
>>> engine.version
'v2'
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Any

import numpy as np
import torch

from forecaster.engine.recalibrate import recalibrate
from forecaster.model import RecurrentForecaster, State

# Retained values per batched ``model.warm`` call: nn.GRU/LSTM keep every layer's output, so one call
# holds about layers x values x hidden x 4 bytes (1 GiB at 2^22 values and hidden 64).
VALUES_PER_CALL = {"cpu": 1 << 20, "cuda": 1 << 22}


def rows_per_call(window: int, device: torch.device) -> int:
    """Series per batched warm call for windows of ``window`` values on ``device``."""
    return max(1, VALUES_PER_CALL.get(device.type, 1 << 20) // max(window, 1))


class RewarmJob:
    """One model swap prepared in the background; ``at_boundary(engine)`` moves it on between batches.

    ``rows_per_copy`` windows are copied per boundary (default: one warm call's worth), so no boundary
    pauses for a whole-table copy. ``final_values``: at most this many caught-up values are stepped at
    the boundary that swaps (more go to another background pass, up to ``max_passes`` passes).
    """

    def __init__(
        self,
        model: RecurrentForecaster,
        version: str,
        engine: Any,
        *,
        final_values: int = 10_000,
        max_passes: int = 8,
        rows_per_copy: int | None = None,
    ) -> None:
        self.model, self.version, self.engine = model.to(engine.device).eval(), version, engine
        self.final_values, self.max_passes = final_values, max_passes
        table = engine.table
        slots = table.occupied()
        self.slots = slots[table.count[slots] > 0]  # (n,) every series resident now
        self.names = table.series_at(self.slots.tolist())
        self.counts = np.zeros(len(self.slots), dtype=np.int64)  # (n,) inputs in self.state, per row
        self.valid = np.ones(len(self.slots), dtype=bool)
        self.rows_per_copy = rows_per_copy or rows_per_call(table.window_size, table.device)
        self.copied = 0  # rows whose window has been copied
        with torch.inference_mode():
            self.state: State = model.initial_state(len(self.slots), table.device)  # (layers, n, hidden)
            self.y = torch.zeros(len(self.slots), model.horizon, device=table.device)  # (n, horizon) scaled
        self.copies = 0
        self.passes = 0
        self.background_seconds = 0.0
        # One worker: the pieces of background work run one after another, off the service thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forecaster-rewarm")
        self._work: Future | None = None
        self._start(self._warm, *self._copy_rows(table))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background work in progress is done (True) or ``timeout`` passed."""
        return not wait_for([self._work], timeout).not_done

    @property
    def busy(self) -> bool:
        return not self._work.done()

    @property
    def error(self) -> BaseException | None:
        """What the background work raised, if it did."""
        return None if self.busy else self._work.exception()

    def at_boundary(self, engine: Any) -> dict[str, int] | None:
        """Between two batches: None while work goes on; once swapped, how many series took each path.

        Raises what the background work raised (the engine is untouched then).
        """
        if self.busy:
            return None
        if self.error is not None:
            self._executor.shutdown(wait=False)
            raise self.error
        table = engine.table
        # Step 1. The inputs stepped since each copied row was last caught up (rows still holding their series).
        rows, inputs, pending = self._take_pending(table)
        if self.copied < len(self.slots):
            # Step 2. Copy the next windows; catch up the copied rows and warm the new ones in the background.
            lo, hi, ring = self._copy_rows(table)
            self._start(self._catch_up_then_warm, rows, inputs, pending, lo, hi, ring)
            return None
        if int(pending.sum()) > self.final_values and self.passes < self.max_passes:
            # Step 3. Many values arrived meanwhile: catch them up in another background pass.
            self.passes += 1
            self._start(self._catch_up, rows, inputs, pending)
            return None
        # Step 4. Few left: catch them up here and swap.
        self._executor.shutdown(wait=False)
        self._catch_up(rows, inputs, pending)
        try:
            return self._swap(engine)
        except Exception:
            # Half-written states must not serve: fall back to re-warming everything at this boundary.
            engine.rewarm(self.model, self.version)
            return {
                "caught_up": 0,
                "rewarmed": int(table.resident),
                "copies": self.copies,
                "passes": self.passes,
            }

    # ---- background work ------------------------------------------------------------------------------

    def _take_pending(self, table: Any) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """Copied rows with inputs stepped since they were last caught up: (rows, inputs (m, max, 1),
        pending (m,)). Rows whose series moved or that fell more than W behind are dropped (re-warmed at
        the swap)."""
        n = self.copied
        slots = self.slots[:n]
        same = np.array(
            [a == b for a, b in zip(table.series_at(slots.tolist()), self.names[:n], strict=True)], dtype=bool
        )
        pending = table.count[slots] - self.counts[:n]  # (n,)
        self.valid[:n] &= same & (pending >= 0) & (pending <= table.window_size)
        pending = np.where(self.valid[:n], pending, 0)
        rows = np.flatnonzero(pending > 0)
        inputs = _pending_inputs(table, slots[rows], self.counts[rows], pending[rows])  # (m, max, 1)
        self.counts[rows] += pending[rows]
        return rows, inputs, pending[rows]

    def _copy_rows(self, table: Any) -> tuple[int, int, torch.Tensor]:
        """Copy the raw ring rows and counts of the next rows (a plain copy: the reordering and the warm
        happen on the background thread)."""
        lo, hi = self.copied, min(self.copied + self.rows_per_copy, len(self.slots))
        slots = self.slots[lo:hi]
        with torch.inference_mode():
            ring = table.ring.index_select(0, torch.as_tensor(slots, device=table.device))  # (b, W) copy
        self.counts[lo:hi] = table.count[slots]
        self.copied = hi
        self.copies += 1
        return lo, hi, ring

    def _catch_up_then_warm(
        self,
        rows: np.ndarray,
        inputs: torch.Tensor,
        pending: np.ndarray,
        lo: int,
        hi: int,
        ring: torch.Tensor,
    ) -> None:
        self._catch_up(rows, inputs, pending)
        self._warm(lo, hi, ring)

    def _start(self, work: Any, *args: Any) -> None:
        """Run ``work`` in the background; what it raises is reported on the service thread at the next boundary."""

        def timed() -> None:
            started = time.perf_counter()
            try:
                work(*args)
            finally:
                self.background_seconds += time.perf_counter() - started

        self._work = self._executor.submit(timed)

    def _warm(self, lo: int, hi: int, ring: torch.Tensor) -> None:
        """The new model from the zero state over rows lo..hi's copied windows (the layout of
        ``StateTable.window``: the value with ordinal j sits at ring position j % W)."""
        width = ring.shape[1]
        with torch.inference_mode():
            count = torch.as_tensor(self.counts[lo:hi], device=ring.device)  # (b,)
            cols = (count[:, None] - width + torch.arange(width, device=ring.device)) % width  # (b, W)
            lengths = count.clamp(max=width)  # (b,)
            x = ring.gather(1, cols)  # (b, W) oldest first, right-aligned
            x = x.masked_fill(torch.arange(width, device=ring.device) < (width - lengths)[:, None], 0.0)
            step = rows_per_call(width, ring.device)
            for a in range(0, hi - lo, step):
                b = min(a + step, hi - lo)
                y, h = self.model.warm(x[a:b, :, None], lengths[a:b])  # (rows, horizon)
                idx = torch.arange(lo + a, lo + b, device=ring.device)
                _put(self.state, idx, h)
                self.y[lo + a : lo + b] = y

    def _catch_up(self, rows: np.ndarray, inputs: torch.Tensor, pending: np.ndarray) -> None:
        """Step row ``rows[i]`` over ``inputs[i, :pending[i]]``: round k steps every row's k-th input."""
        if not len(rows):
            return
        with torch.inference_mode():
            device = inputs.device
            rows_t = torch.as_tensor(rows, device=device)
            pending_t = torch.as_tensor(pending, device=device)
            state = _select(self.state, rows_t)  # (layers, m, hidden)
            y = self.y.index_select(0, rows_t)  # (m, horizon)
            for k in range(int(pending.max())):
                active = torch.nonzero(pending_t > k).squeeze(1)  # (b,)
                y_k, s_k = self.model.step(inputs[active, k], _select(state, active))  # (b, horizon)
                _put(state, active, s_k)
                y[active] = y_k
            _put(self.state, rows_t, state)
            self.y[rows_t] = y

    # ---- the swap -------------------------------------------------------------------------------------

    def _swap(self, engine: Any) -> dict[str, int]:
        table, model = engine.table, self.model
        with torch.inference_mode():
            table.fit_model(model)
            engine.set_model(model, self.version)
            rows = np.flatnonzero(self.valid)
            slots = self.slots[rows]
            idx = torch.as_tensor(slots, device=table.device)
            if len(rows):
                rows_t = torch.as_tensor(rows, device=table.device)
                stats = table.stats.index_select(0, idx)  # (m, N_STATS): the statistics as they are now
                y = self.y.index_select(0, rows_t)  # (m, horizon)
                if model.context:  # catch-up steps ran without their past: the baseline comes from the window
                    y = model.readout(_select(self.state, rows_t), table.recent(slots, engine.scaling))
                table.write_states(slots, _select(self.state, rows_t), engine.scaling.denormalize(stats, y))
                # Their calibrators keep their spreads and score the new model from its forecast on (a
                # replay over the window would cost the boundary the full pass the background job avoids).
                table.reset_pending(slots, engine.scaling)
                table.reset_choice(slots)
            # Everything else resident re-warms over its current window, now.
            rest = np.setdiff1d(table.occupied(), slots)
            rest = rest[table.count[rest] > 0]
            step = rows_per_call(table.window_size, table.device)
            for lo in range(0, len(rest), step):
                chunk = rest[lo : lo + step]
                x, lengths = table.window(chunk)  # (n, W, 1), (n,)
                recent = table.recent(chunk, engine.scaling) if model.context else None  # (n, W)
                y_r, h_r = model.warm(x, lengths, recent)  # (n, horizon)
                stats = table.stats.index_select(0, torch.as_tensor(chunk, device=table.device))
                table.write_states(chunk, h_r, engine.scaling.denormalize(stats, y_r))
                table.reset_choice(chunk)
                recalibrate(table, model, engine.scaling, chunk)  # the calibrator over the window too
        return {"caught_up": len(rows), "rewarmed": len(rest), "copies": self.copies, "passes": self.passes}


def _pending_inputs(table: Any, slots: np.ndarray, first: np.ndarray, pending: np.ndarray) -> torch.Tensor:
    """The ring entries stepped since ``first`` (ordinals first .. first + pending - 1), as (m, max) float32."""
    width = int(pending.max()) if len(pending) else 0
    device = table.device
    with torch.inference_mode():
        ordinals = torch.as_tensor(first, device=device)[:, None] + torch.arange(
            width, device=device
        )  # (m, max)
        slot_idx = torch.as_tensor(slots, device=device)[:, None].expand(-1, width)  # (m, max)
        return (
            table.ring[slot_idx, ordinals % table.window_size].to(torch.float32).unsqueeze(-1)
        )  # (m, max, 1)


def _select(state: State, idx: torch.Tensor) -> State:
    if isinstance(state, tuple):
        return state[0].index_select(1, idx), state[1].index_select(1, idx)
    return state.index_select(1, idx)


def _put(state: State, idx: torch.Tensor, new: State) -> None:
    if isinstance(state, tuple):
        state[0][:, idx] = new[0]
        state[1][:, idx] = new[1]
    else:
        state[:, idx] = new
