"""Evicted series' snapshots, kept until the series comes back: a byte budget in memory, the rest on disk.

A series evicted from the state table (idle TTL, or LRU above ``state.max_series``) is written to the
changelog flagged as evicted, and its snapshot is kept here so that it resumes exactly when it returns.
``EvictedStore`` holds the most recently evicted snapshots in memory up to ``memory_bytes`` (snapshot,
series id and a fixed per-entry overhead counted) and spills the oldest to one SQLite file, so the
process's memory does not grow with the number of series that ever existed; the disk holds what the
compacted changelog holds for those series.

The file (``<spill_dir>/evicted-<name>.sqlite``) is only a cache of the changelog for the partitions this
instance owns: it is unlinked and created anew when the store opens (a restart restores from the
changelog), written without a journal (a crash loses nothing the changelog does not have), and an
instance that still has the old file open keeps its own copy (unlinked files live on while open).

>>> import tempfile
>>> store = EvictedStore(memory_bytes=300, spill_dir=tempfile.mkdtemp(), name="doctest")
>>> store.put("a", 0, b"x" * 100); store.put("b", 1, b"y" * 100)
>>> store.stats()["disk_series"], store.stats()["memory_series"]  # a went to disk, b fits in memory
(1, 1)
>>> [(name, partition, len(snapshot)) for name, partition, snapshot in store.take(["a", "zzz"])]
[('a', 0, 100)]
>>> store.drop({1}), len(store)
(1, 0)
>>> store.close()
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

ENTRY_OVERHEAD = 160  # bytes per in-memory entry beyond snapshot and id: dict slot, tuple, objects
_CHUNK = 500  # ids per SQLite statement (well under its variable limit)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def spill_path(spill_dir: str | os.PathLike[str], name: str) -> Path:
    """The store file of instance ``name`` under ``spill_dir``."""
    return Path(spill_dir) / f"evicted-{_UNSAFE.sub('_', name)[:200]}.sqlite"


class EvictedStore:
    """Evicted snapshots by series id, with each series' input partition (see the module docstring).

    A series is in memory or on disk, never both; ``put`` replaces an older snapshot of the same series.
    The methods may be called from the consumer's callback thread (a revoke drops a partition), so they
    hold one lock.
    """

    def __init__(
        self, memory_bytes: int, spill_dir: str | os.PathLike[str] | None = None, name: str = "forecaster"
    ) -> None:
        self.memory_bytes = int(memory_bytes)
        self.path = None if spill_dir is None else spill_path(spill_dir, name)  # None: an in-memory database
        self._memory: OrderedDict[str, tuple[int, bytes]] = OrderedDict()  # oldest first
        self._memory_used = 0
        self._disk_series = 0
        self._disk_bytes = 0
        self._spilled_total = 0
        self._lock = threading.Lock()
        self._db = self._open()

    # ---- the file ------------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        """Step 1. a fresh file: unlink what a previous run left (its content is in the changelog).
        Step 2. no journal, no fsync: the file is a cache, never the record."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for suffix in ("", "-journal", "-wal"):
                self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
        where = ":memory:" if self.path is None else str(self.path)
        db = sqlite3.connect(where, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute(
            "CREATE TABLE evicted (series TEXT PRIMARY KEY, part INTEGER NOT NULL, snapshot BLOB NOT NULL)"
        )
        db.execute("CREATE INDEX evicted_part ON evicted (part)")
        self._inode = None if self.path is None else self.path.stat().st_ino
        log.info("evicted series: up to %d bytes in memory, the rest spilled to %s", self.memory_bytes, where)
        return db

    def close(self) -> None:
        """Close and remove the file (unless a newer instance has made its own under the same name)."""
        with self._lock:
            self._db.close()
            with contextlib.suppress(FileNotFoundError):
                if self.path is not None and self.path.stat().st_ino == self._inode:
                    self.path.unlink()

    # ---- the store -----------------------------------------------------------------------------------

    def put(self, series: str, partition: int, snapshot: bytes) -> None:
        """Keep ``snapshot`` of evicted ``series`` (replacing an older one), spilling the oldest over budget."""
        with self._lock:
            self._forget([series])
            self._memory[series] = (partition, snapshot)
            self._memory_used += _cost(series, snapshot)
            self._spill()

    def take(self, series: Iterable[str]) -> list[tuple[str, int, bytes]]:
        """Remove and return ``(series, partition, snapshot)`` of those of ``series`` held here."""
        names = list(dict.fromkeys(series))
        with self._lock:
            found = [(name, *entry) for name, entry in self._pop_memory(names)]
            held = {name for name, _, _ in found}
            return found + self._pop_disk([n for n in names if n not in held])

    def discard(self, series: str) -> None:
        """Forget ``series`` if held (a newer state of it exists elsewhere)."""
        with self._lock:
            self._forget([series])

    def drop(self, partitions: set[int] | None) -> int:
        """Forget every series of ``partitions`` (None: all); returns how many."""
        with self._lock:
            if partitions is None:
                n = len(self._memory) + self._disk_series
                self._memory.clear()
                self._memory_used = 0
                self._db.execute("DELETE FROM evicted")
                self._disk_series = self._disk_bytes = 0
                return n
            n = len(self._pop_memory([s for s, (p, _) in self._memory.items() if p in partitions]))
            if self._disk_series and partitions:
                marks = ",".join("?" * len(partitions))
                where = f"FROM evicted WHERE part IN ({marks})"
                count, size = self._db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(LENGTH(snapshot)), 0) {where}", sorted(partitions)
                ).fetchone()
                self._db.execute(f"DELETE {where}", sorted(partitions))
                self._disk_series -= count
                self._disk_bytes -= size
                n += count
            return n

    def __len__(self) -> int:
        return len(self._memory) + self._disk_series

    def __contains__(self, series: object) -> bool:
        with self._lock:
            if series in self._memory:
                return True
            if not self._disk_series:
                return False
            row = self._db.execute("SELECT 1 FROM evicted WHERE series = ?", (series,)).fetchone()
            return row is not None

    def stats(self) -> dict[str, int]:
        """Series and bytes held in memory and on disk, and how many were ever spilled."""
        return {
            "memory_series": len(self._memory),
            "memory_bytes": self._memory_used,
            "disk_series": self._disk_series,
            "disk_bytes": self._disk_bytes,
            "spilled_total": self._spilled_total,
        }

    # ---- inside the lock -----------------------------------------------------------------------------

    def _forget(self, names: list[str]) -> None:
        self._pop_memory(names)
        self._pop_disk(names)

    def _pop_memory(self, names: list[str]) -> list[tuple[str, tuple[int, bytes]]]:
        popped = [(name, self._memory.pop(name)) for name in names if name in self._memory]
        self._memory_used -= sum(_cost(name, snapshot) for name, (_, snapshot) in popped)
        return popped

    def _pop_disk(self, names: list[str]) -> list[tuple[str, int, bytes]]:
        if not self._disk_series:
            return []
        popped = []
        for chunk in _chunks(names):
            where = f"FROM evicted WHERE series IN ({','.join('?' * len(chunk))})"
            rows = self._db.execute(f"SELECT series, part, snapshot {where}", chunk).fetchall()
            if rows:
                self._db.execute(f"DELETE {where}", chunk)
                self._disk_series -= len(rows)
                self._disk_bytes -= sum(len(snapshot) for _, _, snapshot in rows)
                popped += [(name, partition, bytes(snapshot)) for name, partition, snapshot in rows]
        return popped

    def _spill(self) -> None:
        """Over budget: move the oldest entries to disk, down to 90% of the budget (one transaction)."""
        if self._memory_used <= self.memory_bytes:
            return
        rows = []
        low = self.memory_bytes * 0.9  # a margin, so that evictions one by one do not spill one by one
        while self._memory and self._memory_used > low:
            name, (partition, snapshot) = self._memory.popitem(last=False)
            self._memory_used -= _cost(name, snapshot)
            rows.append((name, partition, snapshot))
            self._disk_bytes += len(snapshot)
        self._db.execute("BEGIN")
        self._db.executemany("INSERT INTO evicted (series, part, snapshot) VALUES (?, ?, ?)", rows)
        self._db.execute("COMMIT")
        self._disk_series += len(rows)
        self._spilled_total += len(rows)


def _cost(series: str, snapshot: bytes) -> int:
    return len(snapshot) + len(series) + ENTRY_OVERHEAD


def _chunks(names: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(names), _CHUNK):
        yield names[i : i + _CHUNK]
