"""At least once: output acknowledged first, input offsets after; and its do-nothing recovery.

A replay after a crash is harmless: the engine drops values not newer than their series' last timestamp
(counted as duplicates).

>>> committer = AtLeastOnceCommitter(consumer=None, producer=None, interval_ms=100, max_records=10)
>>> committer.due()  # nothing polled, nothing to commit
False
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from forecaster.errors import DeliveryError, KafkaClientError
from forecaster.service.clients import Rebalance, TopicPartition
from forecaster.service.committer import RECORD_FAILURES, Committer

log = logging.getLogger(__name__)


class AtLeastOnceCommitter(Committer):
    """Commits every ``interval_ms`` or ``max_records``: the group's offsets move past input records once
    the broker acknowledged their output.

    The loop does not wait for the acknowledgements: at each interval the records polled so far are set
    aside with a mark of the producer (``Producer.mark``), and their offsets are committed on a later
    turn, once every record sent before the mark was answered. ``commit()`` (a revoke, closing) waits.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting: deque[tuple[dict[tuple[str, int], int], Any]] = deque()  # (offsets, mark), oldest first
        if self.consumer is not None:
            self.consumer.commit_answered = (
                self.commit_answered
            )  # commits that did not wait are answered later

    def due(self) -> bool:
        return bool(self.waiting) or super().due()

    def commit(self, wait: bool = True) -> bool:
        """Move the group's offsets past the records whose output the broker acknowledged; with ``wait``,
        past every record polled so far, waiting for the broker's answers."""
        if self.pending and (wait or super().due()):
            self.waiting.append((self.pending, self.producer.mark()))
            self.pending, self.pending_records = {}, 0
            self.last_commit = self.clock()
        # Step 1. The sets of records whose output was all answered (waiting for them with ``wait``).
        if wait and self.waiting:
            self.producer.flush()
        offsets: dict[tuple[str, int], int] = {}
        while self.waiting and self.producer.answered(self.waiting[0][1]):
            offsets.update(self.waiting.popleft()[0])
        # Step 2. A record the broker refused for what it is (too large) is counted and skipped; any
        # other failure leaves output missing: do not commit past it.
        failures = self.producer.take_failures()
        for failure in failures:
            if failure.reason in RECORD_FAILURES:
                self.refused(failure.topic, failure.key, failure.reason, failure.detail)
        lost = [f for f in failures if f.reason not in RECORD_FAILURES]
        if lost:
            self.pending, self.pending_records = {}, 0
            self.waiting.clear()
            raise DeliveryError(f"{len(lost)} record(s) not acknowledged by the broker: {lost[0].detail}")
        if not offsets:
            return True
        # Step 3. Commit the input offsets: the next offset to read, per partition (the loop's commits do
        # not wait for the broker's answer either: it comes to ``commit_answered``).
        try:
            self.consumer.commit(offsets, wait=wait)
        except KafkaClientError as exc:  # e.g. the group rebalanced: the next reader replays these records
            self.commit_answered(False, str(exc))
            return False
        if wait:
            self.on_commit(True)
        return True

    def commit_answered(self, ok: bool, detail: str) -> None:
        """The broker's answer to an offset commit."""
        if not ok:
            log.warning(
                "offset commit failed, the records since the last commit will be replayed: %s", detail
            )
        self.on_commit(ok)

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
