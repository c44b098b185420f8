"""Input records as a producer writes them (``forecaster produce``, benchmarks, tests).

orjson writes them; what it cannot write as a producer always did, ``json`` does: NaN and Infinity literals
(the service dead-letters them as ``non_finite``) and integers beyond 64 bits.

>>> encode_input("s1", 1700000000000, 21.5)
b'{"series":"s1","value":21.5,"ts":1700000000000}'
>>> encode_window("s1", [1, 2], [21.5, float("nan")])
b'{"series": "s1", "ts": [1, 2], "values": [21.5, NaN]}'
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson


def encode_input(series: str, ts: int | str | None, value: float) -> bytes:
    """One input value as record bytes."""
    body: dict[str, Any] = {"series": series, "value": value}
    if ts is not None:
        body["ts"] = ts
    return _dumps(body, finite=_finite([value]))


def encode_window(series: str, ts: Sequence[int], values: Sequence[float]) -> bytes:
    """A window of values of one series as record bytes."""
    listed = list(values)
    return _dumps({"series": series, "ts": list(ts), "values": listed}, finite=_finite(listed))


def _finite(values: list[Any]) -> bool:
    try:
        return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all())
    except (OverflowError, ValueError, TypeError):  # a huge integer (json writes it), not a number
        return False


def _dumps(body: dict[str, Any], finite: bool) -> bytes:
    """orjson; ``json`` for what orjson cannot write as the producers always did: NaN and Infinity
    literals (a consumer dead-letters them as ``non_finite``) and integers beyond 64 bits."""
    if finite:
        try:
            return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(body, default=_plain).encode()


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists (``json``'s fallback)."""
    return value.tolist()
