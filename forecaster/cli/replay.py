"""``forecaster replay``: a series file through the engine, no broker; forecasts and their quality.

forecaster replay --input data.csv                                  # the checkpoint LATEST names
forecaster replay --input data.csv --checkpoint checkpoints/<version> --output forecasts.csv
forecaster replay --input data.csv --output forecasts.csv --long        # Nixtla's unique_id, ds, cutoff, ...
forecaster replay --input data.csv --report report.png --season 24

Series are on the time grid the service puts them on (``state.period``, by default the model's period); a
step is a period, and a forecast is scored against the value at its target time (``forecaster.tools.replay``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from forecaster.checkpoints.store import LoadedCheckpoint, latest_version, load_checkpoint
from forecaster.cli import jsonout
from forecaster.config import Settings
from forecaster.engine.engine import Engine
from forecaster.errors import CheckpointError, ConfigError
from forecaster.tools.replay import (
    format_intervals,
    format_metrics,
    format_period,
    format_problems,
    replay,
    write_forecasts,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        type=Path,
        required=True,
        help="series file: CSV long (series,ts,value) or wide (time column + one per series), Parquet",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint folder, or a checkpoint root (its LATEST); default: LATEST in checkpoints.dir",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="write the forecasts here (CSV: series,ts,model_version,h1..hH, their target times at_1..at_H"
        " in epoch ms, and the intervals)",
    )
    parser.add_argument(
        "--long",
        action="store_true",
        help="with --output: one row per forecast step, Nixtla's long layout (unique_id,ds,cutoff,step,y_hat,"
        "lo-80,hi-80,...,model_version; ds the target time, cutoff the origin's ts)",
    )
    parser.add_argument("--report", type=Path, help="write a PNG report here (needs matplotlib)")
    parser.add_argument(
        "--season", type=int, help="season of the seasonal-naive baseline (default: detected)"
    )
    parser.add_argument(
        "--batch-rows", type=int, help="rows per engine batch (default: service.max_poll_records)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: state.device)")


def resolve_checkpoint(path: Path | None, settings: Settings, device: str = "cpu") -> LoadedCheckpoint:
    """The checkpoint at ``path``, or the one ``LATEST`` names under ``settings.checkpoints.dir``."""
    if path is not None:
        return load_checkpoint(path, device=device)
    root = Path(settings.checkpoints.dir)
    version = latest_version(root)
    if version is None:
        raise CheckpointError(
            f"no published checkpoint in {root} (no LATEST): train one with `forecaster train --input FILE`, "
            "or pass --checkpoint DIR"
        )
    return load_checkpoint(root / version, device=device)


def format_sources(sources: dict[tuple[int, str], int]) -> str:
    """The per-series choice at the end of the file: series by the source of their last forecast, at step 1
    and the last step."""
    steps = sorted({step for step, _ in sources})
    parts = [
        f"h{step}: "
        + ", ".join(f"{n} {src.replace('_', ' ')}" for (k, src), n in sources.items() if k == step and n)
        for step in steps
    ]
    return "per-series choice, series by the source of their last forecast: " + "; ".join(parts)


def writable(option: str, path: Path) -> None:
    """``ConfigError`` unless ``path`` names a file whose folder exists (checked before the replay runs)."""
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; name a file in it")
    if not path.parent.is_dir():
        raise ConfigError(f"{option} {path}: the folder {path.parent} does not exist")


def usable_device(device: str) -> str:
    """``device`` ("auto": cuda where there is one), or ``ConfigError`` when torch cannot use it here."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"device {device!r}: not one torch knows (cpu, cuda or cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA device is available here (use cpu)")
    return device


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.season is not None and args.season < 1:
        print("forecaster replay: --season must be >= 1", file=sys.stderr)
        return 2
    if args.batch_rows is not None and args.batch_rows < 1:
        print("forecaster replay: --batch-rows must be >= 1", file=sys.stderr)
        return 2
    if args.long and args.output is None:
        print("forecaster replay: --long is the layout of --output: name the file", file=sys.stderr)
        return 2
    for option, path in (("--output", args.output), ("--report", args.report)):
        if path is not None:
            writable(option, path)  # before the work, not after it
    if args.report is not None:
        from forecaster.tools.report import require_matplotlib

        require_matplotlib()
    device = usable_device(args.device or settings.state.device)
    checkpoint = resolve_checkpoint(args.checkpoint, settings, device)
    if checkpoint.model.context >= settings.state.window:  # the service refuses it too
        raise CheckpointError(
            f"{checkpoint.version}: its baseline reads {checkpoint.model.context} values back, "
            f"more than state.window ({settings.state.window}) retains: raise "
            "FORECASTER_STATE__WINDOW"
        )
    # The service's engine: the same period setting (``state.period``), the same grid.
    engine = Engine.from_settings(
        checkpoint.model, settings, version=checkpoint.version, device=device, scaling=checkpoint.scaling
    )
    result = replay(
        args.input,
        engine,
        season=args.season,
        batch_rows=args.batch_rows or settings.service.max_poll_records,
        progress=False if args.no_progress else None,
        max_series_length=settings.service.max_series_length,
    )
    for line in format_problems(result):
        print(line, file=sys.stderr)
    if args.output is not None:
        write_forecasts(result.rows, args.output, long=args.long)
    if args.report is not None:
        from forecaster.tools.report import write_report

        write_report(result, args.report)
    sources = engine.choice_sources()  # empty with the per-series choice off
    if args.json:
        print(
            jsonout.dumps(
                {
                    "checkpoint": checkpoint.version,
                    "values": len(result.rows),
                    "duplicates": result.duplicates,
                    "clipped": result.rows.clipped,
                    "period_ms": engine.model.period_ms if engine.period_ms is None else engine.period_ms,
                    "series_with_a_period": result.series_with_a_period(),
                    "imputed": result.rows.imputed,
                    "bad_rows": len(result.bad_rows),
                    **result.metrics(),
                    "series_by_source": {f"h{k}:{src}": n for (k, src), n in sources.items()},
                },
                indent=2,
            )
        )
        return 0
    print(
        f"replayed {len(result.rows)} values of {len(result.rows.by_series())} series with checkpoint "
        f"{checkpoint.version}; season {result.season}"
    )
    print(format_period(result, engine))
    print(format_metrics(result))
    if sources:
        print(format_sources(sources))
    if result.intervals is not None:
        print(format_intervals(result.intervals))
    if args.output is not None:
        print(f"forecasts: {args.output}")
    if args.report is not None:
        print(f"report: {args.report}")
    return 0
