"""Per-series bookkeeping of the state changelog: each series' input partition, the changelog records of a
commit, evicted series kept on the host, dropping a partition's series, and loading changelog contents.

``SeriesLedger`` knows the input partition of every series (the changelog partition its state goes to),
collects the changelog records of each commit (the series changed since the last one, and the series
evicted, flagged so), keeps evicted series' snapshots on the host so a series that comes back resumes,
and loads changelog contents into the engine (refusing, with a log line and a count, what it cannot use).

>>> ledger = SeriesLedger(engine=None)
>>> ledger.note(["a", "b"], [0, 1])
>>> sorted(ledger.series_of({1}))
['b']
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from forecaster.service.exactly_once import changelog
from forecaster.service.exactly_once.changelog import ChangelogContents

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
            out.extend(
                self._record(n, s, False)
                for n, s in zip(dirty, self.engine.snapshot_many(dirty), strict=True)
            )
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
            name,
            partition,
            reason,
            error,
        )
