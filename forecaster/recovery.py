"""Which series this instance owns, their changelog records, and restoring them on assignment or failure.

``SeriesLedger`` knows the input partition of every series (the changelog partition its state goes to),
collects the changelog records of each commit (the series changed since the last one, and the series
evicted, flagged so), keeps evicted series' snapshots on the host so a series that comes back resumes,
and loads changelog contents into the engine. ``PartitionOwner`` reacts to the consumer group:

- assigned: the new partitions are paused; after the poll, before any of their records is consumed, the
  committed offsets are read (waiting for a previous owner's transaction to settle), the changelog
  partitions are read to their end and loaded, the consumer seeks to the committed offsets, and the
  partitions resume;
- revoked: commit, then drop those partitions' series (under eager assignment every partition is revoked
  at each rebalance; those assigned back keep their state, which the commit just made durable);
- lost (the member was evicted from the group): abort, drop;
- a failed transaction: every owned series is dropped and restored as above (the last committed state).

>>> ledger = SeriesLedger(engine=None)
>>> ledger.note(["a", "b"], [0, 1])
>>> sorted(ledger.series_of({1}))
['b']
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener
from kafka.structs import TopicPartition

from forecaster import changelog
from forecaster.changelog import ChangelogContents, ChangelogReader
from forecaster.transactions import is_group_fenced

log = logging.getLogger(__name__)


@dataclass
class RestoreReport:
    """What one restore loaded."""

    partitions: list[int]
    resident: int = 0  # series loaded into the state table
    evicted: int = 0  # series kept on the host until they come back
    refused: dict[str, int] = field(default_factory=dict)  # reason -> series started fresh
    records: int = 0  # changelog records read
    seconds: float = 0.0


class SeriesLedger:
    """Per-series bookkeeping for the changelog (see the module docstring)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.partition_of: dict[str, int] = {}
        self.cold: dict[str, bytes] = {}  # evicted series -> snapshot, until they come back
        self.evicted: dict[str, bytes] = {}  # evicted since the last commit -> snapshot (to write)

    def note(self, series: Sequence[str], partitions: Sequence[int]) -> None:
        """The input partition of each stepped value's series."""
        self.partition_of.update(zip(series, partitions, strict=True))

    def on_evict(self, series: str, snapshot: bytes) -> None:
        """The state table's eviction callback."""
        self.cold[series] = snapshot
        self.evicted[series] = snapshot

    def revive(self, series: Iterable[str]) -> int:
        """Load the evicted ones among ``series`` back into the table before they step; returns how many."""
        if not self.cold:
            return 0
        back = [s for s in dict.fromkeys(series) if s in self.cold]
        if back:
            refused = self.engine.restore_many([(s, self.cold.pop(s)) for s in back])
            for name, error in refused:  # e.g. the model changed shape since: the series starts fresh
                log.warning("evicted series %r could not be revived, starting fresh: %s", name, error)
        return len(back)

    def changes(self) -> list[tuple[int, bytes, bytes]]:
        """``(partition, key, value)`` of every series changed or evicted since the last call."""
        dirty = sorted(self.engine.take_dirty())
        out = []
        for name, snapshot in self.evicted.items():
            if name not in self.engine.table.slots:  # came back and changed: its new state is written below
                out.append(self._record(name, snapshot, evicted=True))
        self.evicted = {}
        if dirty:
            out.extend(self._record(n, s, False) for n, s in zip(dirty, self.engine.snapshot_many(dirty), strict=True))
        return [r for r in out if r[0] >= 0]

    def _record(self, name: str, snapshot: bytes, evicted: bool) -> tuple[int, bytes, bytes]:
        partition = self.partition_of.get(name, -1)
        if partition < 0:
            log.warning("series %r has no known input partition: its state is not written", name)
        return partition, name.encode(), changelog.encode(snapshot, evicted)

    def series_of(self, partitions: set[int] | None) -> list[str]:
        """Series of these partitions (None: every series known)."""
        if partitions is None:
            return list(self.partition_of)
        return [s for s, p in self.partition_of.items() if p in partitions]

    def drop(self, partitions: set[int] | None) -> int:
        """Forget the series of ``partitions`` (None: all): table, host copies, pending records."""
        if partitions is None:
            names = list(self.engine.table.slots)
            self.partition_of, self.cold, self.evicted = {}, {}, {}
        else:
            names = self.series_of(partitions)
            for name in names:
                del self.partition_of[name]
                self.cold.pop(name, None)
                self.evicted.pop(name, None)
        return len(self.engine.drop(names))

    def load(self, contents: ChangelogContents) -> RestoreReport:
        """Put changelog contents into the table (evicted series on the host); bad records are refused
        with a log line and counted, and those series start fresh."""
        report = RestoreReport(sorted(contents.latest), records=contents.records, seconds=contents.seconds)
        items: list[tuple[str, bytes]] = []
        for partition, latest in contents.latest.items():
            for name, value in latest.items():
                if value is None:  # a tombstone: nothing to restore
                    continue
                try:
                    snapshot, evicted = changelog.decode(value)
                except changelog.ChangelogRecordError as exc:
                    self._refuse(report, name, partition, exc)
                    continue
                self.partition_of[name] = partition
                if evicted:
                    self.cold[name] = snapshot
                    report.evicted += 1
                else:
                    items.append((name, snapshot))
        refused = self.engine.restore_many(items)
        for name, error in refused:
            self._refuse(report, name, self.partition_of.pop(name, -1), error)
        report.resident = len(items) - len(refused)
        return report

    def _refuse(self, report: RestoreReport, name: str, partition: int, error: Exception) -> None:
        reason = changelog.refusal(error)  # type: ignore[arg-type]
        report.refused[reason] = report.refused.get(reason, 0) + 1
        log.warning(
            "changelog record of series %r (partition %d) refused (%s), the series starts fresh: %s",
            name, partition, reason, error,
        )


class PartitionOwner:
    """Follows the group's assignment for ``topic``; see the module docstring.

    The listener methods run on the consumer's network thread (kafka-python), where only producer calls
    and local consumer state (pause) are allowed; everything that waits on the consumer (committed
    offsets, seeks after a restore) happens in ``catch_up``, called by the loop after every poll.
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
        self.listener: Any = None  # set by OwnerListener: subscribing again needs it
        self._refused_generation: int | None = None  # generation of the last commit refused by the group

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
            self.consumer.pause(*self._tps(added))  # nothing is consumed from them before their restore
            self.to_restore |= added
        log.info("assigned partitions %s (%s to restore)", sorted(self.owned), sorted(self.to_restore))

    def lost(self, tps: Iterable[TopicPartition]) -> None:
        parts = self._ours(tps)
        self.committer.abort("partitions lost: this member left the group")
        self._release(parts)
        if self.owned:  # the aborted transaction held their work too
            self.committer.failed = self.committer.failed or "aborted"
        log.warning("lost partitions %s (the group went on without this member)", sorted(parts))

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

    def catch_up(self) -> bool:
        """After a poll: reset after a failed transaction, restore newly assigned partitions. Returns True
        when the records of that poll must be dropped (state and positions went back to the last commit)."""
        reset = self.committer.failed is not None
        if reset:
            # Step 1. a usable producer (the open transaction is aborted or settled).
            self.committer.recover()
            # Step 2. forget every owned series; all owned partitions restore from the changelog.
            self.ledger.drop(None)
            self.to_restore = set(self.owned)
            if self._rejoin_if_forgotten():
                return True
            if self.owned:
                self.consumer.pause(*self._tps(self.owned))
        if self.to_restore:
            self.restore(set(self.to_restore))
        return reset

    def _rejoin_if_forgotten(self) -> bool:
        """Twice in a row the group refused this member's offsets while the consumer saw no rebalance: the
        group has dropped it without the consumer noticing (kafka-python can stop heartbeating after a
        join that completed during a short poll; the transactional offset commit goes through the
        producer, so the consumer never learns). Leave and join again: the assignment is restored anew."""
        refused = is_group_fenced(self.committer.error)
        generation = getattr(self.consumer.group_metadata(), "generation_id", None) if refused else None
        forgotten = refused and generation == self._refused_generation
        self._refused_generation = generation
        if not forgotten or self.listener is None:
            return False
        log.warning(
            "the group refused this member's offsets twice at generation %s without a rebalance here:"
            " leaving the group and joining again", generation,
        )
        self.owned, self.to_restore, self._refused_generation = set(), set(), None
        self.consumer.unsubscribe()
        self.consumer.subscribe([self.topic], listener=self.listener)
        return True

    def restore(self, parts: set[int]) -> RestoreReport:
        """Committed offsets, changelog to its end, load, seek, resume: for ``parts``."""
        started = time.monotonic()
        tps = self._tps(parts)
        # Step 1. where consumption resumes; waits while a previous owner's transaction is unsettled.
        committed = {tp: self.consumer.committed(tp) for tp in tps}
        # Step 2. the state as of those offsets: the changelog partitions, read to their end.
        contents = self.reader.read(parts)
        # Step 3. into the table (and evicted series onto the host).
        self.ledger.drop(parts)  # a partition restored again after a failure starts clean
        report = self.ledger.load(contents)
        # Step 4. consume from the committed offsets.
        for tp, offset in committed.items():
            if offset is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, offset)
        self.consumer.resume(*tps)
        report.seconds = time.monotonic() - started
        log.info(
            "restored partitions %s: %d series resident, %d evicted kept on the host, %d refused, from %d"
            " changelog records in %.2f s",
            report.partitions, report.resident, report.evicted, sum(report.refused.values()),
            report.records, report.seconds,
        )
        self.on_restore(report)
        self.to_restore -= parts  # ready again (/readyz) once the figures are out
        return report


class OwnerListener(ConsumerRebalanceListener):
    """The consumer's rebalance listener, handing each event to a ``PartitionOwner``."""

    def __init__(self, owner: PartitionOwner) -> None:
        self.owner = owner
        owner.listener = self

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.owner.revoked(revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.owner.assigned(assigned)

    def on_partitions_lost(self, lost: Any) -> None:
        self.owner.lost(lost)
