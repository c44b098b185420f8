"""``forecaster checkpoints list``, ``promote VERSION`` (publish or roll back), ``reject VERSION``,
``candidate`` and ``history``.

With ``checkpoints.promotion = shadow`` the trainer proposes (``CANDIDATE``) rather than publishes; the
services try the candidate in shadow and decide. ``promote`` and ``reject`` decide by hand: the decision
is written into the version's manifest (``by: hand``), so the services end its trial.

A running ``forecaster serve`` watches ``LATEST`` and swaps to the promoted version within
``settings.service.checkpoint_poll_seconds``. Every promotion is recorded in ``HISTORY`` beside
``LATEST``: a service that starts while ``LATEST`` is unusable serves the last version chosen that loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from forecaster.checkpoints.promotion import candidate_version, decide, decision_of
from forecaster.checkpoints.store import (
    latest_version,
    list_checkpoints,
    load_checkpoint,
    promote,
    read_history,
)
from forecaster.cli import jsonout
from forecaster.config import Settings
from forecaster.errors import CheckpointError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-dir", type=Path, help="checkpoint folder (settings.checkpoints.dir)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    listing = sub.add_parser("list", help="every checkpoint, oldest first; * marks LATEST")
    listing.add_argument("--verify", action="store_true", help="load and validate each one (slower)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    promoting = sub.add_parser("promote", help="point LATEST at VERSION (after validating it)")
    promoting.add_argument("version")
    rejecting = sub.add_parser("reject", help="reject VERSION: never tried in shadow (again)")
    rejecting.add_argument("version")
    sub.add_parser("candidate", help="the version on trial in shadow (CANDIDATE) and its decision, if any")
    sub.add_parser("history", help="the versions published or promoted, oldest first (HISTORY)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    root = args.checkpoint_dir or settings.checkpoints.dir
    if args.action == "promote":
        decided = _decided_before(root, args.version)
        if decided:
            decide(root, args.version, "promoted", by="hand")  # records it; ends a trial of it
        else:
            promote(root, args.version)
        print(f"LATEST -> {args.version} in {root}")
        return 0
    if args.action == "reject":
        if latest_version(root) == args.version:
            print(f"{args.version} is the published version (LATEST): promote another first", file=sys.stderr)
            return 1
        decide(root, args.version, "rejected", by="hand")
        print(f"{args.version} rejected in {root}")
        return 0
    if args.action == "candidate":
        version = candidate_version(root)
        if version is None:
            print(f"no candidate in {root}")
            return 0
        print(json.dumps({"candidate": version, "decision": decision_of(root, version)}, indent=2))
        return 0
    if args.action == "history":
        try:
            history = read_history(root)
        except FileNotFoundError:
            print(f"no history in {root} (nothing published or promoted since it was kept)", file=sys.stderr)
            return 0
        print(f"{'version':28} {'at':26} action")
        for version, at, action in history:
            print(f"{version:28} {at:26} {action}")
        return 0
    rows = [_row(info, getattr(args, "verify", False)) for info in list_checkpoints(root)]
    if getattr(args, "json", False):
        print(jsonout.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no checkpoints in {root}", file=sys.stderr)
        return 0
    print(
        f"{'':1} {'version':28} {'created':26} {'model':18} {'val MAE':>10} {'MASE':>8} {'parent':28} {'decision':9} problem"
    )
    for row in rows:
        print(
            f"{'*' if row['latest'] else ' ':1} {row['version']:28} {row['created_at'][:26]:26} {row['model']:18} "
            f"{_num(row['mae']):>10} {_num(row['mase']):>8} {row['parent'] or '-':28} "
            f"{row['decision'] or '-':9} {row['problem'] or ''}"
        )
    return 0


def _row(info: Any, verify: bool) -> dict[str, Any]:
    manifest = info.manifest or {}
    model = manifest.get("model") or {}
    validation = ((manifest.get("metrics") or {}).get("validation") or {}).get("model") or {}
    problem = info.problem
    if verify and problem is None:
        try:
            load_checkpoint(info.path)
        except CheckpointError as exc:
            problem = str(exc)
    shape = f"{model.get('cell', '?')} {model.get('num_layers', '?')}x{model.get('hidden_size', '?')} h{model.get('horizon', '?')}"
    return {
        "version": info.version,
        "latest": info.latest,
        "created_at": info.created_at,
        "model": shape,
        "mae": validation.get("mae"),
        "mase": validation.get("mase"),  # Hyndman & Koehler's; absent from manifests written before it
        "parent": manifest.get("parent"),
        "decision": (manifest.get("promotion") or {}).get("decision"),  # shadow promotion, or by hand
        "problem": problem,
    }


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def _decided_before(root: Any, version: str) -> bool:
    """Whether promoting ``version`` by hand is a decision to record: it is a candidate, or was one."""
    return candidate_version(root) == version or decision_of(root, version) is not None
