"""The exactly-once parts of one service instance, built together: transactional committer, series
ledger, partition owner (restore / drop on rebalance) and the changelog reader.

The input consumer of an exactly-once service uses cooperative-sticky assignment: a rebalance moves only
the partitions that change owner, so the others keep their state and keep being consumed.

>>> from forecaster.config import Settings
>>> options = consumer_options(Settings())
>>> type(options["partition_assignment_strategy"][0]).__name__
'CooperativeStickyAssignor'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor

from forecaster.service.clients import make_producer
from forecaster.service.exactly_once.changelog import ChangelogReader
from forecaster.service.exactly_once.committer import TransactionalCommitter, transactional_id
from forecaster.service.exactly_once.evicted import EvictedStore
from forecaster.service.exactly_once.ledger import SeriesLedger
from forecaster.service.exactly_once.recovery import OwnerListener, PartitionOwner

log = logging.getLogger(__name__)


def consumer_options(settings: Any) -> dict[str, Any]:
    """Options of the input consumer for exactly once (instances, not classes: kafka-python's API)."""
    return {"partition_assignment_strategy": [CooperativeStickyAssignor()]}


def producer_options(settings: Any) -> dict[str, Any]:
    """Options of the transactional producer of this instance."""
    service = settings.service
    return {
        "transactional_id": transactional_id(settings),
        "transaction_timeout_ms": service.transaction_timeout_ms,
        "linger_ms": service.linger_ms,
    }


@dataclass
class ExactlyOnce:
    """What the service loop calls in exactly-once mode (see ``forecaster.service.loop``)."""

    committer: TransactionalCommitter
    ledger: SeriesLedger
    owner: PartitionOwner
    listener: OwnerListener

    @classmethod
    def build(
        cls,
        settings: Any,
        consumer: Any,
        engine: Any,
        metrics: Any,
        *,
        producer: Any = None,
        producer_factory: Any = None,
        reader: ChangelogReader | None = None,
    ) -> ExactlyOnce:
        """Wire the parts; ``producer`` / ``producer_factory`` / ``reader`` are injectable (tests)."""
        kafka, service = settings.kafka, settings.service
        state = settings.state
        store = EvictedStore(state.evicted_memory_bytes, state.spill_dir, transactional_id(settings))
        ledger = SeriesLedger(engine, store)
        engine.table.on_evict = ledger.on_evict  # evicted series go to the changelog and to the store
        if producer_factory is None:

            def producer_factory() -> Any:
                return make_producer(kafka, **producer_options(settings))

        committer = TransactionalCommitter(
            consumer,
            producer_factory,
            ledger.changes,
            changelog_topic=kafka.changelog_topic,
            interval_ms=service.commit_interval_ms,
            max_records=service.commit_records,
            timeout_s=service.transaction_timeout_ms / 1000.0,
            producer=producer,
            transactional_id=transactional_id(settings),
            on_commit=metrics.transaction,
            on_changelog=metrics.changelog_records.inc,
        )
        if reader is None:
            reader = ChangelogReader.from_settings(
                kafka, stable_timeout=service.transaction_timeout_ms / 1000.0
            )
        owner = PartitionOwner(
            consumer,
            committer,
            ledger,
            reader,
            topic=kafka.input_topic,
            cooperative=any(
                getattr(a, "name", "") == CooperativeStickyAssignor.name
                for a in getattr(consumer, "config", {}).get("partition_assignment_strategy", ())
            ),
            on_restore=metrics.restored,
        )
        log.info("exactly once: transactional id %s", transactional_id(settings))
        return cls(committer, ledger, owner, OwnerListener(owner))

    def close(self, timeout: float) -> None:
        self.committer.close(timeout)
        self.owner.reader.close()
        self.ledger.store.close()
