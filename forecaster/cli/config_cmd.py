"""``forecaster config``: print the effective settings, secrets masked; ``--client``: the connection
configuration the chosen Kafka client library gets (``kafka.client``), secrets masked."""

from __future__ import annotations

import argparse
import json

from forecaster.config import Settings
from forecaster.service.clients import client_configuration


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--client", action="store_true", help="print the Kafka client library's connection configuration"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.client:
        print(json.dumps(client_configuration(settings.kafka), indent=2, sort_keys=True, default=str))
    else:
        print(settings.masked_json())
    return 0
