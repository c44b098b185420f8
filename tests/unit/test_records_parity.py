"""The orjson codec decodes and encodes as the standard-``json`` one did; its repeated-key check is exact."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from forecaster.errors import InvalidRecord
from forecaster.records import RecordDecoder, encode_forecast_groups, encode_forecasts, encode_window
from forecaster.records.output import Bounds, with_intervals
from forecaster.records.strict_json import parse, parse_json

NOW_S = 1_800_000_000.0
LIMITS = {"max_series_length": 16, "max_window_values": 5, "max_future_ms": 1000, "clock": lambda: NOW_S}
FAST = RecordDecoder(**LIMITS)
FAST_POSITIVE = RecordDecoder(**LIMITS, positive=True)
JSON_STRICT = RecordDecoder(**LIMITS, fast=False)
JSON_POSITIVE = RecordDecoder(**LIMITS, fast=False, positive=True)
OLD = RecordDecoder(**LIMITS, fast=False, strict=False)  # the codec before orjson and duplicate_key

EDGE_FLOATS = st.sampled_from(
    [1e308, -1e308, 1.7976931348623157e308, 5e-324, -5e-324, 2.2250738585072014e-308, -0.0, 0.0, 0.1]
)
NUMBERS = (
    st.floats(allow_nan=False, allow_infinity=False)
    | EDGE_FLOATS
    | st.integers(-(2**70), 2**70)
    | st.integers(-(2**1100), 2**1100)
    | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 2**1023, 3 * 2**1022])
)
ISO = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(2026, 1, 1), timezones=st.none() | st.just(UTC)
).map(datetime.isoformat)
TS = st.integers(0, int(NOW_S * 1000) + 1000) | ISO
SERIES = st.text(min_size=1, max_size=16)


@st.composite
def valid_records(draw) -> dict:
    series = draw(SERIES)
    if draw(st.booleans()):
        body = {"series": series, "value": draw(NUMBERS)}
        if draw(st.booleans()):
            body["ts"] = draw(TS)
        return body
    n = draw(st.integers(1, 5))
    return {
        "series": series,
        "ts": draw(st.lists(TS, min_size=n, max_size=n)),
        "values": draw(st.lists(NUMBERS, min_size=n, max_size=n)),
    }


def outcome(decoder: RecordDecoder, raw: bytes, key: bytes | None = None):
    """What a decoder makes of a record: the reason, or the decoded fields (floats bit for bit)."""
    try:
        series, ts, value = decoder.decode(raw, key, 1234)
    except InvalidRecord as exc:
        return exc.reason
    values = np.atleast_1d(np.asarray(value, dtype=np.float64))
    return series, np.atleast_1d(ts).tolist(), values.tobytes()


@settings(max_examples=300, deadline=None)
@given(valid_records(), st.booleans(), st.booleans())
def test_valid_records_decode_as_the_json_codec_decoded_them(body, ensure_ascii, with_key):
    raw = json.dumps(body, ensure_ascii=ensure_ascii).encode()
    key = body["series"].encode() if with_key else None
    assert outcome(FAST, raw, key) == outcome(OLD, raw, key)
    assert outcome(FAST_POSITIVE, raw, key) == outcome(JSON_POSITIVE, raw, key)
    try:
        compact = orjson.dumps(body)  # as a producer with orjson writes it
    except orjson.JSONEncodeError:  # an integer beyond 64 bits
        return
    assert outcome(FAST, compact, key) == outcome(OLD, raw, key)


def test_values_at_the_edges_of_float64_survive_exactly():
    edges = [1e308, -1.7976931348623157e308, 5e-324, -5e-324, 2.2250738585072014e-308, -0.0, 2**64, 10**30]
    raw = encode_window("s", list(range(1, 9)), edges)
    decoder = RecordDecoder(max_window_values=8, max_abs_value=math.inf, clock=lambda: NOW_S)  # no limit
    _, _, values = decoder.decode(raw, None, -1)
    assert values.tobytes() == np.array(edges, dtype=np.float64).tobytes()  # -0.0 keeps its sign


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.floats()
    | st.integers()
    | st.integers(-(2**80), 2**80)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["series", "ts", "value", "values", "schema", "x"]), inner, max_size=5
        )
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_random_json_gets_the_reason_the_json_codec_gives(body):
    raw = json.dumps(body).encode()  # NaN and Infinity included, as Python writes them
    assert outcome(FAST, raw) == outcome(JSON_STRICT, raw) == outcome(OLD, raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64) | st.sampled_from([b'{"series": "a", "value": 1}', b"[]", b"{}"]))
def test_random_bytes_get_the_reason_the_json_codec_gives(raw):
    assert outcome(FAST, raw) == outcome(JSON_STRICT, raw)


# ---- the repeated-key check ------------------------------------------------------------------------------

KEYS = st.sampled_from(["series", "value", "ts", "x", "a:b", ":", '"k":', "s\u00e9"])
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from('ab:"\\{}[],\u00e9'), max_size=6)
)
TREES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3).map(lambda items: ("list", items))
        | st.lists(st.tuples(KEYS, st.booleans(), inner), max_size=4).map(lambda pairs: ("object", pairs))
    ),
    max_leaves=12,
)


def render(node) -> tuple[str, bool]:
    """JSON text of a tree whose objects are lists of pairs (keys may repeat, some written as \\u escapes),
    and whether any object repeats a key."""
    if type(node) is tuple and node[0] == "list":
        parts = [render(item) for item in node[1]]
        return "[" + ",".join(text for text, _ in parts) + "]", any(r for _, r in parts)
    if type(node) is tuple:
        keys = [key for key, _, _ in node[1]]
        parts = [(key, escaped, render(value)) for key, escaped, value in node[1]]
        fields = [
            ("".join(f"\\u{ord(c):04x}" for c in key).join('""') if escaped else json.dumps(key)) + ":" + text
            for key, escaped, (text, _) in parts
        ]
        repeated = len(set(keys)) != len(keys) or any(r for _, _, (_, r) in parts)
        return "{" + ",".join(fields) + "}", repeated
    return json.dumps(node, ensure_ascii=False), False


def refuses_a_repeated_key(reader, raw: bytes) -> bool:
    try:
        reader(raw)
    except InvalidRecord as exc:
        return exc.reason == "duplicate_key"
    return False


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(KEYS, st.booleans(), TREES), max_size=5).map(lambda pairs: ("object", pairs)))
def test_a_repeated_key_is_found_exactly_at_any_depth_escaped_or_not(tree):
    text, repeated = render(tree)
    raw = text.encode()
    assert refuses_a_repeated_key(parse, raw) == repeated
    assert refuses_a_repeated_key(parse_json, raw) == repeated


# ---- forecasts -------------------------------------------------------------------------------------------

FLOAT32_EDGES = [3.4028235e38, -3.4028235e38, 1e-45, -1e-45, 1.1754944e-38, -0.0, 0.1, 1 / 3]


def as_float32(forecast: list) -> list:
    return [None if f is None else np.float32(f) for f in forecast]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6),
    st.text(max_size=8),
    st.integers(0, 4),
    st.data(),
)
def test_forecasts_read_back_as_the_json_encoding_of_the_same_float32(names, version, horizon, data):
    n = len(names)
    cells = st.floats(width=32) | st.sampled_from(FLOAT32_EDGES)
    forecasts = np.array(
        data.draw(st.lists(st.lists(cells, min_size=horizon, max_size=horizon), min_size=n, max_size=n)),
        dtype=np.float32,
    ).reshape(n, horizon)
    ts, offset = np.arange(n) * 10**12, np.arange(n) + 2**40
    partition, index = np.arange(n) % 3, np.arange(n) % 4 - 1
    encoded = encode_forecasts(names, ts, version, forecasts, partition, offset, index)
    for k, raw in enumerate(encoded):
        body = json.loads(raw, parse_constant=refuse)
        expected = {  # the single-record encoding the json codec wrote
            "series": names[k],
            "ts": int(ts[k]),
            "step_ms": None,
            "model_version": version,
            "forecast": finite(forecasts[k]),
            "input": {"partition": int(partition[k]), "offset": int(offset[k])},
        }
        if index[k] >= 0:
            expected["index"] = int(index[k])
        body["forecast"], expected["forecast"] = (
            as_float32(body["forecast"]),
            as_float32(expected["forecast"]),
        )
        assert body == expected
    group = np.arange(n) // 2  # two values of one windowed record each
    keys, grouped = encode_forecast_groups(names, ts, version, forecasts, partition, offset, index, group)
    assert len(grouped) == group[-1] + 1
    for g, raw in enumerate(grouped):
        rows = sorted(np.flatnonzero(group == g), key=lambda r: index[r])
        body = json.loads(raw, parse_constant=refuse)
        assert keys[g] == body["series"] == names[rows[0]] and body["model_version"] == version
        assert body["ts"] == ts[rows].tolist() and body["index"] == index[rows].tolist()
        assert [as_float32(row) for row in body["forecasts"]] == [
            as_float32(finite(forecasts[r])) for r in rows
        ]


def finite(row: np.ndarray) -> list:
    return [f if math.isfinite(f) else None for f in row.tolist()]


def refuse(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")


def test_float32_forecasts_round_trip_bit_for_bit_including_subnormals_and_negative_zero():
    forecasts = np.array([FLOAT32_EDGES], dtype=np.float32)
    raw = encode_forecasts(["s"], np.array([1]), "v", forecasts, np.array([0]), np.array([0]), np.array([-1]))
    back = np.array(json.loads(raw[0])["forecast"], dtype=np.float32)
    assert back.tobytes() == forecasts[0].tobytes()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6),
    st.lists(st.sampled_from(["80", "95", "50", "99.5", "%d"]), min_size=1, max_size=3, unique=True),
    st.integers(0, 4),
    st.data(),
)
def test_bounds_written_in_one_pass_equal_those_added_record_by_record(names, labels, horizon, data):
    n, levels = len(names), len(labels)
    cells = st.floats(width=32) | st.sampled_from(FLOAT32_EDGES)
    lower, upper = (
        np.array(
            data.draw(st.lists(cells, min_size=n * levels * horizon, max_size=n * levels * horizon)),
            dtype=np.float32,
        ).reshape(n, levels, horizon)
        for _ in range(2)
    )
    forecasts = np.zeros((n, horizon), np.float32)
    ts, partition, offset, index = np.arange(n), np.arange(n) % 3, np.arange(n), np.arange(n) % 3 - 1
    bounds = Bounds(labels, lower, upper)
    plain = encode_forecasts(names, ts, "v", forecasts, partition, offset, index)
    fast = encode_forecasts(names, ts, "v", forecasts, partition, offset, index, bounds)
    assert fast == with_intervals(plain, bounds, [[r] for r in range(n)])
    for raw in fast:
        json.loads(raw, parse_constant=refuse)  # valid JSON, no NaN or Infinity
