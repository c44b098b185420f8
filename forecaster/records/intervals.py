"""Prediction intervals in forecast records: ``"lower"`` and ``"upper"`` beside the forecasts.

A record of one value gets ``{"80": [h1..hH], "95": [...]}`` under each side; a record of a window of
values (``forecast_records = "window"``) one list per value under each level. Bounds are float32 written as
the shortest decimal that reads back as the same float32, null where not finite (as the forecasts).

>>> import json
>>> import numpy as np
>>> lower = np.array([[[1.0, 2.0], [0.5, 1.5]]], np.float32)  # (1 record, 2 levels, horizon 2)
>>> record = with_intervals([b'{"forecast":[1.5,2.5]}'], Bounds(["80", "95"], lower, lower + 1), [[0]])[0]
>>> json.loads(record)["upper"]
{'80': [2.0, 3.0], '95': [1.5, 2.5]}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


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
    ``rows[i]`` of ``bounds``: one list of H bounds per level, or with ``windowed`` one per row."""
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
