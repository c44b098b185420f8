"""Strict JSON for input records: orjson first, the standard ``json`` module where they could differ.

orjson refuses what ``json`` accepted (NaN and Infinity literals, numbers that overflow a double, lone
surrogates) and reads some text differently (integers beyond 64 bits become floats; deeper nesting): such
records are read again by ``json`` so each keeps the reason the ``json`` codec gave it. Both refuse an
object that repeats a key (``duplicate_key``): ``json`` through ``object_pairs_hook``, orjson (which keeps
the last value) through an exact count of the keys written against those parsed.

>>> parse(b'{"series": "a", "value": 1}')
({'series': 'a', 'value': 1}, True)
>>> parse(b'{"series": "a", "value": NaN}')
({'series': 'a', 'value': nan}, False)
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from forecaster.errors import InvalidRecord

# A float this large can only come from orjson reading a long integer literal, which ``json`` keeps as an
# int, and the single-value check has always refused an int this large as non-finite: ``json`` decides.
_HUGE = 2.0**1023
# A record refused with more brackets than this might nest deeper than ``json`` can read: ``json`` decides.
_MAX_FAST_BRACKETS = 256


def may_be_too_deep_for_json(raw: bytes) -> bool:
    """Whether ``raw`` might nest deeper than ``json`` reads (orjson reads 1024 levels)."""
    return len(raw) >= 2 * _MAX_FAST_BRACKETS and raw.count(b"[") + raw.count(b"{") > _MAX_FAST_BRACKETS


def parse(raw: bytes | None, strict: bool = True) -> tuple[dict[str, Any], bool]:
    """The JSON object of a record, and whether orjson read it; else ``json`` did, and decided."""
    if raw is None:
        return parse_json(raw, strict), False
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return parse_json(raw, strict), False
    if type(body) is not dict or strict and _may_repeat_a_key(raw, body):  # json decides
        return parse_json(raw, strict), False
    value = body.get("value")
    if type(value) is float and abs(value) >= _HUGE:
        return parse_json(raw, strict), False
    return body, True


def parse_json(raw: bytes | None, strict: bool = True) -> dict[str, Any]:
    """The JSON object of a record read by the standard ``json`` module (NaN and Infinity accepted)."""
    if raw is None:
        raise InvalidRecord("not_json", "empty record value")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecord("not_utf8", str(exc)) from None
    try:
        body = json.loads(text, object_pairs_hook=_no_repeated_keys if strict else None)
    except (ValueError, RecursionError) as exc:
        raise InvalidRecord("not_json", str(exc)[:200]) from None
    if type(body) is not dict:
        raise InvalidRecord("not_object", f"a JSON {type(body).__name__}, not an object")
    return body


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json``'s ``object_pairs_hook``: an object, or ``duplicate_key`` naming the first repeated key."""
    body = dict(pairs)
    if len(body) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidRecord("duplicate_key", f"key {key[:64]!r} appears more than once in an object")
            seen.add(key)
    return body


def _may_repeat_a_key(raw: bytes, body: dict[str, Any]) -> bool:
    """Whether an object in ``raw`` repeats a key (True sends the record to ``json``, which says which).

    Every key is followed by exactly one ``:`` outside strings, so the keys written are the colons
    outside strings, while the parsed object holds the distinct ones. The common record (no colon inside
    a string) is settled by one count. Without a backslash every ``"`` delimits a string, so splitting
    on it leaves the text outside strings at the even places; with one, every string is read, escapes
    included. A nested object (never part of a valid record) shows as more keys than the top level
    holds and goes to ``json`` as well.
    """
    if raw.count(b":") == len(body):
        return False
    if b"\\" in raw:
        return sum(1 for colon in _STRING.findall(raw) if colon) != len(body)
    return b"".join(raw.split(b'"')[::2]).count(b":") != len(body)


# A JSON string, escapes included, and the colon that makes it a key. In valid JSON every ``"`` outside a
# string starts one, so scanning from the start reads each string once, whole.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"(\s*:)?')
