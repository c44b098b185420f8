"""At least once: output acknowledged first, input offsets after; and its do-nothing recovery.

A replay after a crash is harmless: the engine drops values not newer than their series' last timestamp
(counted as duplicates).

>>> committer = AtLeastOnceCommitter(consumer=None, producer=None, interval_ms=100, max_records=10)
>>> committer.due()  # nothing polled, nothing to commit
False
"""

from __future__ import annotations

import logging

from forecaster.errors import DeliveryError, KafkaClientError
from forecaster.service.clients import Rebalance, TopicPartition
from forecaster.service.committer import RECORD_FAILURES, Committer

log = logging.getLogger(__name__)


class AtLeastOnceCommitter(Committer):
    """Commits every ``interval_ms`` or ``max_records``: flush, then the group's offsets."""

    def commit(self) -> bool:
        """Make the output of the records polled so far durable, then move the group's offsets past them."""
        self.last_commit = self.clock()
        if not self.pending:
            return True
        # Step 1. Wait until the broker answered every forecast and dead letter sent so far.
        self.producer.flush()
        # Step 2. A record the broker refused for what it is (too large) is counted and skipped; any
        # other failure leaves output missing: do not commit past it.
        failures = self.producer.take_failures()
        for failure in failures:
            if failure.reason in RECORD_FAILURES:
                self.refused(failure.topic, failure.key, failure.reason, failure.detail)
        lost = [f for f in failures if f.reason not in RECORD_FAILURES]
        if lost:
            self.pending, self.pending_records = {}, 0
            raise DeliveryError(f"{len(lost)} record(s) not acknowledged by the broker: {lost[0].detail}")
        # Step 3. Commit the input offsets: the next offset to read, per partition.
        offsets, self.pending, self.pending_records = self.pending, {}, 0
        try:
            self.consumer.commit(offsets)
        except KafkaClientError as exc:  # e.g. the group rebalanced: the next reader replays these records
            log.warning("offset commit failed, the records since the last commit will be replayed: %s", exc)
            self.on_commit(False)
            return False
        self.on_commit(True)
        return True

    def close(self, timeout: float) -> None:
        self.producer.close(timeout=timeout)


class NoRecovery:
    """At least once has nothing to restore: the loop's recovery step never runs. On a revoke, what was
    processed is committed so that the next owner does not replay it."""

    required = False
    rewinding = False

    def __init__(self, committer: Committer) -> None:
        self.committer = committer
        self.rebalance = Rebalance(on_revoke=self.revoked)

    def revoked(self, tps: list[TopicPartition]) -> None:
        if tps:
            self.committer.commit()

    def run(self) -> None:
        """Nothing to do."""

    def close(self) -> None:
        """Nothing to close."""
