"""Writing input records: synthetic series at a target rate, or a file replayed, optionally as windows.

Each record is keyed by its series id. With ``window > 1`` a record carries up to ``window`` consecutive
values of one series (``{"series", "ts": [...], "values": [...]}``), which amortises the per-record cost.

>>> sent = []
>>> class Fake:
...     def send(self, topic, key, value): sent.append((topic, key, value))
...     def flush(self): pass
>>> report = produce_synthetic(Fake(), "ts.input", n_series=2, n_ticks=3, window=2, start_ms=0, progress=False)
>>> report.records, report.values, sent[0][1]
(4, 6, b'series-0')
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from forecaster.data import read_series
from forecaster.records import encode_input, encode_window
from forecaster.tools.synthetic import SyntheticSource

# (series, ts list, values list): one record's content
Chunk = tuple[str, list[int], list[float]]


@dataclass
class ProduceReport:
    """What was written: records, values, wall seconds, and rows of a file that were skipped (per reason)."""

    records: int = 0
    values: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.values / self.seconds if self.seconds > 0 else 0.0


class Pacer:
    """Holds a producer to ``rate`` values per second on average (0: as fast as possible).

    >>> now = [0.0]
    >>> pacer = Pacer(rate=10.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    >>> pacer.wait(5); now[0]
    0.5
    """

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.started = clock()
        self.sent = 0

    def wait(self, values: int) -> None:
        """Account for ``values`` sent; sleep until the average rate is back at the target."""
        self.sent += values
        if self.rate > 0:
            ahead = self.started + self.sent / self.rate - self.clock()
            if ahead > 0:
                self.sleep(ahead)


def synthetic_chunks(
    n_series: int, n_ticks: int | None, *, window: int = 1, start_ms: int, step_ms: int = 1000, seed: int = 0
) -> Iterator[Chunk]:
    """Records of a ``SyntheticSource``: tick by tick (window 1), or ``window`` ticks per series at a time."""
    source = SyntheticSource(n_series, seed=seed)
    tick = 0
    while n_ticks is None or tick < n_ticks:
        size = window if n_ticks is None else min(window, n_ticks - tick)
        block = np.stack([values for _, values in source.ticks(size)], axis=1)  # (series, size)
        ts = (start_ms + step_ms * np.arange(tick, tick + size, dtype=np.int64)).tolist()
        for name, values in zip(source.ids, block.tolist(), strict=True):
            yield name, ts, values
        tick += size


def file_chunks(
    source: str | os.PathLike[str] | IO[str], *, window: int = 1, skipped: dict[str, int]
) -> Iterator[Chunk]:
    """Records of a series file in time order: one value each, or ``window`` consecutive values of a series."""
    loaded = read_series(source)
    skipped.update(loaded.bad_summary())
    frame = loaded.frame.sort_values(["ts", "line"], kind="stable")
    if window == 1:
        for name, ts, value in zip(
            frame["series"].tolist(), frame["ts"].tolist(), frame["value"].tolist(), strict=True
        ):
            yield name, [ts], [value]
        return
    chunks: list[tuple[int, Chunk]] = []
    for name, group in frame.groupby("series", sort=False):
        ts, values = group["ts"].tolist(), group["value"].tolist()
        for lo in range(0, len(ts), window):
            chunks.append((ts[lo], (str(name), ts[lo : lo + window], values[lo : lo + window])))
    chunks.sort(key=lambda item: item[0])
    for _, chunk in chunks:
        yield chunk


def send_chunks(
    producer: Any,
    topic: str,
    chunks: Iterable[Chunk],
    *,
    rate: float = 0.0,
    total: int | None = None,
    progress: bool = True,
    windowed: bool = False,
) -> ProduceReport:
    """Send each chunk as one record (a single-value record when not ``windowed``); flush at the end."""
    report = ProduceReport()
    pacer = Pacer(rate)
    started = time.perf_counter()
    with tqdm(total=total, unit="values", disable=not progress, smoothing=0.1) as bar:
        for name, ts, values in chunks:
            key = name.encode()
            if windowed:
                producer.send(topic, key=key, value=encode_window(name, ts, values))
                report.records += 1
            else:
                for when, value in zip(ts, values, strict=True):
                    producer.send(topic, key=key, value=encode_input(name, when, value))
                report.records += len(values)
            report.values += len(values)
            bar.update(len(values))
            pacer.wait(len(values))
    producer.flush()
    report.seconds = time.perf_counter() - started
    return report


def produce_synthetic(
    producer: Any,
    topic: str,
    *,
    n_series: int,
    n_ticks: int | None,
    window: int = 1,
    rate: float = 0.0,
    start_ms: int | None = None,
    step_ms: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> ProduceReport:
    """``n_ticks`` values of each of ``n_series`` synthetic series (forever when None) to ``topic``."""
    start_ms = int(time.time() * 1000) if start_ms is None else start_ms
    chunks = synthetic_chunks(n_series, n_ticks, window=window, start_ms=start_ms, step_ms=step_ms, seed=seed)
    total = None if n_ticks is None else n_series * n_ticks
    return send_chunks(
        producer, topic, chunks, rate=rate, total=total, progress=progress, windowed=window > 1
    )


def produce_file(
    producer: Any,
    topic: str,
    source: str | os.PathLike[str] | IO[str],
    *,
    window: int = 1,
    rate: float = 0.0,
    progress: bool = True,
) -> ProduceReport:
    """Replay a series file (CSV long or wide, Parquet) to ``topic`` in time order."""
    skipped: dict[str, int] = {}
    chunks = list(file_chunks(source, window=window, skipped=skipped))
    total = sum(len(values) for _, _, values in chunks)
    report = send_chunks(
        producer, topic, chunks, rate=rate, total=total, progress=progress, windowed=window > 1
    )
    report.skipped = skipped
    return report
