"""The binary format of one series' state: magic, format version, a JSON header, raw arrays, CRC32.

No pickle: arrays are written with ``ndarray.tobytes`` and read back with ``np.frombuffer`` against
the shapes and dtypes the reading table expects, so a snapshot can only ever fill those arrays.
``take`` / ``put`` copy one series between a ``StateTable`` and this format.

Layout: ``MAGIC`` | u16 format version | u32 header length | header (UTF-8 JSON: model version, table
shape, array names/dtypes/shapes) | array bytes in header order | u32 CRC32 of everything before it.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from forecaster.errors import StateError
from forecaster.scaling import Scaling
from forecaster.timegrid import LEARN_SPACINGS

if TYPE_CHECKING:
    from forecaster.engine.state import StateTable

MAGIC = b"FCSTATE"
# 2: the ring of values in data units (a model baseline reads them); 3: the interval calibrator's state;
# 4: the per-series choice's state; 5: the half-widths of the bounds awaiting their values; 6: the series'
# period, its first timestamps (while it learns its period) and which retained values were imputed
FORMAT_VERSION = 6
TIME_GRID = ("period", "times", "gaps")  # read from format 6 on; a format 5 snapshot leaves them as new
CALIBRATOR = (
    "past",
    "past_scale",
    "past_half",
    "mean_err",
    "mult",
)  # per-slot tensors of the interval calibrator
CHOOSER = ("model_past", "choice_err", "choice_sq", "choice_n")  # per-slot tensors of the per-series choice
_PREFIX = struct.Struct("<HI")  # format version, header length
_CRC = struct.Struct("<I")


def expected_arrays(
    shape: dict[str, Any], fmt: int = FORMAT_VERSION
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) of the arrays a table of ``shape`` stores per series (in format ``fmt``)."""
    arrays = {"h": ("float32", (shape["layers"], shape["hidden"]))}
    if shape["lstm"]:
        arrays["c"] = ("float32", (shape["layers"], shape["hidden"]))
    arrays.update(
        forecast=("float32", (shape["horizon"],)),
        stats=("float64", (shape["n_stats"],)),
        ring=("float32", (shape["window"],)),
        values=("float32", (shape["window"],)),
        last_ts=("int64", ()),
        count=("int64", ()),
    )
    if fmt >= 6:
        arrays.update(
            period=("int64", ()),
            times=("int64", (LEARN_SPACINGS + 1,)),
            gaps=("bool", (shape["window"],)),
        )
    if shape["levels"]:
        h, lv = shape["horizon"], shape["levels"]
        arrays.update(
            past=("float32", (h, h)),
            past_scale=("float32", (h,)),
            past_half=("float32", (h, lv, h)),
            mean_err=("float32", (h,)),
            mult=("float32", (lv, h)),
            score_from=("int64", ()),
        )
    if shape["candidates"]:
        h, c = shape["horizon"], shape["candidates"]
        arrays.update(
            model_past=("float32", (h, h)),
            choice_err=("float32", (c, h)),
            choice_sq=("float32", (c - 1, h)),
            choice_n=("float32", (h,)),
            choose_from=("int64", ()),
        )
    return arrays


def encode(shape: dict[str, Any], version: str, arrays: dict[str, np.ndarray | None]) -> bytes:
    """Serialise one series' arrays (named as in ``expected_arrays(shape)``)."""
    spec = expected_arrays(shape)
    header = {
        "model_version": version,
        "shape": shape,
        "arrays": [[name, dtype, list(dims)] for name, (dtype, dims) in spec.items()],
    }
    head = json.dumps(header, sort_keys=True).encode()
    parts = [MAGIC, _PREFIX.pack(FORMAT_VERSION, len(head)), head]
    for name, (dtype, dims) in spec.items():
        a = np.asarray(arrays[name], dtype=dtype)
        if a.shape != dims:
            raise StateError(f"array {name} has shape {a.shape}, expected {dims}")
        parts.append(a.tobytes())
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def decode(data: bytes, shape: dict[str, Any]) -> tuple[str, dict[str, np.ndarray]]:
    """Parse a snapshot for a table of ``shape``: (model version, arrays). Raises ``StateError``."""
    data = bytes(data)
    if len(data) < len(MAGIC) + _PREFIX.size + _CRC.size or not data.startswith(MAGIC):
        raise StateError("not a state snapshot (bad magic or too short)")
    body, (crc,) = data[: -_CRC.size], _CRC.unpack(data[-_CRC.size :])
    if zlib.crc32(body) != crc:
        raise StateError("state snapshot is corrupt (checksum mismatch)")
    fmt, head_len = _PREFIX.unpack_from(body, len(MAGIC))
    if fmt not in (5, FORMAT_VERSION):
        raise StateError(
            f"unknown state snapshot format version {fmt} (this build reads 5 and {FORMAT_VERSION})"
        )
    start = len(MAGIC) + _PREFIX.size
    version, their_shape, layout = _header(body[start : start + head_len])
    if their_shape != shape:
        raise StateError(f"state snapshot shape {their_shape} does not fit this table {shape}")
    expected, fields = _fields(tuple(sorted(shape.items())), fmt)
    if layout != expected:
        raise StateError("state snapshot arrays do not match the expected layout")
    offset, arrays = start + head_len, {}
    for name, dtype, dims, count, size in fields:
        if offset + size > len(body):
            raise StateError("state snapshot is truncated")
        arrays[name] = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(dims).copy()
        offset += size
    if offset != len(body):
        raise StateError("state snapshot has trailing bytes")
    return version, arrays


@lru_cache(maxsize=16)
def _fields(
    shape: tuple[tuple[str, Any], ...], fmt: int = FORMAT_VERSION
) -> tuple[list[list[Any]], tuple[tuple[str, np.dtype, tuple[int, ...], int, int], ...]]:
    """The header layout a table of ``shape`` expects, and (name, dtype, dims, count, bytes) per array."""
    spec = expected_arrays(dict(shape), fmt)
    fields = []
    for name, (dtype, dims) in spec.items():
        count = int(np.prod(dims, dtype=np.int64))
        fields.append((name, np.dtype(dtype), dims, count, count * np.dtype(dtype).itemsize))
    return [[n, d, list(s)] for n, (d, s) in spec.items()], tuple(fields)


@lru_cache(maxsize=64)
def _header(head: bytes) -> tuple[str, Any, Any]:
    """(model version, shape, array layout) of a header; cached: a restore reads thousands alike."""
    try:
        header = json.loads(head)
        return str(header["model_version"]), header["shape"], header.get("arrays")
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"state snapshot header is unreadable: {exc}") from None


def table_shape(table: StateTable) -> dict[str, Any]:
    return {
        "layers": table.num_layers,
        "hidden": table.hidden_size,
        "horizon": table.horizon,
        "window": table.window_size,
        "lstm": table.lstm,
        "n_stats": Scaling.N_STATS,
        "levels": table.levels,
        "candidates": table.candidates,
    }


def take(table: StateTable, series: str) -> bytes:
    """Snapshot of one resident series of ``table``."""
    slot = table.slots.get(series)
    if slot is None:
        raise StateError(f"series {series!r} is not resident")
    with torch.inference_mode():
        arrays = {
            "h": table.h[:, slot].cpu().numpy(),
            "c": table.c[:, slot].cpu().numpy() if table.c is not None else None,
            "forecast": table.forecast[slot].cpu().numpy(),
            "stats": table.stats[slot].cpu().numpy(),
            "ring": table.ring[slot].cpu().numpy(),
            "values": table.values[slot].cpu().numpy(),
            "last_ts": np.array(table.last_ts[slot], dtype=np.int64),
            "count": np.array(table.count[slot], dtype=np.int64),
            "period": np.array(table.period[slot], dtype=np.int64),
            "times": table.times[slot],
            "gaps": table.gaps[slot],
        }
        for name in CALIBRATOR if table.levels else ():
            arrays[name] = getattr(table, name)[slot].cpu().numpy()
        if table.levels:
            arrays["score_from"] = np.array(table.score_from[slot], dtype=np.int64)
        for name in CHOOSER if table.candidates else ():
            arrays[name] = getattr(table, name)[slot].cpu().numpy()
        if table.candidates:
            arrays["choose_from"] = np.array(table.choose_from[slot], dtype=np.int64)
    return encode(table_shape(table), table.version, arrays)


def put(table: StateTable, series: str, data: bytes, now: float) -> str:
    """Load a snapshot into ``series``' slot of ``table`` (allocating one); returns its model version."""
    version, arrays = decode(data, table_shape(table))
    (slot,), _ = table.acquire([series], now)
    device = table.device
    with torch.inference_mode():
        idx = torch.tensor([slot], device=device)
        table.h.index_copy_(1, idx, torch.from_numpy(arrays["h"]).to(device)[:, None])
        if table.c is not None:
            table.c.index_copy_(1, idx, torch.from_numpy(arrays["c"]).to(device)[:, None])
        table.forecast[slot] = torch.from_numpy(arrays["forecast"]).to(device)
        table.stats[slot] = torch.from_numpy(arrays["stats"]).to(device)
        table.ring[slot] = torch.from_numpy(arrays["ring"]).to(device)
        table.values[slot] = torch.from_numpy(arrays["values"]).to(device)
        for name in (CALIBRATOR if table.levels else ()) + (CHOOSER if table.candidates else ()):
            getattr(table, name)[slot] = torch.from_numpy(arrays[name]).to(device)
    if table.levels:
        table.score_from[slot] = int(arrays["score_from"])
    if table.candidates:
        table.choose_from[slot] = int(arrays["choose_from"])
    table.last_ts[slot] = int(arrays["last_ts"])
    table.count[slot] = int(arrays["count"])
    _put_time_grid(table, np.array([slot]), [arrays])
    table.dirty[slot] = True
    return version


def _put_time_grid(table: StateTable, slots: np.ndarray, decoded: list[dict[str, np.ndarray]]) -> None:
    """The period, first timestamps and imputed marks of restored series; a format 5 snapshot has none:
    its series take the table's default period and learn as new ones do."""
    for slot, arrays in zip(slots.tolist(), decoded, strict=True):
        if "period" in arrays:
            table.period[slot] = int(arrays["period"])
            table.times[slot] = arrays["times"]
            table.gaps[slot] = arrays["gaps"]
            table.learning[slot] = table.learn and bool(arrays["times"][-1] == np.iinfo(np.int64).min)


def take_many(table: StateTable, series: Sequence[str]) -> list[bytes]:
    """Snapshots of many resident series at once (one gather per array); each equals ``take``'s bytes."""
    if not series:
        return []
    missing = [s for s in series if s not in table.slots]
    if missing:
        raise StateError(f"series {missing[0]!r} is not resident")
    slots = np.array([table.slots[s] for s in series], dtype=np.int64)
    with torch.inference_mode():
        idx = torch.from_numpy(slots).to(table.device)
        per_series = [table.h.index_select(1, idx).transpose(0, 1)]  # (n, layers, hidden)
        if table.c is not None:
            per_series.append(table.c.index_select(1, idx).transpose(0, 1))  # (n, layers, hidden)
        per_series += [
            t.index_select(0, idx) for t in (table.forecast, table.stats, table.ring, table.values)
        ]
        calibrator = [getattr(table, name).index_select(0, idx) for name in CALIBRATOR if table.levels]
        chooser = [getattr(table, name).index_select(0, idx) for name in CHOOSER if table.candidates]
        arrays = [np.ascontiguousarray(t.cpu().numpy()) for t in per_series]
        calibrator = [np.ascontiguousarray(t.cpu().numpy()) for t in calibrator]
        chooser = [np.ascontiguousarray(t.cpu().numpy()) for t in chooser]
    arrays += [table.last_ts[slots].astype(np.int64), table.count[slots].astype(np.int64)]  # header order
    arrays += [table.period[slots], table.times[slots], table.gaps[slots]]
    if table.levels:
        arrays += [*calibrator, table.score_from[slots].astype(np.int64)]
    if table.candidates:
        arrays += [*chooser, table.choose_from[slots].astype(np.int64)]
    spec = expected_arrays(table_shape(table))
    header = {
        "model_version": table.version,
        "shape": table_shape(table),
        "arrays": [[name, dtype, list(dims)] for name, (dtype, dims) in spec.items()],
    }
    head = json.dumps(header, sort_keys=True).encode()
    prefix = MAGIC + _PREFIX.pack(FORMAT_VERSION, len(head)) + head
    # Every series' arrays side by side as bytes, one row each (C order, as ``take`` writes them); the
    # checksum runs on from the prefix's.
    n = len(series)
    rows = np.concatenate([np.ascontiguousarray(a).reshape(n, -1).view(np.uint8) for a in arrays], axis=1)
    width, blob, seed = rows.shape[1], rows.tobytes(), zlib.crc32(prefix)
    out = []
    for lo in range(0, n * width, width):
        part = blob[lo : lo + width]
        out.append(b"".join((prefix, part, _CRC.pack(zlib.crc32(part, seed)))))
    return out


def put_many(
    table: StateTable, items: Sequence[tuple[str, bytes]], now: float, keep: Iterable[str] = ()
) -> tuple[list[str], list[str], list[tuple[str, StateError]]]:
    """Load many snapshots (distinct series) in one batched write; the loaded series are not marked dirty
    (their state is what the snapshots say). Making room never evicts a series of ``keep`` (those about
    to step). Returns (series loaded, their model versions, refused)."""
    shape = table_shape(table)
    names: list[str] = []
    versions: list[str] = []
    decoded: list[dict[str, np.ndarray]] = []
    refused: list[tuple[str, StateError]] = []
    for series, data in items:
        try:
            version, arrays = decode(data, shape)
        except StateError as exc:
            refused.append((series, exc))
            continue
        names.append(series)
        versions.append(version)
        decoded.append(arrays)
    if not names:
        return names, versions, refused
    slots, _ = table.acquire(names, now, keep)
    device = table.device

    def stacked(name: str, axis: int = 0) -> torch.Tensor:
        return torch.from_numpy(np.stack([a[name] for a in decoded], axis=axis)).to(device)

    with torch.inference_mode():
        idx = torch.from_numpy(slots).to(device)
        table.h.index_copy_(1, idx, stacked("h", axis=1))  # (layers, n, hidden)
        if table.c is not None:
            table.c.index_copy_(1, idx, stacked("c", axis=1))
        chooser = CHOOSER if table.candidates else ()
        for name in ("forecast", "stats", "ring", "values") + (CALIBRATOR if table.levels else ()) + chooser:
            getattr(table, name).index_copy_(0, idx, stacked(name))
    if table.levels:
        table.score_from[slots] = [int(a["score_from"]) for a in decoded]
    if table.candidates:
        table.choose_from[slots] = [int(a["choose_from"]) for a in decoded]
    table.last_ts[slots] = [int(a["last_ts"]) for a in decoded]
    table.count[slots] = [int(a["count"]) for a in decoded]
    _put_time_grid(table, slots, decoded)
    table.dirty[slots] = False
    return names, versions, refused
