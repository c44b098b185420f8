"""Turning ``Settings`` into a running service: topics, clients, engine, swapper, committer, recovery.

The loop (``forecaster.service.loop.Service``) only runs what this module wires. Exactly once gets the
transactional committer, the series ledger and the partition owner (restore on assign); at least once
gets its committer and a recovery that never has anything to do.

>>> at_least_once = Settings(service={"processing_guarantee": "at_least_once"})
>>> consumer_options(at_least_once).cooperative, producer_options(at_least_once).transactional_id is None
(True, True)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from forecaster.checkpoints.hotswap import ModelSwapper, initial_model
from forecaster.config import Settings
from forecaster.engine.engine import Engine, resolve_device
from forecaster.metrics import ServiceMetrics
from forecaster.scaling import Scaling
from forecaster.service.at_least_once import AtLeastOnceCommitter, NoRecovery
from forecaster.service.clients import (
    ConsumerOptions,
    ProducerOptions,
    create_missing_topics,
    make_consumer,
    make_producer,
    max_message_bytes,
    wait_for_broker,
)
from forecaster.service.exactly_once.changelog import ChangelogReader, ensure_changelog
from forecaster.service.exactly_once.committer import ExactlyOnceCommitter, transactional_id
from forecaster.service.exactly_once.evicted import EvictedStore
from forecaster.service.exactly_once.ledger import SeriesLedger
from forecaster.service.exactly_once.recovery import PartitionOwner
from forecaster.service.loop import Service

log = logging.getLogger(__name__)


def consumer_options(settings: Settings) -> ConsumerOptions:
    """The input consumer: a group member, cooperative-sticky, offsets committed by the committer."""
    service = settings.service
    return ConsumerOptions(
        group_id=settings.kafka.group_id,
        cooperative=True,
        session_timeout_ms=service.session_timeout_ms,
        heartbeat_interval_ms=max(100, service.session_timeout_ms // 3),
        fetch_wait_max_ms=service.fetch_wait_max_ms,
        fetch_min_bytes=service.fetch_min_bytes,
    )


def producer_options(settings: Settings, message_max_bytes: int | None = None) -> ProducerOptions:
    """The output producer (transactional exactly once)."""
    service = settings.service
    exactly_once = service.processing_guarantee == "exactly_once"
    return ProducerOptions(
        linger_ms=service.linger_ms,
        transactional_id=transactional_id(settings) if exactly_once else None,
        transaction_timeout_ms=service.transaction_timeout_ms,
        message_max_bytes=message_max_bytes or service.max_message_bytes,
    )


def build_engine(settings: Settings) -> Engine:
    """The engine over the model the service starts with (``LATEST`` checkpoint, or a fresh ``init``)."""
    device = resolve_device(settings.state.device)
    model, version = initial_model(settings, device)
    return Engine.from_settings(model, settings, version=version, device=device)


class _NoStore:
    """At least once keeps no evicted snapshots."""

    def stats(self) -> dict[str, int]:
        return dict.fromkeys(
            ("memory_series", "memory_bytes", "disk_series", "disk_bytes", "spilled_total"), 0
        )


class _NoLedger:
    """At least once keeps no per-series bookkeeping."""

    store = _NoStore()

    def note(self, series: Any, partitions: Any) -> None: ...

    def revive(self, series: Any) -> int:
        return 0


def build_service(
    settings: Settings,
    *,
    engine: Engine | None = None,
    metrics: ServiceMetrics | None = None,
    clock: Callable[[], float] = time.time,
) -> Service:
    """Everything the loop needs, from ``settings`` (needs the broker)."""
    kafka, service = settings.kafka, settings.service
    metrics = metrics or ServiceMetrics()
    timeout = kafka.request_timeout_ms / 1000.0
    exactly_once = service.processing_guarantee == "exactly_once"
    # Step 1. The broker answers; the topics exist (the changelog co-partitioned with the input).
    wait_for_broker(kafka, timeout=timeout)
    outputs = (kafka.output_topic, kafka.deadletter_topic)
    if kafka.auto_create_topics:
        created = create_missing_topics(kafka, (kafka.input_topic, *outputs))
        if created:
            log.info("created topics %s", ", ".join(created))
    if exactly_once:
        ensure_changelog(kafka, kafka.input_topic, create=kafka.auto_create_topics)
    # Step 2. The largest record the output topics take (a bigger one is refused before it is sent).
    limit = min(service.max_message_bytes, max_message_bytes(kafka, outputs) or service.max_message_bytes)
    # Step 3. Engine and model watcher.
    engine = engine or build_engine(settings)
    swapper = ModelSwapper(
        settings.checkpoints.dir,
        engine.version,
        registry=metrics.registry,
        poll_seconds=service.checkpoint_poll_seconds,
        device=engine.device,
        scaling=Scaling.from_settings(settings.scaling),
        window=settings.state.window,
        background_above=service.background_rewarm_values,
        promotion=settings.checkpoints.promotion,
    )
    # Step 4. Clients, committer and recovery.
    consumer = make_consumer(kafka, consumer_options(settings))
    options = producer_options(settings, limit)
    common = dict(
        interval_ms=service.commit_interval_ms,
        max_records=service.commit_records,
        on_send_failure=lambda reason: metrics.records_unsent.labels(reason=reason).inc(),
    )
    if not exactly_once:
        committer = AtLeastOnceCommitter(
            consumer,
            make_producer(kafka, options),
            on_commit=lambda ok: ok and metrics.commits.inc(),
            **common,
        )
        recovery = NoRecovery(committer)
        return Service(
            settings,
            engine=engine,
            consumer=consumer,
            committer=committer,
            recovery=recovery,
            ledger=_NoLedger(),
            swapper=swapper,
            metrics=metrics,
            clock=clock,
        )
    state = settings.state
    store = EvictedStore(state.evicted_memory_bytes, state.spill_dir, transactional_id(settings))
    ledger = SeriesLedger(engine, store)
    engine.table.on_evict = ledger.on_evict  # evicted series go to the changelog and to the store
    committer = ExactlyOnceCommitter(
        consumer,
        lambda: make_producer(kafka, options),
        ledger.changes,
        waiting=lambda: bool(ledger.evicted),
        changelog_topic=kafka.changelog_topic,
        timeout_s=service.transaction_timeout_ms / 1000.0,
        transactional_id=options.transactional_id or "",
        on_commit=metrics.transaction,
        on_changelog=metrics.changelog_records.inc,
        **common,
    )
    reader = ChangelogReader.from_settings(kafka, stable_timeout=service.transaction_timeout_ms / 1000.0)
    owner = PartitionOwner(
        consumer,
        committer,
        ledger,
        reader,
        topic=kafka.input_topic,
        cooperative=True,
        on_restore=metrics.restored,
    )
    log.info("exactly once: transactional id %s", options.transactional_id)
    return Service(
        settings,
        engine=engine,
        consumer=consumer,
        committer=committer,
        recovery=owner,
        ledger=ledger,
        swapper=swapper,
        metrics=metrics,
        clock=clock,
    )
