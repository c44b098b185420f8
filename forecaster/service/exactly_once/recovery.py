"""Restoring partitions on assignment or failure, dropping them on revoke: ``PartitionOwner`` follows the
consumer group for the input topic (the series bookkeeping is ``forecaster.service.exactly_once.ledger.SeriesLedger``):

- assigned: the new partitions are paused; after the poll, before any of their records is consumed, the
  committed offsets are read (waiting for a previous owner's transaction to settle), the changelog
  partitions are read to their end and loaded, the consumer seeks to the committed offsets, and the
  partitions resume;
- revoked: commit, then drop those partitions' series (under eager assignment every partition is revoked
  at each rebalance; those assigned back keep their state, which the commit just made durable);
- lost (the member was evicted from the group): abort, drop;
- a failed transaction: every owned series is dropped and restored as above (the last committed state).

The loop asks ``required`` before each poll and calls ``run`` when it is; ``rewinding`` says a poll's
records must be dropped (a transaction failed during it, so the positions go back to the last commit).

>>> owner = PartitionOwner(None, None, None, None, topic="ts.input", cooperative=True)
>>> owner.owned, owner.to_restore
(set(), set())
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from forecaster.errors import KafkaClientError
from forecaster.retry import Backoff
from forecaster.service.clients import Rebalance, TopicPartition
from forecaster.service.committer import is_group_fenced
from forecaster.service.exactly_once.changelog import ChangelogReader
from forecaster.service.exactly_once.ledger import RestoreReport, SeriesLedger

log = logging.getLogger(__name__)


class PartitionOwner:
    """Follows the group's assignment for ``topic``; see the module docstring.

    The rebalance callbacks run inside the consumer's poll, where only producer calls and local consumer
    state (pause) are allowed; everything that waits on the consumer (committed offsets, seeks after a
    restore) happens in ``run``, called by the loop before its next poll.
    """

    def __init__(
        self,
        consumer: Any,
        committer: Any,
        ledger: SeriesLedger,
        reader: ChangelogReader,
        *,
        topic: str,
        cooperative: bool,
        on_restore: Any = None,
        restore_backoff: Backoff | None = None,
    ) -> None:
        self.consumer = consumer
        self.committer = committer
        self.ledger = ledger
        self.reader = reader
        self.topic = topic
        self.cooperative = cooperative
        self.on_restore = on_restore or (lambda report: None)
        self.owned: set[int] = set()
        self.to_restore: set[int] = set()
        self.rebalance = Rebalance(self.assigned, self.revoked, self.lost)
        self._refused_generation: int | None = None  # generation of the last commit refused by the group
        self._restore_backoff = restore_backoff or Backoff(first=0.1, cap=2.0)

    # ---- the rebalance listener (consumer network thread) --------------------------------------------

    def revoked(self, tps: Iterable[TopicPartition]) -> None:
        parts = self._ours(tps)
        if not parts:
            return
        committed = self.committer.commit()  # a failure is reset in catch_up; ProducerFenced propagates
        if self.cooperative:  # under eager every partition is revoked: assigned() tells which stay
            self._release(parts)
        log.info("revoked partitions %s (%s)", sorted(parts), "committed" if committed else "not committed")

    def assigned(self, tps: Iterable[TopicPartition]) -> None:
        parts = self._ours(tps)
        if not self.cooperative:
            self._release(self.owned - parts)
        added = parts - self.owned
        self.owned |= added
        if added:
            self.consumer.pause(self._tps(added))  # nothing is consumed from them before their restore
            self.to_restore |= added
        if added:
            log.info("owning partitions %s (%s to restore)", sorted(self.owned), sorted(self.to_restore))

    def lost(self, tps: Iterable[TopicPartition]) -> None:
        parts = self._ours(tps)
        self.committer.abort("partitions lost: this member left the group")
        self._release(parts)
        if self.owned:  # the aborted transaction held their work too
            self.committer.failed = self.committer.failed or "aborted"
        log.info("aborted the open transaction and dropped the state of partitions %s", sorted(parts))

    def _release(self, parts: set[int]) -> None:
        if parts:
            dropped = self.ledger.drop(parts)
            log.info("dropped the state of %d series of partitions %s", dropped, sorted(parts))
        self.owned -= parts
        self.to_restore -= parts

    def _ours(self, tps: Iterable[TopicPartition]) -> set[int]:
        return {tp.partition for tp in tps if tp.topic == self.topic}

    def _tps(self, parts: Iterable[int]) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in sorted(parts)]

    # ---- the loop (main thread) ----------------------------------------------------------------------

    @property
    def required(self) -> bool:
        """A transaction failed (state goes back to the last commit) or partitions wait for their restore."""
        return self.committer.failed is not None or bool(self.to_restore)

    @property
    def rewinding(self) -> bool:
        """A transaction failed: records polled since are consumed again after the reset."""
        return self.committer.failed is not None

    def run(self) -> None:
        """Reset after a failed transaction, restore newly assigned partitions."""
        if self.committer.failed is not None:
            # Step 1. a usable producer (the open transaction is aborted or settled).
            self.committer.recover()
            # Step 2. forget every owned series; all owned partitions restore from the changelog.
            self.ledger.drop(None)
            self.to_restore = set(self.owned)
            if self._rejoin_if_forgotten():
                return
            if self.owned:
                self.consumer.pause(self._tps(self.owned))
        if self.to_restore:
            try:
                self.restore(set(self.to_restore))
            except KafkaClientError as exc:
                if exc.reason in ("auth", "fatal"):  # trying again cannot help
                    raise
                # E.g. just after a broker restart: the changelog's partitions not known yet. They stay
                # paused and are restored from the start on a later turn (a stall shows in /healthz).
                log.warning("restoring partitions %s failed, trying again: %s", sorted(self.to_restore), exc)
                self._restore_backoff.wait()
            else:
                self._restore_backoff.reset()

    def _rejoin_if_forgotten(self) -> bool:
        """Twice in a row the group refused this member's offsets while the consumer saw no rebalance: the
        group has dropped it without the consumer noticing (kafka-python can stop heartbeating after a
        join that completed during a short poll; the transactional offset commit goes through the
        producer, so the consumer never learns). Leave and join again: the assignment is restored anew."""
        refused = is_group_fenced(self.committer.error)
        generation = self.consumer.generation() if refused else None
        forgotten = generation is not None and generation == self._refused_generation
        self._refused_generation = generation
        if not forgotten:
            return False
        log.warning(
            "the group refused this member's offsets twice at generation %s without a rebalance here:"
            " leaving the group and joining again",
            generation,
        )
        self.owned, self.to_restore, self._refused_generation = set(), set(), None
        self.consumer.unsubscribe()
        self.consumer.subscribe(self.topic, self.rebalance)
        return True

    def restore(self, parts: set[int]) -> RestoreReport:
        """Committed offsets, changelog to its end, load, seek, resume: for ``parts``."""
        started = time.monotonic()
        tps = self._tps(parts)
        # Step 1. where consumption resumes; waits while a previous owner's transaction is unsettled.
        committed = self.consumer.committed(tps, self.reader.stable_timeout)
        # Step 2. the state as of those offsets: what the partitions held is dropped (a restore after a
        # failure starts clean), their changelog is read to its end and loaded (evicted series into the
        # evicted store as they are read, the others into the table).
        report = self.ledger.restore(self.reader, parts)
        # Step 3. consume from the committed offsets.
        for tp, offset in committed.items():
            self.consumer.seek(tp, offset)  # None: from the beginning
        self.consumer.resume(tps)
        report.seconds = time.monotonic() - started
        log.info(
            "restored partitions %s: %d series resident, %d evicted kept aside, %d refused, from %d"
            " changelog records in %.2f s",
            report.partitions,
            report.resident,
            report.evicted,
            sum(report.refused.values()),
            report.records,
            report.seconds,
        )
        self.on_restore(report)
        self.to_restore -= parts  # ready again (/readyz) once the figures are out
        return report

    def close(self) -> None:
        self.reader.close()
        self.ledger.store.close()
