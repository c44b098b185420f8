"""The state changelog: one compacted topic, co-partitioned with the input, keyed by series id.

Each record's value is a versioned envelope around one series' ``StateTable`` snapshot (hidden and cell
state, scaling statistics, retained window, last ts, last forecast, the model version that made it)::

    b"FCCL" | u8 envelope version | u8 flags (bit 0: the series was evicted) | snapshot bytes

Records are written inside the commit's transaction, so the changelog read with ``read_committed`` always
holds the state as of the committed input offsets. ``ChangelogReader`` reads partitions to their end;
``decode`` refuses a record it cannot use with a ``ChangelogRecordError`` whose ``reason`` is a metric label
(the caller logs it, counts it, and the series starts fresh).

>>> value = encode(b"snapshot bytes", evicted=True)
>>> value[:4], decode(value)
(b'FCCL', (b'snapshot bytes', True))
>>> try:
...     decode(b"FCCL\\x09\\x00...")
... except ChangelogRecordError as exc:
...     exc.reason
'unknown_version'
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from forecaster.config import KafkaSettings
from forecaster.engine import snapshot as snap
from forecaster.errors import ChangelogRecordError, KafkaClientError, KafkaSetupError, StateError
from forecaster.service.clients import (
    COMPACTED,
    ConsumerOptions,
    TopicPartition,
    TopicSpec,
    ensure_topics,
    make_admin,
    make_consumer,
)

log = logging.getLogger(__name__)

MAGIC = b"FCCL"
ENVELOPE_VERSION = 1
FLAG_EVICTED = 0x01
_HEAD = struct.Struct("<BB")  # envelope version, flags
# Why a changelog record was refused (metric label values).
REFUSALS = ("corrupt", "unknown_version", "incompatible")
# Topic configs used only when the service creates the changelog: small segments so compaction keeps the
# topic (and a restore's read) close to one record per series. An existing topic must only be compacted.
CREATE_CONFIG: Mapping[str, str] = {
    **COMPACTED,
    "segment.bytes": str(64 * 1024 * 1024),
    "segment.ms": str(10 * 60 * 1000),
    "min.cleanable.dirty.ratio": "0.2",
}


def encode(snapshot: bytes, evicted: bool = False) -> bytes:
    """The changelog value of one series' snapshot."""
    return MAGIC + _HEAD.pack(ENVELOPE_VERSION, FLAG_EVICTED if evicted else 0) + snapshot


def decode(value: bytes | None) -> tuple[bytes, bool]:
    """(snapshot bytes, evicted) of a changelog value; raises ``ChangelogRecordError``.

    The snapshot's own format version is checked here too, so both layers refuse an unknown version with
    the same reason; its checksum and shape are checked when it is loaded (``refusal`` maps those).
    """
    if value is None or len(value) < len(MAGIC) + _HEAD.size or not value.startswith(MAGIC):
        raise ChangelogRecordError("corrupt", "not a changelog record (bad magic or too short)")
    version, flags = _HEAD.unpack_from(value, len(MAGIC))
    if version != ENVELOPE_VERSION:
        raise ChangelogRecordError(
            "unknown_version", f"changelog envelope version {version} (this build reads {ENVELOPE_VERSION})"
        )
    payload = value[len(MAGIC) + _HEAD.size :]
    inner = len(snap.MAGIC)
    if len(payload) >= inner + 2 and payload.startswith(snap.MAGIC):
        (fmt,) = struct.unpack_from("<H", payload, inner)
        if fmt != snap.FORMAT_VERSION:
            raise ChangelogRecordError(
                "unknown_version", f"state snapshot format {fmt} (this build reads {snap.FORMAT_VERSION})"
            )
    return payload, bool(flags & FLAG_EVICTED)


def refusal(error: StateError) -> str:
    """The ``REFUSALS`` label of a snapshot the state table would not load."""
    if isinstance(error, ChangelogRecordError):
        return error.reason
    text = str(error)
    if "does not fit" in text or "do not match" in text:
        return "incompatible"
    if "unknown state snapshot format" in text:
        return "unknown_version"
    return "corrupt"


def ensure_changelog(kafka: KafkaSettings, input_topic: str, admin: Any = None, create: bool = True) -> int:
    """Create ``kafka.changelog_topic`` (compacted, as many partitions as ``input_topic``) if missing
    (``create``; else a missing one is an error); returns the partition count. An existing changelog with
    another count or not compacted is a ``KafkaSetupError`` that says so: restoring from it would load
    the wrong series."""
    own = admin is None
    admin = make_admin(kafka) if own else admin
    timeout = kafka.request_timeout_ms / 1000.0
    try:
        described = admin.describe([input_topic, kafka.changelog_topic], [], timeout)
        if input_topic not in described:
            raise KafkaSetupError(f"cannot describe input topic {input_topic}: it does not exist")
        partitions = described[input_topic].partitions
        exists = kafka.changelog_topic in described
        if not exists and not create:
            raise KafkaSetupError(f"topic {kafka.changelog_topic} does not exist (deploy/topics creates it)")
        config = COMPACTED if exists else CREATE_CONFIG
        spec = TopicSpec(kafka.changelog_topic, partitions, kafka.replication_factor, config=config)
        created = ensure_topics(admin, [spec])
        if created:
            log.info(
                "created changelog topic %s (%d partitions, compacted)", kafka.changelog_topic, partitions
            )
        return partitions
    except KafkaSetupError as exc:
        raise KafkaSetupError(
            f"state changelog {kafka.changelog_topic} does not fit input {input_topic}: {exc}"
        ) from exc
    except KafkaClientError as exc:
        raise KafkaSetupError(f"cannot set up the state changelog {kafka.changelog_topic}: {exc}") from exc
    finally:
        if own:
            admin.close()


@dataclass
class ChangelogContents:
    """The latest value per series of some changelog partitions, and what reading them took."""

    latest: dict[int, dict[str, bytes | None]]  # partition -> series -> value (None: a tombstone)
    records: int = 0
    seconds: float = 0.0


class ChangelogReader:
    """Reads changelog partitions from the beginning to their end, outside any consumer group.

    ``consumer`` is a ``read_committed`` consumer (records of aborted or open transactions are never
    loaded) and ``probe`` a ``read_uncommitted`` one used only for end offsets: while the last stable offset
    is below the high watermark a transaction is still open (a previous owner's, being committed or
    aborted), and the reader waits for it up to ``stable_timeout`` seconds, so a commit that completes
    just after a rebalance is not missed.
    """

    def __init__(
        self,
        topic: str,
        consumer: Any,
        probe: Any,
        *,
        stable_timeout: float = 60.0,
        stall_timeout: float = 120.0,
        poll_ms: int = 200,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.topic = topic
        self.consumer = consumer
        self.probe = probe
        self.stable_timeout = stable_timeout
        self.stall_timeout = stall_timeout  # no record and no position change this long: give up (raise)
        self.poll_ms = poll_ms
        self.clock = clock
        self.sleep = sleep

    @classmethod
    def from_settings(cls, kafka: KafkaSettings, stable_timeout: float) -> ChangelogReader:
        reader = {"group_id": None, "max_partition_fetch_bytes": 8 << 20, "fetch_wait_max_ms": 100}
        return cls(
            kafka.changelog_topic,
            make_consumer(
                kafka, ConsumerOptions(**reader, isolation_level="read_committed", fetch_max_bytes=64 << 20)
            ),
            make_consumer(kafka, ConsumerOptions(**reader, isolation_level="read_uncommitted")),
            stable_timeout=stable_timeout,
        )

    def read(
        self, partitions: Iterable[int], divert: Callable[[int, str, bytes | None], bool] | None = None
    ) -> ChangelogContents:
        """The latest value of every series in ``partitions`` (each read to its end). ``divert(partition,
        series, value)``, called on every record in order, may take a record instead (returns True): it is
        then not kept, and an earlier value of that series is forgotten."""
        started = self.clock()
        tps = [TopicPartition(self.topic, p) for p in sorted(set(partitions))]
        latest: dict[int, dict[str, bytes | None]] = {tp.partition: {} for tp in tps}
        if not tps:
            return ChangelogContents(latest)
        ends = self._stable_ends(tps)
        self.consumer.assign(dict.fromkeys(tps))
        left = {tp for tp in tps if ends[tp] > 0}
        n, progress = 0, self.clock()
        while left:
            for record in self.consumer.poll(max_records=10_000, timeout=self.poll_ms / 1000.0):
                if record.offset < ends[(record.topic, record.partition)] and record.key is not None:
                    name, into = record.key.decode("utf-8", "replace"), latest[record.partition]
                    if divert is not None and divert(record.partition, name, record.value):
                        into.pop(name, None)
                    else:
                        into[name] = record.value
                    n += 1
                progress = self.clock()
            positions = self.consumer.position(sorted(left))
            still = {tp for tp in left if positions.get(tp, -1) < ends[tp]}
            if still != left:
                progress = self.clock()
            elif self.clock() - progress > self.stall_timeout:
                raise KafkaSetupError(
                    f"changelog {self.topic} partitions {sorted(tp.partition for tp in still)} stopped short of"
                    f" their end for {self.stall_timeout:g} s"
                )
            left = still
        self.consumer.assign({})
        return ChangelogContents(latest, n, self.clock() - started)

    def _stable_ends(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        deadline = self.clock() + self.stable_timeout
        while True:
            stable = self.consumer.end_offsets(tps, self.stable_timeout)  # last stable offsets
            high = self.probe.end_offsets(tps, self.stable_timeout)
            open_ = [tp.partition for tp in tps if stable[tp] < high[tp]]
            if not open_:
                return stable
            if self.clock() >= deadline:
                log.warning(
                    "changelog %s partitions %s still hold an open transaction after %.0f s: restoring what"
                    " is committed",
                    self.topic,
                    open_,
                    self.stable_timeout,
                )
                return stable
            self.sleep(0.1)

    def close(self) -> None:
        for client in (self.consumer, self.probe):
            client.close()
