"""Wire formats: decoding, validation reasons, and the forecast / dead-letter encodings."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecaster.errors import InvalidRecord
from forecaster.records import (
    REASONS,
    RecordDecoder,
    encode_dead_letter,
    encode_forecast,
    encode_forecast_groups,
    encode_forecasts,
    encode_input,
    encode_window,
)

NOW_S = 1_800_000_000.0
TS = 1_700_000_000_000


@pytest.fixture
def decoder() -> RecordDecoder:
    return RecordDecoder(max_series_length=16, max_window_values=5, max_future_ms=1000, clock=lambda: NOW_S)


def record(value: bytes | None, key: bytes | None = None, offset: int = 0, timestamp: int = TS):
    return SimpleNamespace(topic="in", partition=2, offset=offset, timestamp=timestamp, key=key, value=value)


def reason_of(
    decoder: RecordDecoder, raw: bytes | None, key: bytes | None = None, record_ts: int = TS
) -> str:
    with pytest.raises(InvalidRecord) as caught:
        decoder.decode(raw, key, record_ts)
    assert caught.value.reason in REASONS
    return caught.value.reason


def test_single_value_with_epoch_ms(decoder):
    assert decoder.decode(b'{"series": "s1", "ts": 1700000000000, "value": 21.5}', b"s1", 5) == (
        "s1",
        TS,
        21.5,
    )


def test_iso_timestamp_naive_is_utc_and_offsets_are_honoured(decoder):
    expected = int(datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC).timestamp() * 1000)
    for text in ("2023-11-14T22:13:20", "2023-11-14T22:13:20Z", "2023-11-14T23:13:20+01:00"):
        raw = json.dumps({"series": "a", "ts": text, "value": 1}).encode()
        assert decoder.decode(raw, None, -1)[1] == expected


def test_missing_ts_takes_the_record_timestamp(decoder):
    assert decoder.decode(b'{"series": "a", "value": 2}', None, 1234)[1:] == (1234, 2.0)


def test_missing_ts_and_no_record_timestamp_is_bad_ts(decoder):
    assert reason_of(decoder, b'{"series": "a", "value": 2}', record_ts=-1) == "bad_ts"


def test_integer_value_is_a_float(decoder):
    _, _, value = decoder.decode(b'{"series": "a", "ts": 1, "value": 3}', None, -1)
    assert type(value) is float and value == 3.0


def test_window_decodes_to_arrays(decoder):
    series, ts, values = decoder.decode(
        b'{"series": "w", "ts": [3, "1970-01-01T00:00:01Z"], "values": [1, 2.5]}', None, 0
    )
    assert series == "w"
    np.testing.assert_array_equal(ts, [3, 1000])
    np.testing.assert_array_equal(values, [1.0, 2.5])
    assert ts.dtype == np.int64 and values.dtype == np.float64


def test_schema_one_is_accepted(decoder):
    assert decoder.decode(b'{"schema": 1, "series": "a", "ts": 1, "value": 1}', None, 0)[0] == "a"


BAD_CORPUS = [
    (b'{"series": "a", "ts": 1, "value": 2e30}', None, "out_of_range"),
    (b"\xff\xfe{}", None, "not_utf8"),
    (b"{not json", None, "not_json"),
    (None, None, "not_json"),
    (b"[1, 2]", None, "not_object"),
    (b'"s1"', None, "not_object"),
    (b'{"schema": 2, "series": "a", "value": 1}', None, "unknown_schema"),
    (b'{"schema": "1", "series": "a", "value": 1}', None, "unknown_schema"),
    (b'{"series": "a", "value": 1, "unit": "C"}', None, "unknown_field"),
    (b'{"ts": 1, "value": 1}', None, "missing_series"),
    (b'{"series": 7, "value": 1}', None, "bad_series"),
    (b'{"series": "", "value": 1}', None, "bad_series"),
    (b'{"series": "\\ud800", "value": 1}', None, "bad_series"),
    (b'{"series": "abcdefghijklmnopq", "value": 1}', None, "series_too_long"),
    (b'{"series": "a", "value": 1}', b"b", "key_mismatch"),
    (b'{"series": "a", "ts": 1}', None, "missing_value"),
    (b'{"series": "a", "value": "1.5"}', None, "bad_value"),
    (b'{"series": "a", "value": true}', None, "bad_value"),
    (b'{"series": "a", "value": null}', None, "bad_value"),
    (b'{"series": "a", "value": NaN}', None, "non_finite"),
    (b'{"series": "a", "value": Infinity}', None, "non_finite"),
    (b'{"series": "a", "value": -Infinity}', None, "non_finite"),
    (b'{"series": "a", "value": 1e999}', None, "non_finite"),
    (b'{"series": "a", "value": 1' + b"0" * 400 + b"}", None, "non_finite"),
    (b'{"series": "a", "ts": "yesterday", "value": 1}', None, "bad_ts"),
    (b'{"series": "a", "ts": true, "value": 1}', None, "bad_ts"),
    (b'{"series": "a", "ts": [1], "value": 1}', None, "bad_ts"),
    (b'{"series": "a", "ts": -1, "value": 1}', None, "ts_out_of_range"),
    (b'{"series": "a", "ts": "1969-12-31T23:59:59Z", "value": 1}', None, "ts_out_of_range"),
    (b'{"series": "a", "ts": 99999999999999999999, "value": 1}', None, "ts_out_of_range"),
    (b'{"series": "a", "ts": [1, 2], "values": [1]}', None, "length_mismatch"),
    (
        b'{"series": "a", "ts": [1, 2, 3, 4, 5, 6], "values": [1, 2, 3, 4, 5, 6]}',
        None,
        "window_too_large",
    ),
    (b'{"series": "a", "ts": [], "values": []}', None, "empty_window"),
    (b'{"series": "a", "ts": [1, 2], "values": [1, "x"]}', None, "bad_value"),
    (b'{"series": "a", "ts": [1, 2], "values": [1, false]}', None, "bad_value"),
    (b'{"series": "a", "ts": [1, 2], "values": [1, NaN]}', None, "non_finite"),
    (b'{"series": "a", "ts": 1, "values": 3}', None, "bad_value"),
    (b'{"series": "a", "ts": 1, "values": [3]}', None, "bad_ts"),
    (b'{"series": "a", "values": [3]}', None, "bad_ts"),
    (b'{"series": "a", "ts": [1, -5], "values": [1, 2]}', None, "ts_out_of_range"),
    (b'{"series": "a", "ts": [1, "nope"], "values": [1, 2]}', None, "bad_ts"),
    (b'{"series": "a", "ts": 1, "value": 1, "values": [1]}', None, "bad_value"),
    (b'{"series": "a", "series": "b", "ts": 1, "value": 1}', None, "duplicate_key"),
    (b'{"series": "a", "ts": 1, "value": 1.0, "value": 2.0}', None, "duplicate_key"),
    (b'{"series": "a", "ser\\u0069es": "b", "ts": 1, "value": 1}', None, "duplicate_key"),
    (b'{"series": "a:b", "ts": "2023-11-14T22:13:20Z", "value": 1, "value": 2}', None, "duplicate_key"),
    (b'{"series": "a", "ts": [1], "values": [{"x": 1, "x": 2}]}', None, "duplicate_key"),
    (b'{"series": "a", "value": NaN, "value": 1}', None, "duplicate_key"),
    (b'[{"x": 1, "x": 2}]', None, "duplicate_key"),
    (b'{"series": "a", "value": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, "not_json"),  # too deep
]


@pytest.mark.parametrize(("raw", "key", "reason"), BAD_CORPUS)
def test_each_bad_record_has_its_reason(decoder, raw, key, reason):
    assert reason_of(decoder, raw, key) == reason


# Text that looks like a key inside a string is not a repeated key, escaped or not.
NOT_REPEATED = [
    b'{"series": "\\"series\\": \\"b\\"", "ts": 1, "value": 1}',
    b'{"series": "value:2,series:b", "ts": "2023-11-14T22:13:20Z", "value": 1}',
    b'{"series": "a", "ts": ["1970-01-01T00:00:01Z", "1970-01-01T00:00:02Z"], "values": [1, 2]}',
    b'{"series": "s\\u00e9:", "ts": 1, "value": 1}',
    b'{"ser\\u0069es": "a", "ts": 1, "value": 1}',
    b'{"series":"a","ts":1,"value":1}',
]


@pytest.mark.parametrize("raw", NOT_REPEATED)
def test_key_like_text_is_not_a_repeated_key(decoder, raw):
    assert decoder.decode(raw, None, TS)[0] == json.loads(raw)["series"]


def test_a_repeated_key_keeps_its_last_value_only_when_not_strict():
    lenient = RecordDecoder(clock=lambda: NOW_S, strict=False)
    raw = b'{"series": "a", "ts": 1, "value": 1.0, "value": 2.0}'
    assert lenient.decode(raw, None, TS) == ("a", 1, 2.0)


def test_far_future_ts_is_out_of_range_near_future_is_not(decoder):
    now_ms = int(NOW_S * 1000)
    ok = json.dumps({"series": "a", "ts": now_ms + 1000, "value": 1}).encode()
    assert decoder.decode(ok, None, 0)[1] == now_ms + 1000
    late = json.dumps({"series": "a", "ts": now_ms + 1001, "value": 1}).encode()
    assert reason_of(decoder, late) == "ts_out_of_range"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"series": "a", "ts": 1, "value": 1e300}',
        b'{"series": "a", "ts": 1, "value": -1e31}',
        b'{"series": "a", "ts": 1, "value": 100000000000000000000000000000000000000000}',
        b'{"series": "a", "ts": [1, 2], "values": [1.0, -3.4e38]}',
    ],
)
def test_values_beyond_the_limit_are_out_of_range(decoder, raw):
    assert reason_of(decoder, raw) == "out_of_range"


def test_values_at_the_limit_pass(decoder):
    assert decoder.decode(b'{"series": "a", "ts": [1, 2], "values": [1e30, -1e30]}', None, 0)[2].tolist() == [
        1e30,
        -1e30,
    ]


# Under log scaling (``positive``) a value must be > 0; the same values pass a default decoder.
POSITIVE_CORPUS = [
    (b'{"series": "a", "ts": 1, "value": 0}', None, "not_positive"),
    (b'{"series": "a", "ts": 1, "value": -2.5}', None, "not_positive"),
    (b'{"series": "a", "ts": [1, 2], "values": [1.0, -0.0]}', None, "not_positive"),
]


@pytest.mark.parametrize(("raw", "key", "reason"), POSITIVE_CORPUS)
def test_a_positive_decoder_refuses_values_that_are_not(decoder, raw, key, reason):
    positive = RecordDecoder(
        max_series_length=16, max_window_values=5, max_future_ms=1000, clock=lambda: NOW_S, positive=True
    )
    assert reason_of(positive, raw, key) == reason
    decoder.decode(raw, key, TS)  # accepted without the log scaling
    assert positive.decode(b'{"series": "a", "ts": 1, "value": 1e-300}', None, TS)[2] == 1e-300


def test_every_reason_code_is_reachable_by_the_corpus():
    # The parametrised corpora above cover every reason; this guards the list against dead entries.
    covered = {reason for _, _, reason in BAD_CORPUS + POSITIVE_CORPUS}
    assert covered == set(REASONS)


def test_batch_keeps_good_records_and_collects_bad_ones(decoder):
    records = [
        record(b'{"series": "a", "ts": 10, "value": 1.0}', offset=0),
        record(b"garbage", offset=1),
        record(b'{"series": "b", "ts": [20, 30], "values": [2.0, 3.0]}', offset=2),
        record(b'{"series": "a", "value": 4.0}', offset=3, timestamp=40),
        record(b'{"series": "a", "ts": 50, "value": NaN}', offset=4),
    ]
    batch = decoder.decode_batch(records)
    assert len(batch) == 4
    rows = sorted(
        zip(
            batch.series,
            batch.ts.tolist(),
            batch.values.tolist(),
            batch.record.tolist(),
            batch.index.tolist(),
            strict=True,
        )
    )
    assert rows == [("a", 10, 1.0, 0, -1), ("a", 40, 4.0, 3, -1), ("b", 20, 2.0, 2, 0), ("b", 30, 3.0, 2, 1)]
    assert [(r.offset, e.reason) for r, e in batch.invalid] == [(1, "not_json"), (4, "non_finite")]


def test_empty_batch(decoder):
    batch = decoder.decode_batch([])
    assert len(batch) == 0 and batch.ts.dtype == np.int64 and batch.values.dtype == np.float64


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_raise_anything_but_invalid_record(raw):
    decoder = RecordDecoder(clock=lambda: NOW_S)
    batch = decoder.decode_batch([record(raw)])
    assert len(batch) + len(batch.invalid) == 1


@settings(max_examples=100, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["series", "ts", "value", "values", "schema", "x"]), inner, max_size=5
            )
        ),
        max_leaves=10,
    )
)
def test_arbitrary_json_never_raises_anything_but_invalid_record(body):
    decoder = RecordDecoder(clock=lambda: NOW_S)
    batch = decoder.decode_batch([record(json.dumps(body).encode())])
    assert len(batch) + len(batch.invalid) == 1
    if len(batch):
        assert np.isfinite(batch.values).all() and (batch.ts >= 0).all()


def test_input_encoders_round_trip(decoder):
    assert decoder.decode(encode_input("s", 7, 1.25), b"s", -1) == ("s", 7, 1.25)
    series, ts, values = decoder.decode(encode_window("s", [1, 2], [0.5, 0.25]), None, -1)
    assert series == "s" and ts.tolist() == [1, 2] and values.tolist() == [0.5, 0.25]


def test_forecast_record_fields():
    body = json.loads(encode_forecast("s1", 5, "v3", [1.0, 2.0], partition=1, offset=9))
    assert body == {
        "series": "s1",
        "ts": 5,
        "step_ms": None,
        "model_version": "v3",
        "forecast": [1.0, 2.0],
        "input": {"partition": 1, "offset": 9},
    }
    assert json.loads(encode_forecast("s1", 5, "v3", [1.0], 1, 9, index=2))["index"] == 2


def test_dead_letter_carries_raw_bytes_and_where_from():
    raw = b"\x00\xffnot json"
    body = json.loads(
        encode_dead_letter(record(raw, key=b"k1", offset=12), InvalidRecord("not_utf8", "bad byte"))
    )
    assert body["reason"] == "not_utf8" and body["detail"] == "bad byte"
    assert (body["topic"], body["partition"], body["offset"], body["key"]) == ("in", 2, 12, "k1")
    assert base64.b64decode(body["raw"]) == raw and body["timestamp"] == TS
    assert "raw_truncated" not in body
    assert json.loads(encode_dead_letter(record(None), InvalidRecord("not_json", "x")))["raw"] is None


def test_batch_forecast_encoding_equals_the_single_one():
    forecasts = np.array([[1.5, -2.25], [0.1, 3e10]], dtype=np.float32)
    encoded = encode_forecasts(
        ["s\u00e9", 'q"uote'],
        np.array([5, 6]),
        "v1",
        forecasts,
        np.array([0, 3]),
        np.array([10, 11]),
        np.array([-1, 4]),
    )
    for i, raw in enumerate(encoded):
        body = json.loads(raw)
        single = json.loads(
            encode_forecast(
                ["s\u00e9", 'q"uote'][i],
                [5, 6][i],
                "v1",
                forecasts[i].tolist(),
                [0, 3][i],
                [10, 11][i],
                [-1, 4][i],
            )
        )
        for one in (body, single):  # the batch writes 9 digits: the same float32
            one["forecast"] = np.array(one["forecast"], dtype=np.float32).tolist()
        assert body == single


def test_batch_forecasts_round_trip_float32_exactly_and_stay_valid_json_when_not_finite():
    rng = np.random.default_rng(0)
    forecasts = (rng.normal(size=(50, 4)) * 10.0 ** rng.integers(-8, 9, size=(50, 1))).astype(np.float32)
    forecasts[3, 1], forecasts[7, 0] = np.nan, np.inf
    n = len(forecasts)
    encoded = encode_forecasts(
        ["s"] * n, np.arange(n), "v%1", forecasts, np.zeros(n, int), np.arange(n), -np.ones(n, int)
    )
    bodies = [json.loads(raw, parse_constant=pytest.fail) for raw in encoded]  # NaN/Infinity are not JSON
    for k, body in enumerate(bodies):
        assert body["model_version"] == "v%1"
        if k in (3, 7):
            assert None in body["forecast"]
        else:
            np.testing.assert_array_equal(np.array(body["forecast"], dtype=np.float32), forecasts[k])


def test_grouped_forecasts_one_record_per_input_record_in_window_order():
    forecasts = np.array([[1.5, 2.0], [3.0, 4.0], [5.0, np.nan], [7.0, 8.0]], dtype=np.float32)
    keys, encoded = encode_forecast_groups(
        ["a", "b", "a", "a"],
        np.array([3, 1, 1, 2]),
        "v1",
        forecasts,
        partition=np.array([0, 1, 0, 0]),
        offset=np.array([5, 6, 5, 5]),
        index=np.array([2, -1, 0, 1]),
        group=np.array([0, 1, 0, 0]),
    )
    bodies = [json.loads(value) for value in encoded]
    assert keys == ["a", "b"]
    assert bodies[0] == {
        "series": "a",
        "ts": [1, 2, 3],
        "step_ms": None,
        "model_version": "v1",
        "forecasts": [[5.0, None], [7.0, 8.0], [1.5, 2.0]],
        "index": [0, 1, 2],
        "input": {"partition": 0, "offset": 5},
    }
    assert bodies[1]["forecasts"] == [[3.0, 4.0]] and bodies[1]["index"] == [-1]
