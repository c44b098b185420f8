"""The small Kafka client interface the service is written against, whatever library is underneath.

``Consumer``, ``Producer`` and ``Admin`` are what forecaster needs of Kafka and nothing more; one module
per library implements them (``confluent``: confluent-kafka / librdkafka, the default; ``kafkapython``).
Library errors become ``forecaster.errors.KafkaClientError`` at this boundary, sorted by ``reason``.

Options are the library-neutral names below (``ConsumerOptions``, ``ProducerOptions``); each backend maps
them, and the connection settings (security, SASL, TLS, timeouts), to its own configuration.

>>> tp = TopicPartition("ts.input", 3)
>>> tp == ("ts.input", 3), next_offsets([Record("ts.input", 3, 41, 0, None, b"{}")])
(True, {TopicPartition(topic='ts.input', partition=3): 42})
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from forecaster.errors import KafkaClientError

# The overhead a record adds to its key and value on the wire (record batch header, record header,
# timestamp and length fields): a record is refused before it is sent when it would not fit the limit.
RECORD_OVERHEAD_BYTES = 128


log = logging.getLogger(__name__)


class TopicPartition(NamedTuple):
    """A partition of a topic (equal to, and hashing as, any ``(topic, partition)`` tuple)."""

    topic: str
    partition: int


class Record:
    """A consumed record: coordinates, creation timestamp (epoch ms, -1 when unknown), key and value."""

    __slots__ = ("topic", "partition", "offset", "timestamp", "key", "value")

    def __init__(
        self, topic: str, partition: int, offset: int, timestamp: int, key: bytes | None, value: bytes | None
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.timestamp = timestamp
        self.key = key
        self.value = value

    def __repr__(self) -> str:
        return f"Record({self.topic}[{self.partition}]@{self.offset})"


def next_offsets(records: Iterable[Any]) -> dict[TopicPartition, int]:
    """The offset after the last of ``records`` per partition (what a commit of them stores)."""
    out: dict[TopicPartition, int] = {}
    for record in records:
        out[TopicPartition(record.topic, record.partition)] = record.offset + 1
    return out


def by_partition(records: Iterable[Any]) -> dict[TopicPartition, list[Any]]:
    """``records`` grouped by partition, in their order."""
    out: dict[TopicPartition, list[Any]] = {}
    for record in records:
        out.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
    return out


Partitions = Callable[[list[TopicPartition]], None]


@dataclass
class Rebalance:
    """What the consumer calls when the group moves partitions (incremental lists under cooperative
    assignment). They run on the thread that polls, inside ``poll``."""

    on_assign: Partitions = lambda tps: None
    on_revoke: Partitions = lambda tps: None
    on_lost: Partitions = lambda tps: None


@dataclass(frozen=True)
class ConsumerOptions:
    """Library-neutral consumer options (each backend maps them to its own names)."""

    group_id: str | None = None  # None: a reader outside any group (assign, never commit)
    client_id: str | None = None  # default: kafka.client_id
    isolation_level: str = "read_committed"
    cooperative: bool = True  # cooperative-sticky assignment: a rebalance moves only what changes hands
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int | None = None  # default: a third of the session timeout
    max_poll_interval_ms: int = 300_000
    fetch_wait_max_ms: int = 100  # how long the broker may hold a fetch that has less than fetch_min_bytes
    fetch_min_bytes: int = 1  # the broker answers a fetch once this much is there (or after the wait)
    max_partition_fetch_bytes: int = 1 << 20
    fetch_max_bytes: int = 50 << 20
    auto_offset_reset: str = "earliest"


@dataclass(frozen=True)
class ProducerOptions:
    """Library-neutral producer options."""

    client_id: str | None = None
    linger_ms: int = 5
    transactional_id: str | None = None
    transaction_timeout_ms: int = 60_000
    message_max_bytes: int = 1_048_576  # the largest record (key + value + overhead) sent
    extra: Mapping[str, Any] = field(default_factory=dict)  # library-specific, for benchmarks and tests


@dataclass(frozen=True)
class Failure:
    """A record the broker (or the client) did not take: where it was going, and why."""

    topic: str
    key: bytes | None
    reason: str  # a KafkaClientError reason
    detail: str


class Consumer(ABC):
    """A consumer of one client library. Two modes: a group member (``subscribe``) or a reader
    (``assign``). Offsets are always committed explicitly (never automatically)."""

    name: str  # the library: "confluent" or "kafka-python"

    # ---- membership -------------------------------------------------------------------------------------

    @abstractmethod
    def subscribe(self, topic: str, rebalance: Rebalance) -> None: ...

    @abstractmethod
    def unsubscribe(self) -> None: ...

    @abstractmethod
    def assign(self, start: Mapping[TopicPartition, int | None]) -> None:
        """Read these partitions (outside any group) from these offsets (None: the beginning)."""

    @abstractmethod
    def assignment(self) -> list[TopicPartition]: ...

    @abstractmethod
    def group_metadata(self) -> Any:
        """The member's group metadata, for ``Producer.send_offsets_to_transaction`` (fencing)."""

    def generation(self) -> int | None:
        """The member's group generation where the library tells it."""
        return None

    # ---- reading ----------------------------------------------------------------------------------------

    @abstractmethod
    def poll(self, max_records: int, timeout: float) -> list[Record]:
        """Up to ``max_records`` records of all assigned partitions, waiting at most ``timeout`` s."""

    @abstractmethod
    def pause(self, tps: Sequence[TopicPartition]) -> None: ...

    @abstractmethod
    def resume(self, tps: Sequence[TopicPartition]) -> None: ...

    @abstractmethod
    def seek(self, tp: TopicPartition, offset: int | None) -> None:
        """Read ``tp`` next from ``offset`` (None: the beginning); ``tp`` is assigned."""

    @abstractmethod
    def position(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The offset of the next record to read, per partition (only where known)."""

    # ---- offsets ------------------------------------------------------------------------------------------

    @abstractmethod
    def committed(self, tps: Sequence[TopicPartition], timeout: float) -> dict[TopicPartition, int | None]:
        """The group's committed offsets (None where nothing is committed)."""

    @abstractmethod
    def end_offsets(self, tps: Sequence[TopicPartition], timeout: float) -> dict[TopicPartition, int]:
        """The end of each partition as this consumer's isolation level sees it (the last stable offset
        under ``read_committed``, the high watermark under ``read_uncommitted``)."""

    def fetched_ends(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The end of each partition as the client's latest fetch saw it, without asking the broker: the
        high watermark, which counts records of open transactions (``end_offsets`` gives the last stable
        offset under ``read_committed``). Partitions the client cannot tell are left out; this default
        tells none."""
        return {}

    @abstractmethod
    def beginning_offsets(
        self, tps: Sequence[TopicPartition], timeout: float
    ) -> dict[TopicPartition, int]: ...

    @abstractmethod
    def partitions_for(self, topic: str, timeout: float) -> list[int]:
        """The partitions of ``topic`` (empty when it does not exist)."""

    @abstractmethod
    def commit(self, offsets: Mapping[TopicPartition, int], wait: bool = True) -> None:
        """Store ``offsets`` (the next offset to read) for the group; ``wait=False`` does not wait: the
        broker's answer comes to ``commit_answered`` from a later ``poll``."""

    def commit_answered(self, ok: bool, detail: str) -> None:
        """The broker's answer to a commit that did not wait (a committer puts its own in its place)."""
        if not ok:
            log.warning(
                "offset commit failed, the records since the last commit will be replayed: %s", detail
            )

    @abstractmethod
    def close(self) -> None:
        """Leave the group (without committing) and close."""


class Producer(ABC):
    """A producer of one client library. ``send`` is asynchronous; failures of records already handed
    over are collected (``take_failures``) once the broker answered, e.g. after ``flush``. A record that
    cannot be sent at all (too large, the local queue stuck) raises ``KafkaClientError`` from ``send``."""

    name: str
    message_max_bytes: int

    @abstractmethod
    def send(
        self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None
    ) -> None: ...

    def send_many(self, topic: str, values: Sequence[bytes], keys: Sequence[bytes]) -> int:
        """Send ``values[i]`` keyed ``keys[i]`` in order until one cannot be sent; returns how many were
        sent, the error of the one that could not be (``KafkaClientError``) propagating with that count
        in its ``sent`` attribute. This default sends one at a time."""
        sent = 0
        try:
            for value, key in zip(values, keys, strict=True):
                self.send(topic, value, key)
                sent += 1
        except KafkaClientError as exc:
            exc.sent = sent  # type: ignore[attr-defined]
            raise
        return sent

    @abstractmethod
    def flush(self, timeout: float | None = None) -> int:
        """Wait until every record sent was answered (at most ``timeout`` s); returns how many were not."""

    @abstractmethod
    def take_failures(self) -> list[Failure]:
        """The records refused since the last call (answered ones only)."""

    def mark(self) -> Any:
        """A point in the stream of records sent; ``answered(mark)`` tells whether the broker has answered
        (acknowledged or refused) every record sent before it. This default tracks nothing: ``answered``
        waits for every record sent (``flush``)."""
        return None

    def answered(self, mark: Any) -> bool:
        """Whether every record sent before ``mark`` was answered; a client that tracks its records says so
        without waiting."""
        self.flush()
        return True

    def fits(self, key: bytes | None, value: bytes | None) -> bool:
        """Whether a record of this key and value is within ``message_max_bytes``."""
        size = (len(key) if key else 0) + (len(value) if value else 0)
        return size + RECORD_OVERHEAD_BYTES <= self.message_max_bytes

    # ---- transactions -------------------------------------------------------------------------------------

    @abstractmethod
    def init_transactions(self, timeout: float) -> None: ...

    @abstractmethod
    def begin_transaction(self) -> None: ...

    @abstractmethod
    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_metadata: Any, timeout: float
    ) -> None: ...

    @abstractmethod
    def commit_transaction(self, timeout: float) -> None: ...

    @abstractmethod
    def abort_transaction(self, timeout: float) -> None: ...

    @abstractmethod
    def close(self, timeout: float) -> None: ...


@dataclass(frozen=True)
class TopicInfo:
    """A topic as the broker describes it: partition count and the configs asked for."""

    name: str
    partitions: int
    config: Mapping[str, str] = field(default_factory=dict)


class Admin(ABC):
    """Topic creation and inspection."""

    name: str

    @abstractmethod
    def brokers(self, timeout: float) -> int:
        """How many brokers the cluster metadata lists."""

    @abstractmethod
    def list_topics(self, timeout: float) -> set[str]: ...

    @abstractmethod
    def describe(
        self, names: Sequence[str], config_keys: Sequence[str], timeout: float
    ) -> dict[str, TopicInfo]:
        """The topics of ``names`` that exist, with the values of ``config_keys``."""

    @abstractmethod
    def create(
        self, name: str, partitions: int, replication_factor: int, config: Mapping[str, str], timeout: float
    ) -> bool:
        """Create a topic; False when it exists already."""

    @abstractmethod
    def delete(self, names: Sequence[str], timeout: float) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


def call_within(call: Callable[[], Any], timeout: float, what: str) -> Any:
    """``call()`` on a daemon helper thread, waited for at most ``timeout`` s: what it returns, or what it
    raises. Not returned by then: ``KafkaClientError("timeout")``, and the thread is left behind, blocked
    (the caller gives the client up: a transactional call that never answers is replaced, not waited
    for; kafka-python's have no limit, librdkafka's can miss theirs)."""
    done = threading.Event()
    outcome: list[Any] = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            raised.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name=f"forecaster-{what}", daemon=True).start()
    if not done.wait(timeout):
        raise KafkaClientError("timeout", f"{what}: no answer within {timeout:g} s")
    if raised:
        raise raised[0]
    return outcome[0]
