"""Output records: forecasts and dead letters.

Forecast (key = series id)::

    {"series": "s1", "ts": 1700000000000, "step_ms": 3600000, "model_version": "init",
     "forecast": [h1, ..., hH], "input": {"partition": 0, "offset": 42}}

``forecast[k]`` is the value expected at ``ts + (k + 1) * step_ms`` (epoch ms): a step is one period of
the series (``forecaster.timegrid``). ``"step_ms": null`` says the series has no period (its spacing is not
stable, or it is still learning it, or ``state.period`` is ``none``): then ``forecast[k]`` is the value
expected k+1 values after ``ts``, whenever they come. A forecast of a value from a windowed record
also carries ``"index"``: the position of that value in the record's window. A float32 forecast is
written as the shortest decimal that reads back as the same float32; a forecast that is not a finite
number is written as null. Dead letter::

    {"reason": "non_finite", "detail": "...", "topic": "ts.input", "partition": 0, "offset": 7,
     "timestamp": 1700000000000, "key": "s1", "raw": "<base64 of the record value>"}

A dead letter never exceeds ``max_bytes``: a raw value too large to fit is cut, and the record says so
(``"raw_truncated": true, "raw_bytes": <length of the whole value>``).

>>> import json
>>> from types import SimpleNamespace
>>> from forecaster.errors import InvalidRecord
>>> bad = SimpleNamespace(topic="in", partition=0, offset=7, timestamp=5, key=b"s1", value=b"x" * 5000)
>>> body = json.loads(encode_dead_letter(bad, InvalidRecord("not_json", "x"), max_bytes=2048))
>>> body["raw_truncated"], body["raw_bytes"], len(body["raw"]) < 2048
(True, 5000, True)
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from forecaster.errors import InvalidRecord
from forecaster.records.input import KafkaRecord

# Kafka's default largest request (producer ``max.request.size``), less room for the record's key and
# the record and batch headers that travel beside a dead letter's value.
KAFKA_MAX_MESSAGE_BYTES = 1_048_576
DEAD_LETTER_HEADROOM = 65_536
DEAD_LETTER_MAX_BYTES = KAFKA_MAX_MESSAGE_BYTES - DEAD_LETTER_HEADROOM
# The smallest limit a dead letter can always be cut to (reason, coordinates and a cut detail and key).
DEAD_LETTER_MIN_BYTES = 1024
RECORD_OVERHEAD_BYTES = 512  # record batch and record headers, generously

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def dead_letter_max_bytes(max_message_bytes: int, key: bytes | None) -> int:
    """The ``max_bytes`` for a dead letter produced with ``key`` under a ``max_message_bytes`` limit."""
    room = max_message_bytes - RECORD_OVERHEAD_BYTES - (0 if key is None else len(key))
    return max(room, DEAD_LETTER_MIN_BYTES)


def encode_forecast(
    series: str,
    ts: int,
    version: str,
    forecast: Sequence[float],
    partition: int,
    offset: int,
    index: int = -1,
    step_ms: int = 0,
) -> bytes:
    """A forecast record; ``index`` (the value's position in a windowed record) is left out when < 0;
    ``step_ms`` 0 is written null (no period)."""
    body: dict[str, Any] = {
        "series": series,
        "ts": ts,
        "step_ms": step_ms or None,
        "model_version": version,
        "forecast": forecast if isinstance(forecast, np.ndarray) else list(forecast),
        "input": {"partition": partition, "offset": offset},
    }
    if index >= 0:
        body["index"] = index
    return orjson.dumps(body, option=_NUMPY)


def encode_forecasts(
    series: Sequence[str],
    ts: np.ndarray,
    version: str,
    forecasts: np.ndarray,
    partition: np.ndarray,
    offset: np.ndarray,
    index: np.ndarray,
    intervals: Bounds | None = None,
    step_ms: np.ndarray | None = None,
) -> list[bytes]:
    """Many forecast records at once (the service's hot path); each parses to ``encode_forecast``'s
    (with ``intervals``: plus ``"lower"`` and ``"upper"``, see ``with_intervals``).

    The forecasts of the whole batch are written by one orjson call and cut into rows (numbers hold no
    brackets), so the per-record work is one bytes formatting.
    """
    if len(series) == 0:
        return []
    matrix = np.ascontiguousarray(forecasts).reshape(len(series), -1)  # (records, horizon)
    rows = orjson.dumps(matrix, option=_NUMPY)[2:-2].split(b"],[")
    template = (
        b'{"series":%b,"ts":%d,"step_ms":%b,"model_version":'
        + orjson.dumps(version).replace(b"%", b"%%")
        + b',"forecast":[%b],"input":{"partition":%d,"offset":%d}%b}'
    )
    if intervals is not None:
        template = template[:-1] + b"%b}"  # the bounds after everything else, as ``with_intervals`` puts them
        bounds = interval_members(intervals, len(series))
    names: dict[str, bytes] = {}
    periods: dict[int, bytes] = {0: b"null"}
    steps = np.zeros(len(series), np.int64) if step_ms is None else step_ms
    encoded = []
    columns = zip(
        series,
        ts.tolist(),
        steps.tolist(),
        rows,
        partition.tolist(),
        offset.tolist(),
        index.tolist(),
        strict=True,
    )
    for r, (name, when, step, row, part, off, i) in enumerate(columns):
        name_json = names.get(name)
        if name_json is None:
            name_json = names[name] = orjson.dumps(name)
        period = periods.get(step)
        if period is None:
            period = periods[step] = b"%d" % step
        tail = b',"index":%d' % i if i >= 0 else b""
        if intervals is None:
            encoded.append(template % (name_json, when, period, row, part, off, tail))
        else:
            encoded.append(template % (name_json, when, period, row, part, off, tail, bounds[r]))
    return encoded


def interval_members(bounds: Bounds, n: int) -> list[bytes]:
    """``,"lower":{...},"upper":{...}`` of each of ``n`` forecast rows, as ``with_intervals`` writes them
    for single rows: both bound arrays are written by one orjson call each and cut into rows of H.

    >>> lower = np.array([[[1.0, 2.0], [0.5, np.nan]]], np.float32)  # (1 row, 2 levels, horizon 2)
    >>> interval_members(Bounds(["80", "95"], lower, lower + 1), 1)[0]
    b',"lower":{"80":[1.0,2.0],"95":[0.5,null]},"upper":{"80":[2.0,3.0],"95":[1.5,null]}'
    """
    labels = [orjson.dumps(label).replace(b"%", b"%%") for label in bounds.labels]
    side = b",".join(label + b":[%b]" for label in labels)
    template = b',"lower":{' + side + b'},"upper":{' + side + b"}"
    levels = len(labels)
    lower, upper = (
        orjson.dumps(np.ascontiguousarray(a, dtype=np.float32).reshape(n * levels, -1), option=_NUMPY)[
            2:-2
        ].split(b"],[")
        for a in (bounds.lower, bounds.upper)
    )
    return [
        template % (*lower[r * levels : (r + 1) * levels], *upper[r * levels : (r + 1) * levels])
        for r in range(n)
    ]


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
    step_ms: np.ndarray | None = None,
) -> tuple[list[str], list[bytes]]:
    """One record per input record (rows sharing ``group``): the ``forecast_records = "window"`` format.

    ``{"series", "ts": [...], "step_ms", "model_version", "forecasts": [[h1..hH], ...], "index": [...],
    "input": {"partition", "offset"}}`` with the rows of one input record in window order (``index``
    is -1 for a single-value record), with ``intervals`` also ``"lower"`` and ``"upper"`` (one list per
    value under each level). Returns the keys (series ids) and the encoded values.
    """
    order = np.lexsort((index, group))  # by input record, then position in its window
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    groups = np.split(order, bounds) if len(order) else []
    keys, encoded = [], []
    for rows in groups:
        first = int(rows[0])
        body = {
            "series": series[first],
            "ts": ts[rows],
            "step_ms": int(step_ms[rows[-1]]) or None if step_ms is not None else None,
            "model_version": version,
            "forecasts": forecasts[rows],  # (rows, horizon)
            "index": index[rows],
            "input": {"partition": int(partition[first]), "offset": int(offset[first])},
        }
        keys.append(series[first])
        encoded.append(orjson.dumps(body, option=_NUMPY))
    if intervals is not None:
        encoded = with_intervals(encoded, intervals, [g.tolist() for g in groups], windowed=True)
    return keys, encoded


def encode_dead_letter(
    record: KafkaRecord, error: InvalidRecord, max_bytes: int = DEAD_LETTER_MAX_BYTES
) -> bytes:
    """A dead-letter record of at most ``max_bytes``: why, where from, and the raw value in base64.

    The key is written as text. When the whole raw value does not fit, as much of it as fits is kept
    with ``raw_truncated`` and ``raw_bytes``; a key or detail too long to leave room is cut as well
    (``key_truncated``, a detail ending in "...").
    """
    if max_bytes < DEAD_LETTER_MIN_BYTES:
        raise ValueError(f"max_bytes={max_bytes} < {DEAD_LETTER_MIN_BYTES}: too small for a dead letter")
    key = None if record.key is None else record.key.decode("utf-8", "backslashreplace")
    raw = record.value
    body: dict[str, Any] = {
        "reason": error.reason,
        "detail": error.detail,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": key,
        "raw": None if raw is None else base64.b64encode(raw).decode("ascii"),
    }
    encoded = _dumps(body)
    if len(encoded) <= max_bytes:
        return encoded
    # Step 1. Measure everything but the raw value: empty, with the flags of a cut one.
    flags = {"raw_truncated": True, "raw_bytes": 0 if raw is None else len(raw)}
    fixed = _dumps({**body, "raw": "", **flags})
    # Step 2. A key or detail so long that little room would be left for the raw value is cut: the longer
    # of the two is halved until everything but the raw value takes at most half of the limit.
    while len(fixed) > max_bytes // 2 and max(len(body["detail"]), len(body["key"] or "")) > 16:
        name = "detail" if len(body["detail"]) >= len(body["key"] or "") else "key"
        text = body[name]
        body[name] = text[: len(text) // 2]
        if name == "key":
            body["key_truncated"] = True
        elif not body[name].endswith("..."):
            body[name] += "..."
        fixed = _dumps({**body, "raw": "", **flags})
    encoded = _dumps(body)
    if len(encoded) <= max_bytes:  # the whole raw value fits beside the cut key or detail
        return encoded
    # Step 3. Fill the room left with whole base64 quanta of the raw value (ASCII: one byte a character).
    take = max((max_bytes - len(fixed)) // 4 * 3, 0)
    encoded = _dumps({**body, "raw": base64.b64encode(raw[:take]).decode("ascii"), **flags})  # type: ignore[index]
    assert len(encoded) <= max_bytes, (len(encoded), max_bytes)
    return encoded


def _dumps(body: dict[str, Any]) -> bytes:
    """orjson, or ``json`` escaping for text orjson refuses (a lone surrogate in a detail)."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        return json.dumps(body, allow_nan=False).encode()


# ---- prediction intervals: "lower" and "upper" beside the forecasts -----------------------------


@dataclass(frozen=True)
class Bounds:
    """Prediction intervals of forecast rows: level labels ("80", "95"), lower and upper (n, L, H)."""

    labels: Sequence[str]
    lower: np.ndarray
    upper: np.ndarray


def with_intervals(
    encoded: list[bytes], bounds: Bounds, rows: Sequence[Sequence[int]], windowed: bool = False
) -> list[bytes]:
    """Add ``"lower"`` and ``"upper"`` to each encoded record (a JSON object), record i holding rows
    ``rows[i]`` of ``bounds``: one list of H bounds per level, or with ``windowed`` one per row. Bounds are
    float32 written as the shortest decimal that reads back as the same float32, null where not finite.

    >>> lower = np.array([[[1.0, 2.0], [0.5, 1.5]]], np.float32)  # (1 record, 2 levels, horizon 2)
    >>> record = with_intervals([b'{"forecast":[1.5,2.5]}'], Bounds(["80", "95"], lower, lower + 1), [[0]])[0]
    >>> json.loads(record)["upper"]
    {'80': [2.0, 3.0], '95': [1.5, 2.5]}
    """
    lower = np.ascontiguousarray(bounds.lower, dtype=np.float32)
    upper = np.ascontiguousarray(bounds.upper, dtype=np.float32)
    labels = list(bounds.labels)
    out = []
    for record, picked in zip(encoded, rows, strict=True):
        at = list(picked) if windowed else picked[0]
        sides = {
            side: {label: a[at, level] for level, label in enumerate(labels)}
            for side, a in (("lower", lower), ("upper", upper))
        }
        out.append(record[:-1] + b"," + orjson.dumps(sides, option=_NUMPY)[1:])
    return out
