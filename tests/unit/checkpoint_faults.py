"""Ways to spoil a saved checkpoint, each with the words its refusal must contain (checkpoint and
hot-swap tests share them)."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import torch

from forecaster.checkpoints.store import MANIFEST_FILE, WEIGHTS_FILE


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST_FILE).read_text())


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def _replace_weights(path: Path, data: bytes) -> None:
    """New weight bytes with a manifest that vouches for them (a tamperer who also fixes the hash)."""
    (path / WEIGHTS_FILE).write_bytes(data)
    manifest = _manifest(path)
    manifest["weights"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    _write_manifest(path, manifest)


def _saved_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / WEIGHTS_FILE, weights_only=True)


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class CodeRunningPayload:
    """Unpickling this runs ``exec`` with code that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def truncate_weights(path: Path) -> None:
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def truncate_weights_rehashed(path: Path) -> None:
    _replace_weights(path, (path / WEIGHTS_FILE).read_bytes()[:200])


def nan_weights(path: Path) -> None:
    state = _saved_state(path)
    state["head.weight"][0, 0] = float("nan")
    _replace_weights(path, _torch_bytes(state))


def wrong_shapes(path: Path) -> None:
    manifest = _manifest(path)
    manifest["model"]["hidden_size"] += 1
    _write_manifest(path, manifest)


def wrong_cell(path: Path) -> None:
    manifest = _manifest(path)
    manifest["model"]["cell"] = "lstm"
    _write_manifest(path, manifest)


def hash_mismatch(path: Path) -> None:
    manifest = _manifest(path)
    manifest["weights"]["sha256"] = "0" * 64
    _write_manifest(path, manifest)


def flipped_byte(path: Path) -> None:
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / WEIGHTS_FILE).write_bytes(bytes(data))


def missing_manifest(path: Path) -> None:
    (path / MANIFEST_FILE).unlink()


def manifest_not_json(path: Path) -> None:
    (path / MANIFEST_FILE).write_text("{not json")


def absurd_build_args(path: Path) -> None:
    manifest = _manifest(path)
    manifest["model"]["hidden_size"] = 10**9
    _write_manifest(path, manifest)


def unknown_format(path: Path) -> None:
    manifest = _manifest(path)
    manifest["format_version"] = 99
    _write_manifest(path, manifest)


def renamed_version(path: Path) -> None:
    manifest = _manifest(path)
    manifest["version"] = "20000101T000000000Z-000000"
    _write_manifest(path, manifest)


def missing_weights(path: Path) -> None:
    (path / WEIGHTS_FILE).unlink()


def weights_not_tensors(path: Path) -> None:
    state = dict(_saved_state(path))
    state["head.bias"] = [1.0, 2.0, 3.0]
    _replace_weights(path, _torch_bytes(state))


def extra_weights(path: Path) -> None:
    state = dict(_saved_state(path))
    state["backdoor"] = torch.zeros(1)
    _replace_weights(path, _torch_bytes(state))


# name -> (spoil, words the error must contain)
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated weights": (truncate_weights, "truncated"),
    "truncated weights, hash fixed": (truncate_weights_rehashed, "cannot be read"),
    "NaN weights": (nan_weights, "NaN"),
    "wrong shapes": (wrong_shapes, "shape"),
    "wrong cell": (wrong_cell, "gru cell"),
    "manifest hash mismatch": (hash_mismatch, "sha256"),
    "flipped byte": (flipped_byte, "sha256"),
    "missing manifest": (missing_manifest, "manifest.json is missing"),
    "manifest not JSON": (manifest_not_json, "not JSON"),
    "absurd build args": (absurd_build_args, "hidden_size"),
    "unknown format": (unknown_format, "format_version"),
    "version mismatch": (renamed_version, "does not match the folder"),
    "missing weights": (missing_weights, "weights file is missing"),
    "weights not tensors": (weights_not_tensors, "head.bias is not a tensor"),
    "extra weights": (extra_weights, "unexpected ['backdoor']"),
}
