"""Champion and challenger in the checkpoint folder: ``CANDIDATE`` names the version on trial, each
decision is written into that version's manifest.

With ``checkpoints.promotion = shadow`` the trainer does not publish a better checkpoint: it writes the
folder and points ``CANDIDATE`` at it (``propose``). ``LATEST`` keeps naming the champion, the version
every instance serves (and starts with). A service in shadow mode steps the candidate beside the champion
(``forecaster.engine.shadow``) and decides: ``decide(..., "promoted")`` records the decision and publishes
the version (``LATEST``, ``HISTORY``), so every instance swaps to it; ``"rejected"`` records it and clears
``CANDIDATE``. ``forecaster checkpoints promote/reject VERSION`` decide by hand the same way. A version
that carries a decision is never put on trial again; the first decision taken (by any instance or by
hand) stands.

The decision in the manifest (``promotion``)::

    {"decision": "promoted" | "rejected", "by": "shadow" | "hand", "at": ISO time, "champion": VERSION,
     "detail": {...the comparison's figures...}}

>>> import tempfile
>>> from forecaster.checkpoints.store import save_checkpoint
>>> from forecaster.model import RecurrentForecaster
>>> from forecaster.scaling import Scaling
>>> root = tempfile.mkdtemp()
>>> version = save_checkpoint(root, RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2), Scaling())
>>> propose(root, version); candidate_version(root) == version
True
>>> decide(root, version, "rejected", by="hand")["decision"], candidate_version(root)
('rejected', None)
>>> decision_of(root, version)["by"]
'hand'
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any, Literal

from forecaster.checkpoints.store import (
    MANIFEST_FILE,
    _check_name,
    _fsync_dir,
    _read_manifest,
    _write_file,
    _written,
    latest_version,
    promote,
    read_pointer,
)
from forecaster.errors import CheckpointError

CANDIDATE_FILE = "CANDIDATE"
DECISIONS = ("promoted", "rejected")


def candidate_version(root: str | os.PathLike[str]) -> str | None:
    """The version ``CANDIDATE`` names, or None when none is on trial."""
    text = read_pointer(root, CANDIDATE_FILE)
    if not text:
        return None
    _check_name(text)
    return text


def propose(root: str | os.PathLike[str], version: str) -> None:
    """Put ``version`` (a complete checkpoint folder) on trial: ``CANDIDATE`` names it."""
    root = Path(root)
    _check_name(version)
    if not (root / version).is_dir():
        raise CheckpointError(f"version {version}: no such checkpoint in {root}")
    _replace(root / CANDIDATE_FILE, version + "\n")


def decision_of(root: str | os.PathLike[str], version: str) -> dict[str, Any] | None:
    """The decision recorded in ``version``'s manifest, or None while undecided."""
    manifest, _ = _read_manifest(Path(root) / version)
    decision = manifest.get("promotion")
    return decision if isinstance(decision, dict) else None


def decide(
    root: str | os.PathLike[str],
    version: str,
    decision: Literal["promoted", "rejected"],
    *,
    by: Literal["shadow", "hand"],
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Record ``decision`` in ``version``'s manifest; promoted: publish it (``LATEST``, ``HISTORY``);
    either way ``CANDIDATE`` no longer names it. Returns the decision as written (an earlier decision
    taken by the shadow of another instance stands and is returned instead; one by hand replaces it)."""
    if decision not in DECISIONS:
        raise CheckpointError(f"decision {decision!r}: one of {', '.join(DECISIONS)}")
    root = Path(root)
    _check_name(version)
    path = root / version
    manifest, _ = _read_manifest(path)
    earlier = manifest.get("promotion")
    if isinstance(earlier, dict) and by == "shadow":
        return earlier
    record = {
        "decision": decision,
        "by": by,
        "at": dt.datetime.now(dt.UTC).isoformat(),
        "champion": latest_version(root),
        "detail": detail or {},
    }
    if decision == "promoted":
        promote(root, version)  # validates it first; a version that does not load is not promoted
    _write_file(
        path / f".{MANIFEST_FILE}.tmp",
        (json.dumps({**manifest, "promotion": record}, indent=2, sort_keys=True) + "\n").encode(),
    )
    with _written(path / MANIFEST_FILE):
        os.replace(path / f".{MANIFEST_FILE}.tmp", path / MANIFEST_FILE)
    _fsync_dir(path)
    if candidate_version(root) == version:
        with _written(root / CANDIDATE_FILE):
            (root / CANDIDATE_FILE).unlink(missing_ok=True)
        _fsync_dir(root)
    return record


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_file(tmp, text.encode())
    with _written(path):
        os.replace(tmp, path)
    _fsync_dir(path.parent)
