"""The commit step of the service, at least once: output acknowledged first, input offsets after.

Kept apart from the loop so that a transactional commit (forecasts, state changelog and offsets in one
Kafka transaction) can take its place with the same four calls: ``track``, ``in_flight``, ``due``,
``commit``.

>>> committer = AtLeastOnceCommitter(consumer=None, producer=None, interval_ms=100, max_records=10)
>>> committer.due()  # nothing polled, nothing to commit
False
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from forecaster.errors import DeliveryError

log = logging.getLogger(__name__)


class AtLeastOnceCommitter:
    """Tracks what was polled and what was sent; commits every ``interval_ms`` or ``max_records``.

    ``in_flight`` collects the producer futures of every record sent since the last commit (the loop
    appends to it directly: it is the hot path). ``on_commit`` is called with True or False per commit.
    """

    def __init__(
        self,
        consumer: Any,
        producer: Any,
        *,
        interval_ms: float,
        max_records: int,
        on_commit: Callable[[bool], None] = lambda ok: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.interval_ms = interval_ms
        self.max_records = max_records
        self.on_commit = on_commit
        self.clock = clock
        self.pending: dict[TopicPartition, int] = {}  # next offset to read, per partition
        self.pending_records = 0
        self.in_flight: list[Any] = []
        self.last_commit = clock()

    def track(self, polled: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Note the records of a poll (their output is being sent)."""
        for tp, records in polled.items():
            if records:
                self.pending[tp] = records[-1].offset + 1
                self.pending_records += len(records)

    def due(self) -> bool:
        elapsed_ms = (self.clock() - self.last_commit) * 1000.0
        return bool(self.pending) and (
            self.pending_records >= self.max_records or elapsed_ms >= self.interval_ms
        )

    def commit(self, wait: bool = True) -> None:
        """Make the output of the records polled so far durable, then move the group's offsets past them.

        ``wait=False`` sends the offset commit without waiting for its answer: the rebalance listener runs
        on the consumer's network thread, where a blocking commit is not allowed.
        """
        self.last_commit = self.clock()
        if not self.pending:
            return
        # Step 1. Wait until the broker acknowledged every forecast and dead letter sent so far.
        self.producer.flush()
        # Step 2. Any send that failed leaves those records' output missing: do not commit past them.
        failed = [future for future in self.in_flight if future.failed()]
        self.in_flight = []
        if failed:
            # The loop stops on this error; its final commit (close) must not move past these records.
            self.pending, self.pending_records = {}, 0
            raise DeliveryError(
                f"{len(failed)} record(s) not acknowledged by the broker: {failed[0].exception}"
            )
        # Step 3. Commit the input offsets: the next offset to read, per partition.
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self.pending.items()}
        self.pending, self.pending_records = {}, 0
        if not wait:
            self.consumer.commit_async(offsets, callback=self._answered)
            return
        try:
            self.consumer.commit(offsets)
        except KafkaError as exc:
            self._answered(offsets, exc)
            return
        self.on_commit(True)

    def _answered(self, offsets: Mapping[TopicPartition, OffsetAndMetadata], result: Any) -> None:
        if isinstance(result, Exception):  # e.g. the group rebalanced: the next reader replays these records
            log.warning(
                "offset commit failed, the records since the last commit will be replayed: %r", result
            )
            self.on_commit(False)
        else:
            self.on_commit(True)
