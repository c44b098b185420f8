"""Input records (one value or a window of values of one series): decoding and validation.

The Kafka key, when present, must equal ``series``; ``schema`` is optional and defaults to 1::

    {"series": "s1", "ts": 1700000000000, "value": 21.5}
    {"series": "s1", "ts": "2023-11-14T22:13:20Z", "value": 21.5}
    {"series": "s1", "ts": [1700000000000, 1700000060000], "values": [21.5, 21.7]}

``ts`` is epoch milliseconds or an ISO-8601 string (naive means UTC); a single value without ``ts`` takes
the Kafka record timestamp. Validation happens before any state changes: a bad record raises
``InvalidRecord(reason, detail)`` where ``reason`` is one of ``REASONS`` (used as a metric label).

Records are parsed with orjson; what orjson refuses or could read differently from the standard ``json``
module (NaN and Infinity literals, numbers that overflow, integers beyond 64 bits, lone surrogates, deep
nesting) is parsed again with ``json``, so every record gets the reason it always had. JSON is strict:
an object that repeats a key is refused (``duplicate_key``) rather than keeping its last value.

>>> decoder = RecordDecoder(clock=lambda: 1.8e9)
>>> decoder.decode(b'{"series": "s1", "ts": 1700000000000, "value": 21.5}', b"s1", -1)
('s1', 1700000000000, 21.5)
>>> for raw in (b'{"series": "s1", "value": NaN}', b'{"series": "a", "series": "b", "value": 1}'):
...     try:
...         decoder.decode(raw, None, 0)
...     except InvalidRecord as exc:
...         print(exc.reason)
non_finite
duplicate_key
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from forecaster.errors import InvalidRecord
from forecaster.records.strict_json import may_be_too_deep_for_json, parse, parse_json

SCHEMA_VERSION = 1
# The largest magnitude of a value (``service.max_abs_value``'s default): beyond it a series' forecasts and
# bounds overflow float32, and one such value leaves its scale and the online error infinite for good.
MAX_ABS_VALUE = 1e30
FIELDS = frozenset({"schema", "series", "ts", "value", "values"})
REASONS = (
    "not_utf8",
    "not_json",
    "duplicate_key",
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
    "out_of_range",
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

    ``fast=False`` parses with the standard ``json`` module only and ``strict=False`` lets a repeated key
    keep its last value: the codec as it was before orjson and ``duplicate_key`` (benchmarks, tests).

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
        max_abs_value: float = MAX_ABS_VALUE,
        clock: Callable[[], float] = time.time,
        positive: bool = False,
        fast: bool = True,
        strict: bool = True,
    ) -> None:
        self.max_series_length = max_series_length
        self.max_window_values = max_window_values
        self.max_future_ms = max_future_ms
        self.max_abs_value = max_abs_value
        self.clock = clock
        self.positive = positive  # values must be > 0 (the engine scales their logarithm)
        self.fast = fast
        self.strict = strict

    @classmethod
    def from_settings(
        cls, service: Any, clock: Callable[[], float] = time.time, positive: bool = False
    ) -> RecordDecoder:
        return cls(
            max_series_length=service.max_series_length,
            max_window_values=service.max_window_values,
            max_future_ms=service.max_future_ms,
            max_abs_value=service.max_abs_value,
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
        body, by_orjson = (
            parse(raw, strict=self.strict) if self.fast else (parse_json(raw, self.strict), False)
        )
        try:
            return self._validate(body, raw, key, record_ts, max_ts, by_orjson)
        except InvalidRecord:
            # orjson reads deeper nesting than ``json`` can: for such a record ``json``'s reason stands.
            if by_orjson and may_be_too_deep_for_json(raw):  # type: ignore[arg-type]
                parse_json(raw, self.strict)
            raise

    def _validate(
        self,
        body: dict[str, Any],
        raw: bytes | None,
        key: bytes | None,
        record_ts: int | None,
        max_ts: int,
        by_orjson: bool,
    ) -> tuple[str, int | np.ndarray, float | np.ndarray]:
        series = self._series(body, key)
        if "values" in body:
            if "value" in body:
                raise InvalidRecord("bad_value", "a record has either value or values, not both")
            # A plain body has no booleans, NaN, infinities or integers beyond 64 bits: numpy's type
            # inference can check its lists instead of a loop over the elements.
            plain = by_orjson and b"true" not in raw and b"false" not in raw  # type: ignore[operator]
            values = self._window_values(body["values"], plain)
            if "ts" not in body:
                raise InvalidRecord("bad_ts", "a window needs a ts list")
            return series, self._window_ts(body["ts"], len(values), max_ts, plain), values
        if "value" not in body:
            raise InvalidRecord("missing_value", "no value or values field")
        value = body["value"]
        if type(value) not in _NUMBER:
            raise InvalidRecord("bad_value", f"value is {type(value).__name__}, not a number")
        value = float(value) if type(value) is float or abs(value) < 2**1023 else math.inf
        if not math.isfinite(value):
            raise InvalidRecord("non_finite", f"value is {value}")
        if abs(value) > self.max_abs_value:
            raise InvalidRecord("out_of_range", f"value is {value:g}, beyond ±{self.max_abs_value:g}")
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

    def _window_values(self, values: Any, plain: bool) -> np.ndarray:
        if type(values) is not list:
            raise InvalidRecord("bad_value", f"values is {type(values).__name__}, not a list")
        if not values:
            raise InvalidRecord("empty_window", "values is empty")
        if len(values) > self.max_window_values:
            raise InvalidRecord("window_too_large", f"{len(values)} values > {self.max_window_values}")
        array = _numbers(values) if plain else None
        if array is None:
            if not all(type(v) in _NUMBER for v in values):
                bad = next(v for v in values if type(v) not in _NUMBER)
                raise InvalidRecord("bad_value", f"values holds a {type(bad).__name__}")
            try:
                array = np.array(values, dtype=np.float64)
            except OverflowError:
                raise InvalidRecord("non_finite", "a value overflows float64") from None
        if not np.isfinite(array).all():
            raise InvalidRecord("non_finite", f"values holds {array[~np.isfinite(array)][0]}")
        if np.abs(array).max() > self.max_abs_value:
            bad = array[np.abs(array) > self.max_abs_value][0]
            raise InvalidRecord("out_of_range", f"values holds {bad:g}, beyond ±{self.max_abs_value:g}")
        if self.positive and not (array > 0.0).all():
            bad = array[~(array > 0.0)][0]
            raise InvalidRecord("not_positive", f"values holds {bad}; the serving model scales logarithms")
        return array

    def _window_ts(self, ts: Any, n: int, max_ts: int, plain: bool) -> np.ndarray:
        if type(ts) is not list:
            raise InvalidRecord("bad_ts", f"ts of a window is {type(ts).__name__}, not a list")
        if len(ts) != n:
            raise InvalidRecord("length_mismatch", f"{len(ts)} ts for {n} values")
        array = _integers(ts) if plain else None
        if array is not None:
            if array.min() < 0 or array.max() > max_ts:
                raise InvalidRecord("ts_out_of_range", "a ts is before 1970 or too far in the future")
            return array.astype(np.int64, copy=False)
        if all(type(t) is int for t in ts):
            if not all(0 <= t <= max_ts for t in ts):
                raise InvalidRecord("ts_out_of_range", "a ts is before 1970 or too far in the future")
            return np.array(ts, dtype=np.int64)
        parsed = [_ts(t) for t in ts]
        if not all(0 <= t <= max_ts for t in parsed):
            raise InvalidRecord("ts_out_of_range", "a ts is before 1970 or too far in the future")
        return np.array(parsed, dtype=np.int64)


def _numbers(values: list[Any]) -> np.ndarray | None:
    """``values`` as float64 when every element is a number (numpy's inference, no booleans in a plain
    body); None to check them one by one."""
    try:
        array = np.array(values)
    except (ValueError, OverflowError):  # ragged lists, integers numpy cannot hold
        return None
    if array.ndim != 1 or array.dtype.kind not in "fiu":
        return None
    return array.astype(np.float64, copy=False)


def _integers(ts: list[Any]) -> np.ndarray | None:
    """``ts`` as an int64 or uint64 array when every element is an int (plain body); None otherwise."""
    try:
        array = np.array(ts)
    except (ValueError, OverflowError):
        return None
    if array.ndim != 1 or array.dtype.kind not in "iu":
        return None
    return array


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
