"""Versioned checkpoints: ``<dir>/<version>/`` holds ``weights.pt`` and ``manifest.json``; ``<dir>/LATEST``
names the published version; ``<dir>/HISTORY`` lists the versions published or promoted (rolled back or
forward), oldest first, so that a service whose ``LATEST`` is unusable falls back to the last version
someone chose rather than to whatever folder is newest.

``save_checkpoint(..., publish=True)`` (the trainer) writes a new version under a hidden staging folder,
validates it there, writes the new ``LATEST`` and ``HISTORY`` to temporary files, and only then renames
the version folder into place, then ``HISTORY``, then ``LATEST`` (each ``os.replace``): a failure at any
step (a full disk, say) removes what it wrote and leaves no new folder, and ``LATEST`` and ``HISTORY`` as
they were. Names starting with a dot are never versions. A write failure is a ``CheckpointError`` naming
the file and the reason, e.g. no space left on device.

``load_checkpoint`` is the one loader: it checks the manifest, the weights' sha256, the build arguments,
the shapes and the cell, that all weights are finite, and runs a smoke forecast; any failure raises
``CheckpointError`` naming the check.
Weights are read with ``torch.load(weights_only=True)``: a file cannot run code when it is loaded.

>>> import tempfile
>>> from forecaster.model import RecurrentForecaster
>>> from forecaster.scaling import Scaling
>>> root = tempfile.mkdtemp()
>>> version = save_checkpoint(root, RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2), Scaling())
>>> _ = promote(root, version)
>>> loaded = load_checkpoint(root)  # a checkpoint root resolves through LATEST
>>> loaded.version == version, loaded.model.config.cell
(True, 'gru')
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from forecaster.errors import CheckpointError
from forecaster.model import ForecasterConfig, RecurrentForecaster, build_model
from forecaster.scaling import Scaling

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
HISTORY_FILE = "HISTORY"
HISTORY_KEEP = 100  # lines of HISTORY kept (the newest)
STAGING_PREFIX = ".staging-"
# Versions are folder names: sortable UTC time to the millisecond, then a short random tag.
VERSION_PATTERN = re.compile(r"^[0-9]{8}T[0-9]{9}Z-[0-9a-f]{6}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Gate rows per hidden unit in rnn.weight_ih_l0: tells the cell the weights were trained as.
_GATES = {"rnn": 1, "gru": 3, "lstm": 4}
_MAX_WEIGHTS_BYTES = 2 * 1024**3


class WeightsEntry(BaseModel):
    """Where the weights are and what they must hash to."""

    file: Literal["weights.pt"] = WEIGHTS_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int | None = Field(default=None, ge=0, le=_MAX_WEIGHTS_BYTES)


class Manifest(BaseModel):
    """``manifest.json``: everything needed to rebuild and trust the weights, with every limit checked.

    The model's build arguments are a ``ForecasterConfig`` (a manifest written before the baseline fields
    existed builds a model without a baseline); other keys (training data, metrics, extras) ride along.
    """

    model_config = ConfigDict(extra="allow")

    format_version: Literal[1]
    version: str
    created_at: str = ""
    model: ForecasterConfig
    scaling: dict[str, Any]
    weights: WeightsEntry
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    parent: str | None = None


@dataclass
class LoadedCheckpoint:
    """A validated checkpoint: the model (eval mode, on the requested device), its version and manifest."""

    model: RecurrentForecaster
    version: str
    manifest: dict[str, Any]
    path: Path = field(default_factory=Path)

    @property
    def scaling(self) -> Scaling:
        """The scaling the model was trained with."""
        return Scaling(**self.manifest["scaling"])


@dataclass(frozen=True)
class CheckpointInfo:
    """One entry of ``list_checkpoints``: what the manifest says, without loading the weights."""

    version: str
    path: Path
    created_at: str
    latest: bool
    manifest: dict[str, Any] | None
    problem: str | None = None  # why the manifest could not be read, if it could not


def new_version(now: dt.datetime | None = None) -> str:
    """A fresh, sortable, unique version name, e.g. ``20261128T150102123Z-ab12cd``."""
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def save_checkpoint(
    root: str | os.PathLike[str],
    model: RecurrentForecaster,
    scaling: Scaling,
    *,
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    parent: str | None = None,
    extra: dict[str, Any] | None = None,
    clock: Callable[[], dt.datetime] | None = None,
    publish: bool = False,
) -> str:
    """Write ``model`` as a new checkpoint folder under ``root`` and return its version.

    ``publish`` (the trainer): validate it and publish it (``LATEST``, ``HISTORY``) in the same step, the
    folder becoming visible only together with ``LATEST``; on any failure nothing new is left that a
    service would pick up. Without ``publish`` (tools, tests) the folder appears and ``LATEST`` stays.
    """
    root = Path(root)
    staged = _stage(root, model, scaling, data, metrics, parent, extra, clock)
    try:
        if publish:
            load_checkpoint(staged)  # the one loader, before anything is visible
            _publish(root, staged.name, "publish", staged=staged)
        else:
            with _written(root / staged.name):
                os.replace(staged, root / staged.name)  # the folder appears complete or not at all
            _fsync_dir(root)
    finally:
        shutil.rmtree(staged.parent, ignore_errors=True)
    return staged.name


def _stage(
    root: Path,
    model: RecurrentForecaster,
    scaling: Scaling,
    data: dict[str, Any] | None,
    metrics: dict[str, Any] | None,
    parent: str | None,
    extra: dict[str, Any] | None,
    clock: Callable[[], dt.datetime] | None,
) -> Path:
    """A complete checkpoint folder at ``<root>/.staging-<version>-<pid>/<version>``; returns its path."""
    now = (clock or (lambda: dt.datetime.now(dt.UTC)))()
    # Step 1. Serialise the weights once; the manifest pins their hash.
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buffer)
    weights = buffer.getvalue()
    with _written(root):
        root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(root)
    version = new_version(now)
    while (root / version).exists():
        version = new_version(now)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        version=version,
        created_at=now.astimezone(dt.UTC).isoformat(),
        model=model.config,
        scaling=scaling.settings,
        weights=WeightsEntry(sha256=hashlib.sha256(weights).hexdigest(), bytes=len(weights)),
        data=data or {},
        metrics=metrics or {},
        parent=parent,
        **(extra or {}),
    ).model_dump(mode="json")
    # Step 2. Write both files into a folder named as the version, inside a hidden staging folder.
    staging = root / f"{STAGING_PREFIX}{version}-{os.getpid()}"
    try:
        with _written(staging / version):
            (staging / version).mkdir(parents=True)
        _write_file(staging / version / WEIGHTS_FILE, weights)
        _write_file(
            staging / version / MANIFEST_FILE,
            (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(),
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging / version


def promote(root: str | os.PathLike[str], version: str, *, verify: bool = True) -> LoadedCheckpoint | None:
    """Point ``LATEST`` at ``version`` (publish or roll back) and add it to ``HISTORY``; by default the
    checkpoint is validated first."""
    root = Path(root)
    _check_name(version)
    if not (root / version).is_dir():
        raise CheckpointError(f"version {version}: no such checkpoint in {root}")
    loaded = load_checkpoint(root / version) if verify else None
    _publish(root, version, "promote")
    return loaded


def _publish(root: Path, version: str, action: str, staged: Path | None = None) -> None:
    """Make ``version`` the published one: ``staged`` (a complete folder) moved into place, ``HISTORY``
    and ``LATEST`` replaced; on any failure what was done is undone."""
    pid = os.getpid()
    latest_tmp, history_tmp = root / f".{LATEST_FILE}.tmp-{pid}", root / f".{HISTORY_FILE}.tmp-{pid}"
    history_prev = root / f".{HISTORY_FILE}.prev-{pid}"
    done: list[str] = []
    try:
        # Step 1. The new pointer and history, written in full (the writes that can fill a disk).
        _write_file(latest_tmp, (version + "\n").encode())
        _write_file(history_tmp, _history_text(root, version, action).encode())
        # Step 2. The version folder into place (renames take no space).
        if staged is not None:
            with _written(root / version):
                os.replace(staged, root / version)
            done.append("folder")
        # Step 3. HISTORY, keeping the old one aside (a hard link) until LATEST is in place.
        if (root / HISTORY_FILE).exists():
            with _written(history_prev):
                os.link(root / HISTORY_FILE, history_prev)
            done.append("history_prev")
        with _written(root / HISTORY_FILE):
            os.replace(history_tmp, root / HISTORY_FILE)
        done.append("history")
        # Step 4. LATEST last: from here on the version is published.
        with _written(root / LATEST_FILE):
            os.replace(latest_tmp, root / LATEST_FILE)
        done.append("latest")
        _fsync_dir(root)
    except BaseException:
        if "latest" not in done:
            if "history" in done:
                if "history_prev" in done:
                    with contextlib.suppress(OSError):
                        os.replace(history_prev, root / HISTORY_FILE)
                else:
                    (root / HISTORY_FILE).unlink(missing_ok=True)
            if "folder" in done and staged is not None:
                with contextlib.suppress(OSError):
                    os.replace(root / version, staged)
        raise
    finally:
        for leftover in (latest_tmp, history_tmp, history_prev):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)


def _history_text(root: Path, version: str, action: str) -> str:
    """HISTORY with ``version`` appended (the newest ``HISTORY_KEEP`` lines); a first HISTORY starts with the
    version ``LATEST`` names now, so that a rollback can go back to it."""
    path = root / HISTORY_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
        with contextlib.suppress(CheckpointError):
            current = latest_version(root)
            if current is not None:
                lines.append(f"{current}\t\tfound")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{HISTORY_FILE}: cannot be read: {exc}") from None
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    lines.append(f"{version}\t{now}\t{action}")
    return "\n".join(lines[-HISTORY_KEEP:]) + "\n"


def read_history(root: str | os.PathLike[str]) -> list[tuple[str, str, str]]:
    """``(version, time, action)`` of every ``HISTORY`` line, oldest first; lines that do not name a version
    are skipped. Raises ``FileNotFoundError`` without a HISTORY."""
    try:
        text = (Path(root) / HISTORY_FILE).read_text(encoding="utf-8")
    except (UnicodeDecodeError, IsADirectoryError, PermissionError):
        return []
    rows = [(line.split("\t") + ["", ""])[:3] for line in text.splitlines()]
    return [(v.strip(), at, action) for v, at, action in rows if _SAFE_NAME.match(v.strip())]


def chosen_versions(root: str | os.PathLike[str]) -> list[str] | None:
    """The versions ``HISTORY`` records, the most recently chosen first, each once; None without a HISTORY
    (a folder written before it existed)."""
    try:
        history = read_history(root)
    except FileNotFoundError:
        return None
    return list(dict.fromkeys(version for version, _, _ in reversed(history)))


def _remove_abandoned(root: Path) -> None:
    """Staging folders and temporary files of processes that are gone (a crash or kill mid-write)."""
    for path in root.glob(".*"):
        match = re.search(r"-(\d+)$", path.name)
        ours = path.name.startswith((STAGING_PREFIX, ".tmp-", f".{LATEST_FILE}.", f".{HISTORY_FILE}."))
        if ours and match and not _alive(int(match.group(1))):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pointer(root: str | os.PathLike[str], name: str) -> str | None:
    """The stripped text of the pointer file ``name`` (``LATEST``, ``CANDIDATE``), None when it is absent."""
    try:
        return (Path(root) / name).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{name}: cannot be read: {exc}") from None


def latest_version(root: str | os.PathLike[str]) -> str | None:
    """The version ``LATEST`` names, or None when nothing is published."""
    text = read_pointer(root, LATEST_FILE)
    if text is not None:
        _check_name(text)
    return text


def list_checkpoints(root: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Every checkpoint folder under ``root``, oldest first, with its manifest (weights not loaded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    try:
        latest = latest_version(root)
    except CheckpointError:
        latest = None
    found = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and _SAFE_NAME.match(p.name)):
        manifest, problem = None, None
        try:
            manifest, _ = _read_manifest(path)
        except CheckpointError as exc:
            problem = str(exc)
        created = str(manifest.get("created_at", "")) if manifest else ""
        found.append(CheckpointInfo(path.name, path, created, path.name == latest, manifest, problem))
    return found


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load and validate one checkpoint folder (or, given a checkpoint root, the one LATEST names)."""
    path = Path(path)
    if (path / LATEST_FILE).is_file() and not (path / MANIFEST_FILE).exists():
        version = latest_version(path)
        if version is None:  # pragma: no cover - is_file() just said it exists
            raise CheckpointError(f"{path}: nothing published")
        path = path / version
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    # Step 1. The manifest: readable, a known format, every field within its limits, naming this folder.
    manifest, checked = _read_manifest(path)
    version = checked.version
    if version != path.name:
        raise CheckpointError(f"{path.name}: manifest version {version!r} does not match the folder")
    _check_scaling(checked.scaling)
    # Step 2. The weights file: present, the size and sha256 the manifest pins.
    weights = _read_weights(path, checked.weights)
    # Step 3. Deserialise tensors only: weights_only refuses any object that would run code.
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{version}: weights cannot be read as tensors: {first[:300]}") from None
    # Step 4. The tensors match the model the manifest describes (names, cell, shapes) and are finite.
    model = build_model(checked.model)
    _check_state(version, state, model)
    model.load_state_dict(state, strict=True)
    model.eval()
    # Step 5. A smoke forecast: forward runs, gives finite values, and its one-step case agrees.
    _smoke(version, model)
    model.to(device)
    return LoadedCheckpoint(model=model, version=version, manifest=manifest, path=path)


def _read_manifest(path: Path) -> tuple[dict[str, Any], Manifest]:
    """The manifest as written (a dict) and as checked (a ``Manifest``), or ``CheckpointError`` in one line."""
    try:
        raw = (path / MANIFEST_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: manifest.json is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path.name}: manifest.json cannot be read: {exc}") from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path.name}: manifest.json is not JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path.name}: manifest.json is not an object")
    try:
        return manifest, Manifest.model_validate(manifest, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        shown = f"={first['input']!r}" if first["type"] != "missing" else ""
        raise CheckpointError(f"{path.name}: manifest: {where}{shown}: {first['msg']}"[:400]) from None


def _check_scaling(settings: Any) -> Scaling:
    if not isinstance(settings, dict):
        raise CheckpointError("manifest: scaling settings are missing")
    try:
        return Scaling(**settings)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"manifest: bad scaling settings: {exc}") from None


def _read_weights(path: Path, entry: WeightsEntry) -> bytes:
    file = path / WEIGHTS_FILE
    try:
        size = file.stat().st_size
        if size > _MAX_WEIGHTS_BYTES:
            raise CheckpointError(f"{path.name}: weights file is {size} bytes, over the limit")
        data = file.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: weights file is missing") from None
    except OSError as exc:
        raise CheckpointError(f"{path.name}: weights file cannot be read: {exc}") from None
    if entry.bytes is not None and entry.bytes != len(data):
        raise CheckpointError(
            f"{path.name}: weights file is {len(data)} bytes, manifest says {entry.bytes} (truncated?)"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise CheckpointError(f"{path.name}: weights sha256 {digest[:12]}... does not match the manifest's")
    return data


def _check_state(version: str, state: Any, model: RecurrentForecaster) -> None:
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{version}: weights are not a dict of named tensors")
    expected = model.state_dict()
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise CheckpointError(
            f"{version}: weights do not match the manifest's model: missing {missing}, unexpected {unexpected}"
        )
    first = state.get("rnn.weight_ih_l0")
    if isinstance(first, torch.Tensor) and first.dim() == 2 and first.shape[0] % model.hidden_size == 0:
        gates = first.shape[0] // model.hidden_size
        trained = next((cell for cell, g in _GATES.items() if g == gates), f"{gates}-gate")
        if trained != model.cell:
            raise CheckpointError(
                f"{version}: weights are of a {trained} cell, the manifest says {model.cell}"
            )
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{version}: weight {name} is not a tensor")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{version}: weight {name} has shape {tuple(tensor.shape)}, "
                f"the manifest's model needs {tuple(expected[name].shape)}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{version}: weight {name} is {tensor.dtype}, not floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{version}: weight {name} has NaN or infinite values")


def _smoke(version: str, model: RecurrentForecaster) -> None:
    steps = 8
    x = torch.linspace(-1.0, 1.0, 2 * steps * model.input_size).reshape(2, steps, model.input_size)
    try:
        with torch.no_grad():
            y, _ = model(x)  # (2, steps, horizon)
            y1, _ = model.step(x[:, 0], model.initial_state(2))  # (2, horizon)
    except Exception as exc:
        raise CheckpointError(f"{version}: smoke forecast failed: {exc}") from None
    if tuple(y.shape) != (2, steps, model.horizon) or not bool(torch.isfinite(y).all()):
        raise CheckpointError(f"{version}: smoke forecast is not finite or has the wrong shape")
    if not math.isclose(float((y[:, 0] - y1).abs().max()), 0.0, abs_tol=1e-4):
        raise CheckpointError(f"{version}: smoke forecast: one step disagrees with the full forward pass")


def _check_name(version: str) -> None:
    if not _SAFE_NAME.match(version or ""):
        raise CheckpointError(f"{version!r} is not a valid checkpoint version name")


def _write_file(path: Path, data: bytes) -> None:
    with _written(path), open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def _written(path: Path) -> Iterator[None]:
    """Turn a failed write (no space left, quota, read-only, ...) into a ``CheckpointError`` naming ``path``."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CheckpointError(
            f"cannot write {path}: {reason} (errno {exc.errno}); nothing was published"
        ) from exc


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
