"""``forecaster train``: fit a model on the input topic's history (or a file) and publish it if it is better.

forecaster train                          # the whole input topic, once
forecaster train --input data.csv         # a series file (long/wide CSV, Parquet)
forecaster train --from-time 2026-01-01   # Kafka values from this event time on (or --from-offset N)
forecaster train --every 15m              # periodically, with /metrics on settings.train.metrics_port
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pandas as pd
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from forecaster.checkpoints.store import latest_version
from forecaster.cli import jsonout
from forecaster.config import Settings
from forecaster.errors import CheckpointError, ConfigError
from forecaster.metrics import TrainerMetrics
from forecaster.train.history import read_history
from forecaster.train.periodic import parse_duration, run_periodically
from forecaster.train.run import TrainOutcome, train_once

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, help="series file to train on instead of the input topic")
    parser.add_argument("--every", help="run periodically, e.g. 15m, 1h (a long-lived process with /metrics)")
    parser.add_argument(
        "--from-time", help="Kafka history: only values with ts at or after this (epoch ms or ISO-8601)"
    )
    parser.add_argument("--from-offset", type=int, help="Kafka history from this offset in every partition")
    parser.add_argument("--epochs", type=int, help="maximum epochs (settings.train.epochs)")
    parser.add_argument("--learning-rate", type=float, help="Adam learning rate")
    parser.add_argument(
        "--season", type=int, help="season of the seasonal-naive baseline (default: detected)"
    )
    parser.add_argument(
        "--seasons", help="longer seasons the baseline may also use, comma-separated (e.g. 168)"
    )
    parser.add_argument("--cell", choices=("gru", "lstm", "rnn"), help="recurrent cell (settings.model.cell)")
    parser.add_argument("--checkpoint-dir", type=Path, help="checkpoint folder (settings.checkpoints.dir)")
    parser.add_argument(
        "--always-publish", action="store_true", help="publish even if not better than LATEST"
    )
    parser.add_argument("--metrics-port", type=int, help="/metrics port with --every (0: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# (command-line option as argparse names it, the train setting it sets)
OPTION_FIELDS = (
    ("epochs", "epochs"),
    ("learning_rate", "learning_rate"),
    ("season", "season"),
    ("metrics_port", "metrics_port"),
)


def apply_overrides(args: argparse.Namespace, settings: Settings) -> Settings:
    """Settings with the command-line options applied (validated like the environment)."""
    train: dict[str, Any] = {}
    for option, field in OPTION_FIELDS:
        if getattr(args, option, None) is not None:
            train[field] = getattr(args, option)
    if getattr(args, "seasons", None):
        train["seasons"] = [s.strip() for s in args.seasons.split(",") if s.strip()]  # validated as ints
    if getattr(args, "always_publish", False):
        train["publish_only_if_better"] = False
    data = settings.model_dump()
    data["train"].update(train)
    if getattr(args, "cell", None):
        data["model"]["cell"] = args.cell
    if getattr(args, "checkpoint_dir", None) is not None:
        data["checkpoints"]["dir"] = args.checkpoint_dir
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:  # one line per bad value, named by its option
        options = {field: f"--{option.replace('_', '-')}" for option, field in OPTION_FIELDS}
        options.update({"seasons": "--seasons", "cell": "--cell", "dir": "--checkpoint-dir"})
        lines = []
        for error in exc.errors():
            field = str(error["loc"][-1]) if not str(error["loc"][-1]).isdigit() else str(error["loc"][-2])
            lines.append(f"{options.get(field, field)}: {error['msg']} (got {error.get('input')!r})")
        raise ConfigError("invalid option: " + "; ".join(lines)) from None


def parse_start_ms(text: str | None) -> int | None:
    """Epoch ms from ``--from-time`` (an integer, or anything pandas parses as a time; naive means UTC)."""
    if text is None:
        return None
    if text.strip().isdigit():
        return int(text)
    try:
        stamp = pd.Timestamp(text)
    except ValueError:
        raise ConfigError(f"--from-time {text!r} is not epoch ms or an ISO-8601 time") from None
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp
    return int(stamp.value // 1_000_000)


def summarize(outcome: TrainOutcome) -> dict[str, Any]:
    """The figures a person reads after a run: decision, MAE and MASE of each method, and the model's MAE
    relative to each naive baseline."""
    evaluation = outcome.evaluation
    return {
        "published": outcome.published,
        "proposed": outcome.proposed,  # shadow promotion: on trial (CANDIDATE), not yet serving
        "reason": outcome.reason,
        "epochs": outcome.fit.epochs,
        "season": evaluation.season,
        "validation_points": int(evaluation.errors["model"].count.sum()),
        "mae": {name: evaluation.mae(name) for name in evaluation.errors},
        "mase": {name: evaluation.mase(name) for name in evaluation.errors},
        "mase_series_left_out": evaluation.errors["model"].unscaled_series,  # no in-sample scale
        "relative_mae_vs_seasonal_naive": evaluation.relative_mae("model", "seasonal_naive"),
        "relative_mae_vs_last_value": evaluation.relative_mae("model", "last_value"),
    }


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def lower_priority(niceness: int) -> int:
    """Lower this process's CPU priority by ``niceness`` (0: unchanged); returns the niceness now.

    >>> lower_priority(0) == os.nice(0)
    True
    """
    if niceness:
        try:
            os.nice(niceness)
        except OSError as exc:  # not on this platform, or not allowed: train at the usual priority
            log.warning("could not lower the trainer's CPU priority: %s", exc)
    return os.nice(0)


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return _run(args, settings)
    except OSError as exc:  # a full disk anywhere (the checkpoint's own writes say so as a CheckpointError)
        if exc.errno not in DISK_FULL:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"forecaster train: {exc.strerror}{where}: nothing was published", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, settings: Settings) -> int:
    settings = apply_overrides(args, settings)
    lower_priority(settings.train.niceness)
    start_ms = parse_start_ms(args.from_time)
    progress = False if args.no_progress else None

    def once() -> TrainOutcome:
        history = read_history(
            settings, input_path=args.input, start_ms=start_ms, start_offset=args.from_offset
        )
        log.info("history: %s", json.dumps(history.describe(), default=str))
        return train_once(settings, history, progress=progress)

    if not args.every:
        outcome = once()
        print(jsonout.dumps(summarize(outcome), indent=2))
        return 0
    every = parse_duration(args.every)
    metrics = TrainerMetrics(CollectorRegistry())
    try:
        current = latest_version(settings.checkpoints.dir)
    except CheckpointError:
        current = None
    if current:
        metrics.published.info({"version": current})
    server = None
    if settings.train.metrics_port:
        from forecaster.metrics import MetricsServer

        server = MetricsServer(metrics.registry, settings.metrics.host, settings.train.metrics_port).start()
        log.info("trainer metrics on http://%s:%d/metrics", settings.metrics.host, server.port)
    stop = threading.Event()

    def on_signal(*_: Any) -> None:  # the first signal finishes the current run; a second one interrupts it
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("stopping after the current run")
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        run_periodically(once, every, metrics, stop=stop)
    finally:
        if server is not None:
            server.stop()
    return 0
