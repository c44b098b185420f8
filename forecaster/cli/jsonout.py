"""JSON the commands print: strict (no ``NaN`` or ``Infinity``, which strict parsers refuse), a figure
that does not exist (a MASE over no points, a constant series' scale) written as ``null`` as the
manifests and the wire formats write it.

>>> print(dumps({"mase": float("nan"), "mae": [1.5, float("inf")], "n": 3}))
{"mase": null, "mae": [1.5, null], "n": 3}
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every float that is not finite replaced by None (dicts, lists and tuples walked)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(value) for value in obj]
    return obj


def dumps(obj: Any, **options: Any) -> str:
    """``json.dumps`` of ``finite(obj)``, refusing anything else that is not strict JSON."""
    return json.dumps(finite(obj), allow_nan=False, **options)
