"""Training history: per-series value arrays read from the input topic or from a series file.

Both sources end in the same shape: each series' values in event-time order, a value whose ``ts`` is not
newer than the one before it dropped as a duplicate (the first one read is kept), exactly the values the
engine would step when it is fed the same records in time order. Kafka records are decoded and validated
by the service's own ``RecordDecoder``; file rows by ``forecaster.data.read_series``.

>>> import io
>>> h = read_history_file(io.StringIO("series,ts,value\\na,2,2.0\\na,1,1.0\\na,2,9.0\\nb,5,5.0\\n"))
>>> h.series, [v.tolist() for v in h.values], h.dropped
(['a', 'b'], [[1.0, 2.0], [5.0]], {'duplicates': 1})
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from forecaster.data import read_series
from forecaster.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class History:
    """Per-series ``ts`` (int64 ms, strictly increasing) and ``values`` (float64), plus where they came from."""

    series: list[str]
    ts: list[np.ndarray]
    values: list[np.ndarray]
    source: dict[str, Any] = field(default_factory=dict)  # for the checkpoint manifest
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def total_values(self) -> int:
        return int(sum(len(v) for v in self.values))

    @classmethod
    def from_long(
        cls, series: Sequence[str], ts: np.ndarray, values: np.ndarray, source: dict[str, Any] | None = None
    ) -> History:
        """Group flat ``(series, ts, value)`` in read order into per-series arrays (time order, no duplicates)."""
        ts = np.asarray(ts, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        names, codes = np.unique(np.asarray(series, dtype=object).astype(str), return_inverse=True)
        order = np.lexsort((np.arange(len(ts)), ts, codes))  # by series, then ts, then read order
        codes, ts, values = codes[order], ts[order], values[order]
        same = np.zeros(len(ts), dtype=bool)
        same[1:] = (codes[1:] == codes[:-1]) & (ts[1:] == ts[:-1])
        codes, ts, values = codes[~same], ts[~same], values[~same]
        bounds = np.searchsorted(codes, np.arange(len(names) + 1))
        return cls(
            series=[str(n) for n in names],
            ts=[ts[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
            values=[values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
            source=dict(source or {}),
            dropped={"duplicates": int(same.sum())},
        )

    def time_range(self) -> dict[str, int | None]:
        """First and last ts over every series (epoch ms)."""
        firsts = [int(t[0]) for t in self.ts if len(t)]
        lasts = [int(t[-1]) for t in self.ts if len(t)]
        return {"first_ts": min(firsts, default=None), "last_ts": max(lasts, default=None)}

    def describe(self) -> dict[str, Any]:
        """The manifest's ``data`` entry: source, range, counts."""
        return {
            **self.source,
            **self.time_range(),
            "series": len(self.series),
            "values": self.total_values,
            "dropped": dict(self.dropped),
        }

    def tail(self, max_values: int) -> History:
        """The most recent ``max_values`` values, taken evenly: each series keeps at most its share."""
        if self.total_values <= max_values:
            return self
        share = max(1, max_values // max(1, len(self.series)))
        log.warning(
            "history has %d values, over the limit %d: keeping the last %d per series",
            self.total_values,
            max_values,
            share,
        )
        return History(
            self.series,
            [t[-share:] for t in self.ts],
            [v[-share:] for v in self.values],
            {**self.source, "truncated_to_per_series": share},
            dict(self.dropped),
        )


def read_history_file(source: str | os.PathLike[str] | IO[str]) -> History:
    """A series file (long/wide CSV, Parquet; what ``forecaster produce`` reads) as training history."""
    loaded = read_series(source)
    frame = loaded.frame
    name = str(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "<stream>")
    history = History.from_long(
        frame["series"].to_numpy(),
        frame["ts"].to_numpy(),
        frame["value"].to_numpy(),
        {"kind": "file", "path": name, "rows": len(frame)},
    )
    if loaded.bad_rows:
        history.dropped.update({f"bad_row_{k}": v for k, v in loaded.bad_summary().items()})
        first = loaded.bad_rows[0]
        log.warning(
            "%s: skipped %d bad rows (first: line %d, %s)",
            name,
            len(loaded.bad_rows),
            first.line,
            first.reason,
        )
    return history


def read_history_kafka(
    consumer: Any,
    topic: str,
    decode_batch: Callable[[Sequence[Any]], Any],
    *,
    start_ms: int | None = None,
    start_offset: int | None = None,
    max_records: int | None = None,
    poll_timeout_ms: int = 500,
    idle_polls: int = 20,
) -> History:
    """Every record of ``topic`` (all partitions) from an offset up to the end seen at the start.

    ``start_ms`` keeps the values whose event time ``ts`` is at or after it (record timestamps are when
    records were written, not when the values happened, so the topic is read from ``start_offset`` or
    its beginning either way).

    ``consumer`` is a reader of ``forecaster.service.clients`` (assigned here, never committed);
    ``decode_batch`` is the service's ``RecordDecoder.decode_batch`` (a ``DecodedBatch`` with ``series``,
    ``ts``, ``values``, ``record``, ``index`` and ``invalid``): invalid records are counted, not read.
    ``max_records`` starts each partition late enough to read at most that many records overall.
    """
    from forecaster.service.clients import TopicPartition, by_partition

    # Step 1. Every partition, and where to start and stop in each.
    partitions = consumer.partitions_for(topic, timeout=30.0)
    if not partitions:
        raise DataError(f"topic {topic}: no such topic or it has no partitions")
    tps = [TopicPartition(topic, p) for p in partitions]
    begin = consumer.beginning_offsets(tps, 30.0)
    end = consumer.end_offsets(tps, 30.0)
    start = dict(begin)
    if start_offset is not None:
        start = {tp: min(max(begin[tp], start_offset), end[tp]) for tp in tps}
    if max_records is not None:
        share = max(1, max_records // len(tps))
        start = {tp: max(start[tp], end[tp] - share) for tp in tps}
    consumer.assign(start)
    # Step 2. Poll until every partition reached its end offset (records past it are ignored).
    pending = {tp for tp in tps if start[tp] < end[tp]}
    series: list[str] = []
    ts_parts: list[np.ndarray] = []
    value_parts: list[np.ndarray] = []
    records_read = {tp.partition: 0 for tp in tps}
    invalid = 0
    before_start = 0
    idle = 0
    while pending:
        polled = consumer.poll(max_records=10_000, timeout=poll_timeout_ms / 1000.0)
        if not polled:
            idle += 1
            if idle >= idle_polls:  # e.g. the end was a transaction marker: train on what was read
                log.warning(
                    "topic %s: nothing more after %d empty polls; partitions %s stopped short of their end",
                    topic,
                    idle_polls,
                    sorted(tp.partition for tp in pending),
                )
                break
            continue
        idle = 0
        for tp, records in by_partition(polled).items():
            records = [r for r in records if r.offset < end.get(tp, 0)]
            if records:
                batch = decode_batch(records)
                order = np.lexsort((batch.index, batch.record))  # back to record order, then window order
                ts = np.asarray(batch.ts, dtype=np.int64)[order]
                keep = ts >= (start_ms if start_ms is not None else np.iinfo(np.int64).min)
                series.extend(batch.series[i] for i in order[keep])
                ts_parts.append(ts[keep])
                value_parts.append(np.asarray(batch.values, dtype=np.float64)[order][keep])
                before_start += int((~keep).sum())
                invalid += len(batch.invalid)
                records_read[tp.partition] += len(records)
        positions = consumer.position(sorted(pending))
        pending = {tp for tp in pending if positions.get(tp, -1) < end[tp]}
    # Step 3. Per-series arrays, and the range read for the manifest.
    source = {
        "kind": "kafka",
        "topic": topic,
        "start_ms": start_ms,
        "partitions": {
            str(tp.partition): {
                "start_offset": int(start[tp]),
                "end_offset": int(end[tp]),
                "records": records_read[tp.partition],
            }
            for tp in tps
        },
    }
    empty = np.zeros(0)
    history = History.from_long(
        series,
        np.concatenate(ts_parts) if ts_parts else empty.astype(np.int64),
        np.concatenate(value_parts) if value_parts else empty,
        source,
    )
    history.dropped["invalid_records"] = invalid
    if start_ms is not None:
        history.dropped["before_start_ms"] = before_start
    return history


def read_history(
    settings: Any,
    *,
    input_path: Any = None,
    start_ms: int | None = None,
    start_offset: int | None = None,
    consumer: Any = None,
) -> History:
    """History from ``input_path`` if given, else the input topic of ``settings.kafka``; capped at
    ``settings.train.max_values``."""
    if input_path is not None:
        return read_history_file(input_path).tail(settings.train.max_values)
    from forecaster.records import RecordDecoder
    from forecaster.service.clients import ConsumerOptions, make_consumer

    own = consumer is None
    consumer = consumer or make_consumer(
        settings.kafka, ConsumerOptions(group_id=None, client_id=f"{settings.kafka.client_id}-trainer")
    )
    try:
        decoder = RecordDecoder.from_settings(settings.service)
        history = read_history_kafka(
            consumer,
            settings.kafka.input_topic,
            decoder.decode_batch,
            start_ms=start_ms,
            start_offset=start_offset,
            max_records=settings.train.max_values,
        )
    finally:
        if own:
            consumer.close()
    return history.tail(settings.train.max_values)
