"""Dead letters: every field as documented, and never larger than the producer may send."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import pytest

from forecaster.errors import InvalidRecord
from forecaster.records import DEAD_LETTER_MAX_BYTES, dead_letter_max_bytes, encode_dead_letter

MB = 1 << 20
COORDINATES = {"topic": "ts.input", "partition": 4, "offset": 123_456_789, "timestamp": 1_700_000_000_000}


def record(value: bytes | None, key: bytes | None = b"s1"):
    return SimpleNamespace(**COORDINATES, key=key, value=value)


def letter(rec, detail: str = "value is NaN", max_bytes: int = DEAD_LETTER_MAX_BYTES) -> tuple[bytes, dict]:
    encoded = encode_dead_letter(rec, InvalidRecord("non_finite", detail), max_bytes=max_bytes)
    return encoded, json.loads(encoded)


def assert_coordinates(body: dict) -> None:
    assert body["reason"] == "non_finite"
    assert {name: body[name] for name in COORDINATES} == COORDINATES


def test_a_record_that_fits_is_carried_whole_without_flags():
    raw = b'{"series": "s1", "value": NaN}'
    encoded, body = letter(record(raw))
    assert_coordinates(body)
    assert body["detail"] == "value is NaN" and body["key"] == "s1"
    assert base64.b64decode(body["raw"]) == raw
    assert not {"raw_truncated", "raw_bytes", "key_truncated"} & set(body)


@pytest.mark.parametrize("size", [DEAD_LETTER_MAX_BYTES // 4 * 3 - 100, 786 * 1024, MB, 3 * MB + 7, 8 * MB])
def test_a_record_up_to_several_mb_is_cut_to_fit_and_says_so(size):
    raw = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    encoded, body = letter(record(raw))
    assert len(encoded) <= DEAD_LETTER_MAX_BYTES
    assert_coordinates(body)
    assert body["detail"] == "value is NaN" and body["key"] == "s1"
    kept = base64.b64decode(body["raw"])
    assert raw.startswith(kept)
    if len(kept) < size:
        assert body["raw_truncated"] is True and body["raw_bytes"] == size
        assert len(encoded) > DEAD_LETTER_MAX_BYTES - 8  # the room is used, to a base64 quantum
    else:
        assert "raw_truncated" not in body


@pytest.mark.parametrize("max_bytes", [1024, 4096, 65_536, DEAD_LETTER_MAX_BYTES])
@pytest.mark.parametrize(
    ("key", "detail"),
    [
        (b"k" * (2 * MB), "short"),  # a huge key
        (b"s1", "d" * (2 * MB)),  # a huge detail
        (b"\x00\x01\xff" * MB, "\u00e9\u0001" * MB),  # both, and escaped on the wire
        (None, "x"),
    ],
)
def test_huge_keys_and_details_are_cut_too_and_the_letter_always_fits(max_bytes, key, detail):
    raw = b"r" * (2 * MB)
    encoded, body = letter(record(raw, key=key), detail=detail, max_bytes=max_bytes)
    assert len(encoded) <= max_bytes
    assert_coordinates(body)
    assert body["raw_truncated"] is True and body["raw_bytes"] == len(raw)
    assert raw.startswith(base64.b64decode(body["raw"]))
    if key is not None:
        text = key.decode("utf-8", "backslashreplace")
        assert text.startswith(body["key"]) and body.get("key_truncated", False) == (body["key"] != text)
    assert detail.startswith(body["detail"].removesuffix("..."))


def test_a_record_without_a_value_or_key_is_written_with_nulls():
    _, body = letter(record(None, key=None))
    assert body["raw"] is None and body["key"] is None


@pytest.mark.parametrize("value", [None, b"small"])
def test_a_raw_value_that_fits_beside_a_cut_key_is_whole_and_not_flagged(value):
    encoded, body = letter(record(value, key=b"k" * (2 * MB)), max_bytes=4096)
    assert len(encoded) <= 4096 and body["key_truncated"] is True
    assert body["raw"] == (None if value is None else base64.b64encode(value).decode())
    assert "raw_truncated" not in body and "raw_bytes" not in body


def test_a_limit_too_small_for_any_dead_letter_is_refused():
    with pytest.raises(ValueError, match="too small"):
        encode_dead_letter(record(b"x"), InvalidRecord("not_json", "x"), max_bytes=100)


def test_the_limit_for_a_keyed_dead_letter_leaves_room_for_the_key_and_headers():
    assert dead_letter_max_bytes(MB, b"k" * 1000) == MB - 1000 - 512
    assert dead_letter_max_bytes(MB, None) == MB - 512
    assert dead_letter_max_bytes(4096, b"k" * MB) == 1024  # never below what a dead letter needs


def test_a_lone_surrogate_in_a_detail_is_still_written_as_json():
    _, body = letter(record(b"x"), detail="series \ud800")
    assert body["detail"] == "series \ud800"
