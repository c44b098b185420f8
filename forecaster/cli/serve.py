"""``forecaster serve``: run the streaming service until SIGTERM or SIGINT (then finish, flush, commit)."""

from __future__ import annotations

import argparse
import logging
import signal

import torch

from forecaster.config import Settings
from forecaster.service.build import build_service

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-poll-records", type=int, help="records per batch (FORECASTER_SERVICE__MAX_POLL_RECORDS)"
    )
    parser.add_argument(
        "--poll-timeout-ms", type=int, help="longest wait for a batch (FORECASTER_SERVICE__POLL_TIMEOUT_MS)"
    )
    parser.add_argument(
        "--metrics-port", type=int, help="port of /metrics and /healthz, 0: off (FORECASTER_METRICS__PORT)"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    service_overrides = {
        name: value
        for name, value in (
            ("max_poll_records", args.max_poll_records),
            ("poll_timeout_ms", args.poll_timeout_ms),
        )
        if value is not None
    }
    if service_overrides:
        settings = settings.model_copy(
            update={
                "service": settings.service.model_validate(
                    {**settings.service.model_dump(), **service_overrides}
                )
            }
        )
    if args.metrics_port is not None:
        settings = settings.model_copy(
            update={
                "metrics": settings.metrics.model_validate(
                    {**settings.metrics.model_dump(), "port": args.metrics_port}
                )
            }
        )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python narrates every connection at INFO
    log.info("Kafka client: %s", settings.kafka.client)
    if settings.service.torch_threads:
        torch.set_num_threads(
            settings.service.torch_threads
        )  # threads fighting over shared cores step slower
    service = build_service(settings)

    def stop(signum: int, _frame: object) -> None:
        log.info("%s received: finishing the batch, then flush and commit", signal.Signals(signum).name)
        service.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return service.run()
