"""``forecaster produce``: synthetic series at a target rate, or a file replayed, to the input topic."""

from __future__ import annotations

import argparse
import sys

from forecaster.config import Settings
from forecaster.service.clients import ProducerOptions, create_missing_topics, make_producer
from forecaster.tools.produce import produce_file, produce_synthetic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--file",
        "--input",
        dest="file",
        help="replay a series file (CSV long series,ts,value or wide; Parquet); --input as in train and replay",
    )
    parser.add_argument("--series", type=int, default=100, help="synthetic: number of series (default 100)")
    parser.add_argument("--values", type=int, default=1000, help="synthetic: values per series, 0: forever")
    parser.add_argument("--rate", type=float, default=0.0, help="values per second, 0: as fast as possible")
    parser.add_argument("--window", type=int, default=1, help="values per record (1: single-value records)")
    parser.add_argument("--start-ms", type=int, help="synthetic: ts of the first value (default: now)")
    parser.add_argument(
        "--step-ms", type=int, default=1000, help="synthetic: ms between values (default 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic: random seed")
    parser.add_argument("--topic", help="topic to write (default: kafka.input_topic)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.window < 1 or args.series < 1 or args.values < 0 or args.rate < 0:
        print(
            "forecaster produce: --window and --series must be >= 1, --values and --rate >= 0",
            file=sys.stderr,
        )
        return 2
    if args.window > settings.service.max_window_values:
        print(
            f"forecaster produce: --window above service.max_window_values ({settings.service.max_window_values})"
            " would be dead-lettered",
            file=sys.stderr,
        )
        return 2
    kafka = settings.kafka
    topic = args.topic or kafka.input_topic
    if kafka.auto_create_topics:
        create_missing_topics(kafka, [topic])
    # Paced (--rate): each value leaves at once, so that its timestamp is when it was sent (the service's
    # latency counts from it); unpaced, records are batched for throughput.
    producer = make_producer(kafka, ProducerOptions(linger_ms=0 if args.rate else 20))
    try:
        options = dict(window=args.window, rate=args.rate, progress=not args.no_progress)
        if args.file:
            report = produce_file(producer, topic, args.file, **options)
        else:
            ticks = args.values or None
            report = produce_synthetic(
                producer,
                topic,
                n_series=args.series,
                n_ticks=ticks,
                start_ms=args.start_ms,
                step_ms=args.step_ms,
                seed=args.seed,
                **options,
            )
    except KeyboardInterrupt:
        producer.flush()
        print("forecaster produce: interrupted", file=sys.stderr)
        return 130
    finally:
        producer.close(timeout=30.0)
    print(
        f"produced {report.values} values in {report.records} records to {topic} "
        f"in {report.seconds:.1f} s ({report.rate:,.0f} values/s)"
    )
    if report.skipped:
        print("skipped rows: " + ", ".join(f"{reason}={n}" for reason, n in sorted(report.skipped.items())))
    return 0
