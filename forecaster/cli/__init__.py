"""The ``forecaster`` command: ``forecaster serve | train | produce | replay | checkpoints | config``.

Each subcommand lives in its own module under ``forecaster.cli`` with two functions:
``add_arguments(parser)`` and ``run(args, settings) -> int``. Settings are read once, here.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from forecaster import __version__, logs
from forecaster.config import load_settings
from forecaster.errors import ForecasterError

# name -> (module under forecaster.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("config_cmd", "print the effective settings (secrets masked)"),
    "serve": ("serve", "run the streaming service: input topic -> forecasts"),
    "produce": ("produce", "write synthetic or file data to the input topic"),
    "train": ("train", "train a model from Kafka history or a file and publish a checkpoint"),
    "replay": ("replay", "stream a file through the engine, write forecasts and a quality report"),
    "checkpoints": ("checkpoints", "list checkpoints or promote one (rollback)"),
}


def _available_commands() -> dict[str, tuple[str, str]]:
    found = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(f"forecaster.cli.{module}") is not None:
            found[name] = (module, help_text)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forecaster",
        description="Streaming time-series forecasting: one recurrent step per new value.",
        epilog="Settings come from FORECASTER_* environment variables; see `forecaster config`.",
    )
    parser.add_argument("--version", action="version", version=f"forecaster {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available_commands().items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(f"forecaster.cli.{module}").add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        settings = load_settings()
    except ForecasterError as exc:
        print(f"forecaster: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level or settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logs.install()  # a Kafka client's repeated lines (a broker away) at most once per 30 s
    module = _available_commands()[args.command][0]
    try:
        return int(importlib.import_module(f"forecaster.cli.{module}").run(args, settings) or 0)
    except ForecasterError as exc:
        print(f"forecaster {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
