"""One series' state as plain values, read safely from another thread than the one stepping the engine.

The engine is stepped on one thread (the service's loop); a reader elsewhere (the HTTP server) must not
look at the state table while a batch changes it. ``ask_series`` leaves a request in the engine's mailbox
and waits; the engine answers every waiting request at the start of its next ``process`` call, i.e.
between two batches. When nobody asks, the loop pays one test of an empty deque per batch.

>>> from forecaster.model import RecurrentForecaster
>>> from forecaster.engine import Engine
>>> engine = Engine(RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2), window=3)
>>> _ = engine.process(["a"] * 4, [1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0])
>>> state = series_state(engine, "a")   # on the stepping thread itself: read directly
>>> state.values, state.last_ts, state.count, len(state.forecast)
([2.0, 3.0, 4.0], 4, 4, 2)
>>> series_state(engine, "b") is None
True
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from forecaster.engine.engine import Engine


@dataclass(frozen=True)
class SeriesState:
    """What the engine keeps of one resident series, in data units.

    ``values``: the retained values, oldest first (the last ``min(count, window)``); the state table keeps
    the ts of the newest one only (``last_ts``, epoch ms). ``forecast[k]``: the value expected k+1 steps
    after ``last_ts``, made by ``model_version`` after the newest value; ``sources[k]``: where it comes from
    (``model``, ``last_value`` or ``seasonal_naive``: the per-series choice), None without the choice.
    ``period_ms``: the series' period (a step is one: ``forecast[k]`` is for ``last_ts + (k + 1) *
    period_ms``), 0 without one (``grid``: ``"learning"`` it from the first spacings, or ``"none"``: a step
    is the next value); ``imputed[i]``: ``values[i]`` filled a missing period.
    """

    series: str
    values: list[float]
    last_ts: int
    count: int
    window: int
    forecast: list[float]
    model_version: str
    sources: list[str] | None = None
    period_ms: int = 0
    grid: str = "none"
    imputed: list[bool] | None = None


def series_state(engine: Engine, series: str) -> SeriesState | None:
    """The state of ``series``, or None when it is not resident. Call it on the thread stepping ``engine``."""
    table = engine.table
    slot = table.slot_of(series)
    if slot is None:
        return None
    slots = np.array([slot], dtype=np.int64)
    with torch.inference_mode():
        ordered, _, lengths = table._in_order(table.values, slots)  # (1, W) oldest first, right-aligned
        n = int(lengths[0])
        values = ordered[0, table.window_size - n :].double().cpu().tolist() if n else []
        count, w = int(table.count[slot]), table.window_size
        imputed = table.gaps[slot, (np.arange(count - n, count) % w)].tolist()
        forecast = table.forecast[slot].double().cpu().tolist()
    return SeriesState(
        series=series,
        values=values,
        last_ts=int(table.last_ts[slot]),
        count=int(table.count[slot]),
        window=table.window_size,
        forecast=forecast,
        model_version=engine.version,
        sources=engine.chooser.source_names(slots)[0] if engine.chooser is not None and n else None,
        period_ms=int(table.period[slot]),
        grid="period" if table.period[slot] > 0 else "learning" if table.learning[slot] else "none",
        imputed=imputed,
    )


class _Ask:
    """One waiting request: the series asked for, and the answer once the engine gave it."""

    __slots__ = ("series", "answer", "done")

    def __init__(self, series: str) -> None:
        self.series = series
        self.answer: SeriesState | None = None
        self.done = threading.Event()


def ask_series(engine: Engine, series: str, timeout: float) -> SeriesState | None:
    """From any thread: the state of ``series`` as the engine has it between two batches, or None when not
    resident. Raises ``TimeoutError`` when the engine is not called within ``timeout`` seconds (a loop
    that is stuck, or not running)."""
    ask = _Ask(series)
    engine.asks.append(ask)
    if not ask.done.wait(timeout):
        try:
            engine.asks.remove(ask)
        except ValueError:  # taken meanwhile: the answer is on its way
            if ask.done.wait(timeout):
                return ask.answer
        raise TimeoutError(f"the engine did not reach a batch boundary within {timeout:g} s")
    return ask.answer


def answer_asks(engine: Engine) -> None:
    """On the thread stepping ``engine``, between two batches: answer every waiting request."""
    while engine.asks:
        try:
            ask = engine.asks.popleft()
        except IndexError:  # the asker gave up meanwhile
            return
        try:
            ask.answer = series_state(engine, ask.series)
        finally:
            ask.done.set()
