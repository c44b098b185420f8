"""``forecaster checkpoints list``, ``promote VERSION`` (publish or roll back) and ``history``.

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

from forecaster.checkpoints.store import list_checkpoints, load_checkpoint, promote, read_history
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
    sub.add_parser("history", help="the versions published or promoted, oldest first (HISTORY)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    root = args.checkpoint_dir or settings.checkpoints.dir
    if args.action == "promote":
        loaded = promote(root, args.version)
        print(f"LATEST -> {args.version} ({loaded.model.cell if loaded else '?'}) in {root}")
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
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no checkpoints in {root}", file=sys.stderr)
        return 0
    print(
        f"{'':1} {'version':28} {'created':26} {'model':18} {'val MAE':>10} {'MASE sn':>8} {'parent':28} problem"
    )
    for row in rows:
        print(
            f"{'*' if row['latest'] else ' ':1} {row['version']:28} {row['created_at'][:26]:26} {row['model']:18} "
            f"{_num(row['mae']):>10} {_num(row['mase_vs_seasonal_naive']):>8} {row['parent'] or '-':28} "
            f"{row['problem'] or ''}"
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
        "mase_vs_seasonal_naive": validation.get("mase_vs_seasonal_naive"),
        "parent": manifest.get("parent"),
        "problem": problem,
    }


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"
