"""Benchmark of the wire codec: orjson against the standard-``json`` codec it replaced, in the same run.

    python bench/codec.py [--quick]

Decoding runs ``RecordDecoder.decode_batch`` (parse and validate) over a batch of records in four ways:
``json`` (the former codec: ``json`` module, a repeated key keeps its last value), ``json_strict``
(``json`` with the repeated-key check), ``orjson`` (without the check) and ``orjson_strict`` (what the
service runs). Encoding compares the former ``json`` encoders, kept below as the baseline, with
``encode_forecasts``, ``encode_forecast_groups`` and ``encode_dead_letter``. Records: single values with
epoch-ms ``ts``, single values with ISO-8601 ``ts`` (colons inside strings: the repeated-key check's slow
path), and windows of 100 values. Every figure is a median with min and max over repeats; the ways
alternate within each repeat so that load on the machine hits them alike. Prints JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson

from forecaster.errors import InvalidRecord
from forecaster.records import (
    RecordDecoder,
    encode_dead_letter,
    encode_forecast_groups,
    encode_forecasts,
    encode_input,
    encode_window,
)
from forecaster.records.output import Bounds, with_intervals

HORIZON = 12
WINDOW = 100
START_MS = 1_700_000_000_000


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def rates(seconds: list[float], records: int) -> dict[str, dict[str, float]]:
    return {
        "records_per_s": summary([records / s for s in seconds]),
        "us_per_record": summary([s / records * 1e6 for s in seconds]),
    }


def timed(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call, the best of ``calls`` (the least disturbed by other load)."""
    best = math.inf
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def compare(ways: dict[str, Callable[[], Any]], records: int, repeats: int, calls: int) -> dict[str, Any]:
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            seconds[name].append(timed(fn, calls))
    return {name: rates(s, records) for name, s in seconds.items()}


# ---- the former json encoders (the baseline) -------------------------------------------------------------


def json_encode_forecasts(series, ts, version, forecasts, partition, offset, index) -> list[bytes]:
    horizon = forecasts.shape[1]
    template = (
        '{"series":%s,"ts":%d,"model_version":'
        + json.dumps(version).replace("%", "%%")
        + ',"forecast":['
        + ",".join(["%.9g"] * horizon)
        + '],"input":{"partition":%d,"offset":%d}%s}'
    )
    names: dict[str, str] = {}
    encoded = []
    rows = zip(
        series,
        ts.tolist(),
        forecasts.tolist(),
        partition.tolist(),
        offset.tolist(),
        index.tolist(),
        strict=True,
    )
    for name, when, forecast, part, off, i in rows:
        name_json = names.get(name)
        if name_json is None:
            name_json = names[name] = json.dumps(name)
        tail = f',"index":{i}' if i >= 0 else ""
        encoded.append((template % (name_json, when, *forecast, part, off, tail)).encode())
    return encoded


def json_encode_forecast_groups(series, ts, version, forecasts, partition, offset, index, group):
    order = np.lexsort((index, group))
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    prefix = json.dumps(version)
    keys, encoded = [], []
    for rows in np.split(order, bounds):
        first = int(rows[0])
        text = (
            f'{{"series":{json.dumps(series[first])},"ts":{json.dumps(ts[rows].tolist())},'
            f'"model_version":{prefix},"forecasts":{json.dumps(forecasts[rows].tolist())},'
            f'"index":{json.dumps(index[rows].tolist())},'
            f'"input":{{"partition":{int(partition[first])},"offset":{int(offset[first])}}}}}'
        )
        keys.append(series[first])
        encoded.append(text.encode())
    return keys, encoded


def json_encode_dead_letter(record, error: InvalidRecord) -> bytes:
    body = {
        "reason": error.reason,
        "detail": error.detail,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": None if record.key is None else record.key.decode("utf-8", "backslashreplace"),
        "raw": None if record.value is None else base64.b64encode(record.value).decode("ascii"),
    }
    return json.dumps(body).encode()


# ---- the workload ----------------------------------------------------------------------------------------


def input_records(kind: str, n: int, rng: np.random.Generator) -> list[SimpleNamespace]:
    values = rng.normal(20.0, 5.0, size=(n, WINDOW)).tolist()
    records = []
    for i in range(n):
        name = f"sensor-{i % 1000:04d}"
        ts = START_MS + i * 60_000
        if kind == "single":
            raw = encode_input(name, ts, values[i][0])
        elif kind == "single_iso":
            raw = encode_input(name, datetime.fromtimestamp(ts / 1000, UTC).isoformat(), values[i][0])
        else:
            raw = encode_window(name, [ts + k * 1000 for k in range(WINDOW)], values[i])
        records.append(
            SimpleNamespace(
                topic="ts.input", partition=i % 6, offset=i, timestamp=ts, key=name.encode(), value=raw
            )
        )
    return records


def decoding(kind: str, n: int, repeats: int, calls: int, rng: np.random.Generator) -> dict[str, Any]:
    records = input_records(kind, n, rng)
    clock = lambda: START_MS / 1000 + 86_400.0  # noqa: E731
    decoders = {
        "json": RecordDecoder(clock=clock, fast=False, strict=False),
        "json_strict": RecordDecoder(clock=clock, fast=False, strict=True),
        "orjson": RecordDecoder(clock=clock, fast=True, strict=False),
        "orjson_strict": RecordDecoder(clock=clock, fast=True, strict=True),
    }
    batches = {name: decoder.decode_batch(records) for name, decoder in decoders.items()}
    for batch in batches.values():  # the same values, whichever way
        assert not batch.invalid and np.array_equal(batch.values, batches["json"].values)
    ways = {name: (lambda d=decoder: d.decode_batch(records)) for name, decoder in decoders.items()}
    result = compare(ways, n, repeats, calls)
    result["values_per_record"] = WINDOW if kind == "window100" else 1
    result["bytes_per_record"] = round(sum(len(r.value) for r in records) / n)
    return result


def forecast_columns(n: int, rng: np.random.Generator, window: int) -> dict[str, Any]:
    return {
        "series": [f"sensor-{i // window % 1000:04d}" for i in range(n)],
        "ts": START_MS + np.arange(n, dtype=np.int64) * 1000,
        "version": "20261128T150102Z-ab12cd",
        "forecasts": rng.normal(20.0, 5.0, size=(n, HORIZON)).astype(np.float32),
        "partition": np.arange(n, dtype=np.int64) // window % 6,
        "offset": np.arange(n, dtype=np.int64) // window,
        "index": np.arange(n, dtype=np.int64) % window if window > 1 else np.full(n, -1, dtype=np.int64),
    }


def encoding(n: int, repeats: int, calls: int, rng: np.random.Generator) -> dict[str, Any]:
    single = forecast_columns(n, rng, 1)
    args = list(single.values())
    windowed = forecast_columns(n, rng, WINDOW)
    group = windowed["offset"]
    group_args = [*windowed.values(), group]
    for old, new in zip(json_encode_forecasts(*args), encode_forecasts(*args), strict=True):
        a, b = json.loads(old), json.loads(new)
        assert np.array_equal(np.float32(a.pop("forecast")), np.float32(b.pop("forecast"))) and a == b
    dead = input_records("single", n, rng)
    error = InvalidRecord("non_finite", "value is NaN")
    low = single["forecasts"][:, None, :] - rng.uniform(1.0, 3.0, size=(n, 2, HORIZON)).astype(np.float32)
    bounds = Bounds(["80", "95"], low, 2 * single["forecasts"][:, None, :] - low)
    rows = [[r] for r in range(n)]
    return {
        "forecasts_one_per_value_with_intervals": compare(
            {
                "record_by_record": lambda: with_intervals(encode_forecasts(*args), bounds, rows),
                "one_pass": lambda: encode_forecasts(*args, bounds),
            },
            n,
            repeats,
            calls,
        ),
        "forecasts_one_per_value": compare(
            {"json": lambda: json_encode_forecasts(*args), "orjson": lambda: encode_forecasts(*args)},
            n,
            repeats,
            calls,
        ),
        "forecast_groups_window100": {
            **compare(
                {
                    "json": lambda: json_encode_forecast_groups(*group_args),
                    "orjson": lambda: encode_forecast_groups(*group_args),
                },
                n // WINDOW,
                repeats,
                calls,
            ),
            "values_per_record": WINDOW,
        },
        "dead_letters": compare(
            {
                "json": lambda: [json_encode_dead_letter(r, error) for r in dead],
                "orjson": lambda: [encode_dead_letter(r, error) for r in dead],
            },
            n,
            repeats,
            calls,
        ),
    }


def ratio(result: dict[str, Any], new: str, old: str) -> float:
    return round(result[new]["records_per_s"]["median"] / result[old]["records_per_s"]["median"], 2)


def extra_us(result: dict[str, Any], strict: str, lenient: str) -> float:
    return round(result[strict]["us_per_record"]["median"] - result[lenient]["us_per_record"]["median"], 3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer records and repeats (a smoke run)")
    args = parser.parse_args(argv)
    n, repeats, calls = (400, 3, 2) if args.quick else (4000, 7, 3)
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()[0]
    decode = {
        "single": decoding("single", n, repeats, calls, rng),
        "single_iso": decoding("single_iso", n, repeats, calls, rng),
        "window100": decoding("window100", max(n // 20, 20), repeats, calls, rng),
    }
    encode = encoding(n * 2 if not args.quick else n, repeats, calls, rng)
    ratios = {
        f"decode_{kind}": {
            "orjson_strict_vs_json": ratio(result, "orjson_strict", "json"),
            "orjson_vs_json": ratio(result, "orjson", "json"),
            "duplicate_check_us_per_record_orjson": extra_us(result, "orjson_strict", "orjson"),
            "duplicate_check_us_per_record_json": extra_us(result, "json_strict", "json"),
        }
        for kind, result in decode.items()
    }
    ratios.update(
        {
            f"encode_{kind}_orjson_vs_json": ratio(result, "orjson", "json")
            for kind, result in encode.items()
            if "json" in result
        }
    )
    ratios["encode_intervals_one_pass_vs_record_by_record"] = ratio(
        encode["forecasts_one_per_value_with_intervals"], "one_pass", "record_by_record"
    )
    report = {
        "bench": "codec",
        "machine": {
            "python": sys.version.split()[0],
            "orjson": orjson.__version__,
            "numpy": np.__version__,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            # Other work on the machine slows every way alike; above the CPU count, trust only the ratios.
            "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
        },
        "repeats": repeats,
        "decode": decode,
        "encode": encode,
        "ratios": ratios,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
