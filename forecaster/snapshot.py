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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from forecaster.errors import StateError
from forecaster.scaling import Scaling

if TYPE_CHECKING:
    from forecaster.state import StateTable

MAGIC = b"FCSTATE"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<HI")  # format version, header length
_CRC = struct.Struct("<I")


def expected_arrays(shape: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) of the arrays a table of ``shape`` stores per series."""
    arrays = {"h": ("float32", (shape["layers"], shape["hidden"]))}
    if shape["lstm"]:
        arrays["c"] = ("float32", (shape["layers"], shape["hidden"]))
    arrays.update(
        forecast=("float32", (shape["horizon"],)),
        stats=("float64", (shape["n_stats"],)),
        ring=("float32", (shape["window"],)),
        last_ts=("int64", ()),
        count=("int64", ()),
    )
    return arrays


def encode(shape: dict[str, Any], version: str, arrays: dict[str, np.ndarray | None]) -> bytes:
    """Serialise one series' arrays (named as in ``expected_arrays(shape)``)."""
    spec = expected_arrays(shape)
    header = {"model_version": version, "shape": shape,
              "arrays": [[name, dtype, list(dims)] for name, (dtype, dims) in spec.items()]}
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
    if fmt != FORMAT_VERSION:
        raise StateError(f"unknown state snapshot format version {fmt} (this build reads {FORMAT_VERSION})")
    start = len(MAGIC) + _PREFIX.size
    try:
        header = json.loads(body[start : start + head_len])
        version, their_shape = str(header["model_version"]), header["shape"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"state snapshot header is unreadable: {exc}") from None
    if their_shape != shape:
        raise StateError(f"state snapshot shape {their_shape} does not fit this table {shape}")
    spec = expected_arrays(shape)
    if [[n, d, list(s)] for n, (d, s) in spec.items()] != header.get("arrays"):
        raise StateError("state snapshot arrays do not match the expected layout")
    offset, arrays = start + head_len, {}
    for name, (dtype, dims) in spec.items():
        size = int(np.dtype(dtype).itemsize * np.prod(dims, dtype=np.int64))
        if offset + size > len(body):
            raise StateError("state snapshot is truncated")
        arrays[name] = np.frombuffer(body, dtype=dtype, count=size // np.dtype(dtype).itemsize,
                                     offset=offset).reshape(dims).copy()
        offset += size
    if offset != len(body):
        raise StateError("state snapshot has trailing bytes")
    return version, arrays


def table_shape(table: StateTable) -> dict[str, Any]:
    return {"layers": table.num_layers, "hidden": table.hidden_size, "horizon": table.horizon,
            "window": table.window_size, "lstm": table.lstm, "n_stats": Scaling.N_STATS}


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
            "last_ts": np.array(table.last_ts[slot], dtype=np.int64),
            "count": np.array(table.count[slot], dtype=np.int64),
        }
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
    table.last_ts[slot] = int(arrays["last_ts"])
    table.count[slot] = int(arrays["count"])
    table.dirty[slot] = True
    return version
