"""Per-series bookkeeping of the state changelog: each series' input partition, the changelog records of a
commit, evicted series kept aside, dropping a partition's series, and loading changelog contents.

``SeriesLedger`` knows the input partition of every resident series (the changelog partition its state
goes to), collects the changelog records of each commit (the series changed since the last one, and the
series evicted, flagged so), keeps evicted series' snapshots in an ``EvictedStore`` (a byte budget in
memory, the rest on disk) so a series that comes back resumes, and loads changelog contents into the
engine (refusing, with a log line and a count, what it cannot use); on a restore, evicted series go
straight to the store as the changelog is read, never all into memory.

>>> ledger = SeriesLedger(engine=None)
>>> ledger.note(["a", "b"], [0, 1])
>>> sorted(ledger.series_of({1}))
['b']
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from forecaster.service.exactly_once import changelog
from forecaster.service.exactly_once.changelog import ChangelogContents
from forecaster.service.exactly_once.evicted import EvictedStore

log = logging.getLogger(__name__)


@dataclass
class RestoreReport:
    """What one restore loaded."""

    partitions: list[int]
    resident: int = 0  # series loaded into the state table
    evicted: int = 0  # series kept in the evicted store until they come back
    refused: dict[str, int] = field(default_factory=dict)  # reason -> series started fresh
    records: int = 0  # changelog records read
    seconds: float = 0.0


class SeriesLedger:
    """Per-series bookkeeping for the changelog (see the module docstring); ``store`` holds evicted
    series (default: one without a file, everything in memory)."""

    def __init__(self, engine: Any, store: EvictedStore | None = None) -> None:
        self.engine = engine
        self.partition_of: dict[str, int] = {}  # resident series -> input partition
        self.store = store if store is not None else EvictedStore(memory_bytes=1 << 62)
        self.evicted: dict[str, tuple[int, bytes]] = {}  # evicted since the last commit (to write)

    def note(self, series: Sequence[str], partitions: Sequence[int]) -> None:
        """The input partition of each stepped value's series."""
        self.partition_of.update(zip(series, partitions, strict=True))

    def on_evict(self, series: str, snapshot: bytes) -> None:
        """The state table's eviction callback: the snapshot to the store, its partition with it."""
        partition = self.partition_of.pop(series, -1)
        if partition >= 0:
            self.store.put(series, partition, snapshot)
        self.evicted[series] = (partition, snapshot)

    def revive(self, series: Sequence[str]) -> int:
        """Load the evicted ones among ``series`` back into the table before they step; returns how many.
        Making room for them evicts none of ``series`` (a resident series of the batch evicted here would
        step from a fresh state)."""
        if not len(self.store):
            return 0
        slots = self.engine.table.slots
        back = self.store.take(s for s in series if s not in slots)
        if back:
            self.partition_of.update((name, partition) for name, partition, _ in back)
            refused = self.engine.restore_many([(name, snapshot) for name, _, snapshot in back], keep=series)
            for name, error in refused:  # e.g. the model changed shape since: the series starts fresh
                log.warning("evicted series %r could not be revived, starting fresh: %s", name, error)
        return len(back)

    def changes(self) -> list[tuple[int, bytes, bytes]]:
        """``(partition, key, value)`` of every series changed or evicted since the last call."""
        dirty = sorted(self.engine.take_dirty())
        out = []
        for name, (partition, snapshot) in self.evicted.items():
            if name not in self.engine.table.slots:  # came back and changed: its new state is written below
                out.append(self._record(name, snapshot, True, partition))
        self.evicted = {}
        if dirty:
            out.extend(
                self._record(n, s, False)
                for n, s in zip(dirty, self.engine.snapshot_many(dirty), strict=True)
            )
        return [r for r in out if r[0] >= 0]

    def _record(
        self, name: str, snapshot: bytes, evicted: bool, partition: int | None = None
    ) -> tuple[int, bytes, bytes]:
        partition = self.partition_of.get(name, -1) if partition is None else partition
        if partition < 0:
            log.warning("series %r has no known input partition: its state is not written", name)
        return partition, name.encode(), changelog.encode(snapshot, evicted)

    def series_of(self, partitions: set[int] | None) -> list[str]:
        """Series of these partitions (None: every series known)."""
        if partitions is None:
            return list(self.partition_of)
        return [s for s, p in self.partition_of.items() if p in partitions]

    def drop(self, partitions: set[int] | None) -> int:
        """Forget the series of ``partitions`` (None: all): table, evicted store, pending records."""
        if partitions is None:
            names = list(self.engine.table.slots)
            self.partition_of, self.evicted = {}, {}
        else:
            names = self.series_of(partitions)
            for name in names:
                del self.partition_of[name]
            self.evicted = {n: e for n, e in self.evicted.items() if e[0] not in partitions}
        self.store.drop(partitions)
        return len(self.engine.drop(names))

    def restore(self, reader: Any, partitions: set[int]) -> RestoreReport:
        """Read ``partitions`` of the changelog to their end and load them: evicted series go to the store
        record by record as they are read (``divert``), the rest into the table (``load``)."""
        self.drop(partitions)  # a partition restored again after a failure starts clean
        held = len(self.store)
        report = self.load(reader.read(partitions, divert=self.divert))
        report.evicted = len(self.store) - held
        return report

    def divert(self, partition: int, name: str, value: bytes | None) -> bool:
        """A changelog record as it is read: an evicted series' snapshot goes to the store (True); anything
        else stays with the reader (False) and supersedes an earlier evicted record of that series."""
        try:
            snapshot, evicted = changelog.decode(value) if value is not None else (b"", False)
        except changelog.ChangelogRecordError:
            evicted = False  # refused (and counted) by load()
        if not evicted:
            self.store.discard(name)
            return False
        self.store.put(name, partition, snapshot)
        return True

    def load(self, contents: ChangelogContents) -> RestoreReport:
        """Put changelog contents into the table (evicted series into the store); bad records are refused
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
                if evicted:
                    self.store.put(name, partition, snapshot)
                    report.evicted += 1
                else:
                    self.partition_of[name] = partition
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
            name,
            partition,
            reason,
            error,
        )
