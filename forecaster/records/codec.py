"""Wire formats: input records (one value or a window), forecasts and dead letters, and their validation.

Input (the Kafka key, when present, must equal ``series``; ``schema`` is optional and defaults to 1)::

    {"series": "s1", "ts": 1700000000000, "value": 21.5}
    {"series": "s1", "ts": "2023-11-14T22:13:20Z", "value": 21.5}
    {"series": "s1", "ts": [1700000000000, 1700000060000], "values": [21.5, 21.7]}

``ts`` is epoch milliseconds or an ISO-8601 string (naive means UTC); a single value without ``ts`` takes
the Kafka record timestamp. Forecast (key = series id)::

    {"series": "s1", "ts": 1700000000000, "model_version": "init", "forecast": [h1, ..., hH],
     "input": {"partition": 0, "offset": 42}}

``forecast[k]`` is the value expected k+1 steps after ``ts``; a forecast of a value from a windowed record
also carries ``"index"``: the position of that value in the record's window. Dead letter::

    {"reason": "non_finite", "detail": "...", "topic": "ts.input", "partition": 0, "offset": 7,
     "key": "s1", "raw": "<base64 of the record value>"}

Validation happens before any state changes: a bad record raises ``InvalidRecord(reason, detail)`` where
``reason`` is one of ``REASONS`` (used as a metric label).

>>> decoder = RecordDecoder(clock=lambda: 1.8e9)
>>> decoder.decode(b'{"series": "s1", "ts": 1700000000000, "value": 21.5}', b"s1", -1)
('s1', 1700000000000, 21.5)
>>> try:
...     decoder.decode(b'{"series": "s1", "value": NaN}', None, 0)
... except InvalidRecord as exc:
...     exc.reason
'non_finite'
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from forecaster.errors import InvalidRecord

SCHEMA_VERSION = 1
FIELDS = frozenset({"schema", "series", "ts", "value", "values"})
REASONS = (
    "not_utf8",
    "not_json",
    "not_object",
    "unknown_schema",
    "unknown_field",
    "missing_series",
    "bad_series",
    "series_too_long",
    "key_mismatch",
    "missing_value",
    "bad_value",
    "non_finite",
    "bad_ts",
    "ts_out_of_range",
    "length_mismatch",
    "window_too_large",
    "empty_window",
    "not_positive",
)
_NUMBER = (int, float)  # bool is excluded by checking type() exactly


class KafkaRecord(Protocol):
    """What the decoder reads from a consumed record (kafka-python's ``ConsumerRecord`` fits)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


@dataclass
class DecodedBatch:
    """The good values of a batch of records, flattened for the engine, plus the bad records.

    ``record[i]`` is the index (in ``records``) of the record value ``i`` came from and ``index[i]`` its
    position in that record's window (-1 for a single-value record).
    """

    records: Sequence[KafkaRecord]
    series: list[str]
    ts: np.ndarray  # (n,) int64 epoch ms
    values: np.ndarray  # (n,) float64
    record: np.ndarray  # (n,) int64
    index: np.ndarray  # (n,) int64
    invalid: list[tuple[KafkaRecord, InvalidRecord]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.series)


class RecordDecoder:
    """Validates and decodes input records; limits come from ``ServiceSettings``, the clock is injected.

    >>> decoder = RecordDecoder(clock=lambda: 1.8e9)
    >>> decoder.decode(b'{"series": "a", "ts": [1, 2], "values": [1.0, 2.0]}', None, -1)
    ('a', array([1, 2]), array([1., 2.]))
    """

    def __init__(
        self,
        *,
        max_series_length: int = 256,
        max_window_values: int = 10_000,
        max_future_ms: int = 366 * 24 * 3600 * 1000,
        clock: Callable[[], float] = time.time,
        positive: bool = False,
    ) -> None:
        self.max_series_length = max_series_length
        self.max_window_values = max_window_values
        self.max_future_ms = max_future_ms
        self.clock = clock
        self.positive = positive  # values must be > 0 (the engine scales their logarithm)

    @classmethod
    def from_settings(
        cls, service: Any, clock: Callable[[], float] = time.time, positive: bool = False
    ) -> RecordDecoder:
        return cls(
            max_series_length=service.max_series_length,
            max_window_values=service.max_window_values,
            max_future_ms=service.max_future_ms,
            clock=clock,
            positive=positive,
        )

    def decode_batch(self, records: Sequence[KafkaRecord]) -> DecodedBatch:
        """Every record decoded; bad ones collected in ``invalid`` (never raised)."""
        max_ts = int(self.clock() * 1000) + self.max_future_ms
        series: list[str] = []
        ts: list[int] = []
        values: list[float] = []
        origin: list[int] = []
        windows: list[tuple[int, str, np.ndarray, np.ndarray]] = []
        invalid: list[tuple[KafkaRecord, InvalidRecord]] = []
        for i, rec in enumerate(records):
            try:
                name, when, value = self._decode(rec.value, rec.key, rec.timestamp, max_ts)
            except InvalidRecord as exc:
                invalid.append((rec, exc))
                continue
            if isinstance(value, np.ndarray):
                windows.append((i, name, when, value))
            else:
                series.append(name)
                ts.append(when)
                values.append(value)
                origin.append(i)
        n_single = len(series)
        index = [np.full(n_single, -1, dtype=np.int64)]
        ts_parts = [np.array(ts, dtype=np.int64)]
        value_parts = [np.array(values, dtype=np.float64)]
        origin_parts = [np.array(origin, dtype=np.int64)]
        for i, name, when, value in windows:
            series.extend([name] * len(value))
            ts_parts.append(when)
            value_parts.append(value)
            origin_parts.append(np.full(len(value), i, dtype=np.int64))
            index.append(np.arange(len(value), dtype=np.int64))
        return DecodedBatch(
            records=records,
            series=series,
            ts=np.concatenate(ts_parts),
            values=np.concatenate(value_parts),
            record=np.concatenate(origin_parts),
            index=np.concatenate(index),
            invalid=invalid,
        )

    def decode(
        self, raw: bytes | None, key: bytes | None, record_ts: int | None
    ) -> tuple[str, int | np.ndarray, float | np.ndarray]:
        """``(series, ts, value)`` of one record, arrays for a window; raises ``InvalidRecord``."""
        return self._decode(raw, key, record_ts, int(self.clock() * 1000) + self.max_future_ms)

    def _decode(
        self, raw: bytes | None, key: bytes | None, record_ts: int | None, max_ts: int
    ) -> tuple[str, int | np.ndarray, float | np.ndarray]:
        body = _parse(raw)
        series = self._series(body, key)
        if "values" in body:
            if "value" in body:
                raise InvalidRecord("bad_value", "a record has either value or values, not both")
            values = self._window_values(body["values"])
            if "ts" not in body:
                raise InvalidRecord("bad_ts", "a window needs a ts list")
            return series, self._window_ts(body["ts"], len(values), max_ts), values
        if "value" not in body:
            raise InvalidRecord("missing_value", "no value or values field")
        value = body["value"]
        if type(value) not in _NUMBER:
            raise InvalidRecord("bad_value", f"value is {type(value).__name__}, not a number")
        value = float(value) if type(value) is float or abs(value) < 2**1023 else math.inf
        if not math.isfinite(value):
            raise InvalidRecord("non_finite", f"value is {value}")
        if self.positive and not value > 0.0:
            raise InvalidRecord("not_positive", f"value is {value}; the serving model scales logarithms")
        if "ts" in body:
            when = _ts(body["ts"])
        elif record_ts is not None and record_ts >= 0:
            when = int(record_ts)
        else:
            raise InvalidRecord("bad_ts", "no ts field and no record timestamp")
        if not 0 <= when <= max_ts:
            raise InvalidRecord("ts_out_of_range", f"ts {when} is before 1970 or too far in the future")
        return series, when, value

    def _series(self, body: dict[str, Any], key: bytes | None) -> str:
        schema = body.get("schema", SCHEMA_VERSION)
        if type(schema) is not int or not 1 <= schema <= SCHEMA_VERSION:
            raise InvalidRecord("unknown_schema", f"schema {schema!r}; this service reads {SCHEMA_VERSION}")
        if not FIELDS.issuperset(body):
            unknown = sorted(set(body) - FIELDS)
            raise InvalidRecord("unknown_field", f"unknown fields {unknown[:5]}")
        if "series" not in body:
            raise InvalidRecord("missing_series", "no series field")
        series = body["series"]
        if type(series) is not str or not series:
            raise InvalidRecord("bad_series", f"series is {type(series).__name__}, not a non-empty string")
        if len(series) > self.max_series_length:
            raise InvalidRecord("series_too_long", f"{len(series)} characters > {self.max_series_length}")
        if not series.isascii():
            try:
                series.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRecord("bad_series", "series holds a lone surrogate") from None
        if key is not None and key != series.encode("utf-8"):
            raise InvalidRecord("key_mismatch", f"key {key[:64]!r} differs from series {series[:64]!r}")
        return series

    def _window_values(self, values: Any) -> np.ndarray:
        if type(values) is not list:
            raise InvalidRecord("bad_value", f"values is {type(values).__name__}, not a list")
        if not values:
            raise InvalidRecord("empty_window", "values is empty")
        if len(values) > self.max_window_values:
            raise InvalidRecord("window_too_large", f"{len(values)} values > {self.max_window_values}")
        if not all(type(v) in _NUMBER for v in values):
            bad = next(v for v in values if type(v) not in _NUMBER)
            raise InvalidRecord("bad_value", f"values holds a {type(bad).__name__}")
        try:
            array = np.array(values, dtype=np.float64)
        except OverflowError:
            raise InvalidRecord("non_finite", "a value overflows float64") from None
        if not np.isfinite(array).all():
            raise InvalidRecord("non_finite", f"values holds {array[~np.isfinite(array)][0]}")
        if self.positive and not (array > 0.0).all():
            bad = array[~(array > 0.0)][0]
            raise InvalidRecord("not_positive", f"values holds {bad}; the serving model scales logarithms")
        return array

    def _window_ts(self, ts: Any, n: int, max_ts: int) -> np.ndarray:
        if type(ts) is not list:
            raise InvalidRecord("bad_ts", f"ts of a window is {type(ts).__name__}, not a list")
        if len(ts) != n:
            raise InvalidRecord("length_mismatch", f"{len(ts)} ts for {n} values")
        if all(type(t) is int for t in ts):
            if not all(0 <= t <= max_ts for t in ts):
                raise InvalidRecord("ts_out_of_range", "a ts is before 1970 or too far in the future")
            return np.array(ts, dtype=np.int64)
        parsed = [_ts(t) for t in ts]
        if not all(0 <= t <= max_ts for t in parsed):
            raise InvalidRecord("ts_out_of_range", "a ts is before 1970 or too far in the future")
        return np.array(parsed, dtype=np.int64)


def _parse(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        raise InvalidRecord("not_json", "empty record value")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecord("not_utf8", str(exc)) from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidRecord("not_json", str(exc)[:200]) from None
    if type(body) is not dict:
        raise InvalidRecord("not_object", f"a JSON {type(body).__name__}, not an object")
    return body


def _ts(value: Any) -> int:
    """Epoch ms from an int, an integral float or an ISO-8601 string (naive = UTC)."""
    if type(value) is int:
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise InvalidRecord("bad_ts", f"ts is {value}")
        return int(value)
    if type(value) is str:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidRecord("bad_ts", f"ts {value[:64]!r} is not ISO-8601") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return round(parsed.timestamp() * 1000)
    raise InvalidRecord("bad_ts", f"ts is {type(value).__name__}, not epoch ms or an ISO-8601 string")


def encode_input(series: str, ts: int | str | None, value: float) -> bytes:
    """One input value as record bytes."""
    body: dict[str, Any] = {"series": series, "value": value}
    if ts is not None:
        body["ts"] = ts
    return json.dumps(body).encode()


def encode_window(series: str, ts: Sequence[int], values: Sequence[float]) -> bytes:
    """A window of values of one series as record bytes."""
    return json.dumps({"series": series, "ts": list(ts), "values": list(values)}).encode()


def encode_forecast(
    series: str,
    ts: int,
    version: str,
    forecast: Sequence[float],
    partition: int,
    offset: int,
    index: int = -1,
) -> bytes:
    """A forecast record; ``index`` (the value's position in a windowed record) is left out when < 0."""
    body: dict[str, Any] = {
        "series": series,
        "ts": ts,
        "model_version": version,
        "forecast": list(forecast),
        "input": {"partition": partition, "offset": offset},
    }
    if index >= 0:
        body["index"] = index
    return json.dumps(body).encode()


def encode_forecasts(
    series: Sequence[str],
    ts: np.ndarray,
    version: str,
    forecasts: np.ndarray,
    partition: np.ndarray,
    offset: np.ndarray,
    index: np.ndarray,
    intervals: Bounds | None = None,
) -> list[bytes]:
    """Many forecast records at once (the service's hot path); each parses to ``encode_forecast``'s.

    Forecasts are written with 9 significant digits, which round-trips float32 exactly. ``intervals``:
    the bounds of each row, added as ``"lower"`` / ``"upper"`` (see ``with_intervals``).
    """
    horizon = forecasts.shape[1] if forecasts.ndim == 2 else 0
    template = (
        '{"series":%s,"ts":%d,"model_version":'
        + json.dumps(version).replace("%", "%%")
        + ',"forecast":['
        + ",".join(["%.9g"] * horizon)
        + '],"input":{"partition":%d,"offset":%d}%s}'
    )
    finite = np.isfinite(forecasts).all(axis=1) if horizon else np.ones(len(forecasts), dtype=bool)
    names: dict[str, str] = {}
    encoded = []
    rows = zip(
        series,
        ts.tolist(),
        forecasts.tolist(),
        partition.tolist(),
        offset.tolist(),
        index.tolist(),
        strict=True,
    )
    for k, (name, when, forecast, part, off, i) in enumerate(rows):
        name_json = names.get(name)
        if name_json is None:
            name_json = names[name] = json.dumps(name)
        tail = f',"index":{i}' if i >= 0 else ""
        if finite[k]:
            encoded.append((template % (name_json, when, *forecast, part, off, tail)).encode())
        else:  # a diverged model: null where a forecast is not a number, still valid JSON
            clean = [f if math.isfinite(f) else None for f in forecast]
            encoded.append(encode_forecast(name, when, version, clean, part, off, i))  # type: ignore[arg-type]
    return (
        encoded
        if intervals is None
        else with_intervals(encoded, intervals, [[r] for r in range(len(encoded))])
    )


def encode_forecast_groups(
    series: Sequence[str],
    ts: np.ndarray,
    version: str,
    forecasts: np.ndarray,
    partition: np.ndarray,
    offset: np.ndarray,
    index: np.ndarray,
    group: np.ndarray,
    intervals: Bounds | None = None,
) -> tuple[list[str], list[bytes]]:
    """One record per input record (rows sharing ``group``): the ``forecast_records = "window"`` format.

    ``{"series", "ts": [...], "model_version", "forecasts": [[h1..hH], ...], "index": [...],
    "input": {"partition", "offset"}}`` with the rows of one input record in window order (``index``
    is -1 for a single-value record), and with ``intervals`` ``"lower"`` / ``"upper"`` holding one list
    per value under each level. Returns the keys (series ids) and the encoded values.
    """
    order = np.lexsort((index, group))  # by input record, then position in its window
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    groups = np.split(order, bounds) if len(order) else []
    prefix = json.dumps(version)
    keys, encoded = [], []
    for rows in groups:
        first = int(rows[0])
        values = forecasts[rows]
        listed = (
            values.tolist()
            if np.isfinite(values).all()
            else [[f if math.isfinite(f) else None for f in row] for row in values.tolist()]
        )
        text = (
            f'{{"series":{json.dumps(series[first])},"ts":{json.dumps(ts[rows].tolist())},'
            f'"model_version":{prefix},"forecasts":{json.dumps(listed)},'
            f'"index":{json.dumps(index[rows].tolist())},'
            f'"input":{{"partition":{int(partition[first])},"offset":{int(offset[first])}}}}}'
        )
        keys.append(series[first])
        encoded.append(text.encode())
    if intervals is not None:
        encoded = with_intervals(encoded, intervals, [g.tolist() for g in groups], windowed=True)
    return keys, encoded


@dataclass(frozen=True)
class Bounds:
    """Prediction intervals of forecast rows: level labels ("80", "95"), lower and upper (n, L, H)."""

    labels: Sequence[str]
    lower: np.ndarray
    upper: np.ndarray


def with_intervals(
    encoded: list[bytes], bounds: Bounds, rows: Sequence[Sequence[int]], windowed: bool = False
) -> list[bytes]:
    """Add ``"lower": {"80": [...], ...}, "upper": {...}`` to each encoded record (its closing brace
    moved after them). Record i holds rows ``rows[i]``: one list of H bounds per level, or with
    ``windowed`` one such list per row. 9 significant digits (float32 round-trips); null where not finite."""

    def fmt(x: float) -> str:
        return f"{x:.9g}" if math.isfinite(x) else "null"

    def side(a: np.ndarray, picked: Sequence[int]) -> str:
        parts = []
        for level, label in enumerate(bounds.labels):
            lists = ["[" + ",".join(map(fmt, a[r, level].tolist())) + "]" for r in picked]
            body = "[" + ",".join(lists) + "]" if windowed else lists[0]
            parts.append(f"{json.dumps(label)}:{body}")
        return "{" + ",".join(parts) + "}"

    out = []
    for record, picked in zip(encoded, rows, strict=True):
        tail = f',"lower":{side(bounds.lower, picked)},"upper":{side(bounds.upper, picked)}}}'
        out.append(record[:-1] + tail.encode())
    return out


def encode_dead_letter(record: KafkaRecord, error: InvalidRecord) -> bytes:
    """A dead-letter record: why, where from, and the raw value in base64 (the key as text)."""
    key = None if record.key is None else record.key.decode("utf-8", "backslashreplace")
    raw = None if record.value is None else base64.b64encode(record.value).decode("ascii")
    body = {
        "reason": error.reason,
        "detail": error.detail,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": key,
        "raw": raw,
    }
    return json.dumps(body).encode()
