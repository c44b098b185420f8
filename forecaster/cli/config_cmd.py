"""``forecaster config``: print the effective settings, secrets masked."""

from __future__ import annotations

import argparse

from forecaster.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults()


def run(args: argparse.Namespace, settings: Settings) -> int:
    print(settings.masked_json())
    return 0
