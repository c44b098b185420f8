"""Input streams shared by the service tests (a support module: test modules do not import each other)."""

from __future__ import annotations

import pandas as pd

from forecaster.records import encode_input, encode_window

START_MS = 1_700_000_000_000
AT_LEAST_ONCE = {"FORECASTER_SERVICE__PROCESSING_GUARANTEE": "at_least_once"}


def records_of(
    frame: pd.DataFrame, windowed: set[str] = frozenset(), window: int = 7
) -> list[tuple[bytes, bytes]]:
    """Input records keyed by series: windows of ``window`` values for ``windowed`` series, single values
    for the others; interleaved across series in time order."""
    chunks = []
    for name, group in frame.groupby("series", sort=False):
        ts, values = group["ts"].tolist(), group["value"].tolist()
        step = window if name in windowed else 1
        for lo in range(0, len(ts), step):
            if name in windowed:
                value = encode_window(name, ts[lo : lo + step], values[lo : lo + step])
            else:
                value = encode_input(name, ts[lo], values[lo])
            chunks.append((ts[lo], name.encode(), value))
    chunks.sort(key=lambda c: c[0])
    return [(key, value) for _, key, value in chunks]
