"""What the loop commits with, in two kinds: ``AtLeastOnceCommitter`` (output acknowledged, then input
offsets) and ``ExactlyOnceCommitter`` (output, state changelog and offsets in one Kafka transaction).

Both take the same calls from the loop: ``track`` the records of a poll, ``send`` their output, ask
``due``, ``commit``. ``send`` contains a record's own failure (one too large for the topic, say): it is
counted and logged, and the service goes on; failures that are not about the record propagate.

>>> class Nothing(Committer):
...     def commit(self, wait: bool = True) -> bool: return True
...     def close(self, timeout: float) -> None: ...
>>> c = Nothing(consumer=None, producer=None, interval_ms=100, max_records=2)
>>> c.track([Record("in", 0, 7, 0, None, b"")]); c.pending, c.due()
({('in', 0): 8}, False)
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from forecaster.errors import KafkaClientError, ProducerFenced
from forecaster.service.clients.base import Record

log = logging.getLogger(__name__)

# Send failures that belong to one record: counted and skipped. Any other kind concerns the client, the
# topic or the broker, and propagates.
RECORD_FAILURES = ("too_large", "other")


class Committer(ABC):
    """The commit step of the loop; see the module docstring.

    ``on_send_failure(reason)`` counts a record whose output could not be sent; ``on_commit(ok)`` each
    commit.
    """

    def __init__(
        self,
        consumer: Any,
        producer: Any,
        *,
        interval_ms: float,
        max_records: int,
        on_commit: Callable[[bool], None] = lambda ok: None,
        on_send_failure: Callable[[str], None] = lambda reason: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.interval_ms = interval_ms
        self.max_records = max_records
        self.on_commit = on_commit
        self.on_send_failure = on_send_failure
        self.clock = clock
        self.pending: dict[tuple[str, int], int] = {}  # next offset to read, per partition
        self.pending_records = 0
        self.last_commit = clock()

    def track(self, records: Sequence[Record]) -> None:
        """Note the records of a poll (their output is about to be sent)."""
        if not records:
            return
        self.opening()
        pending = self.pending
        for record in records:
            pending[(record.topic, record.partition)] = record.offset + 1
        self.pending_records += len(records)

    def opening(self) -> None:
        """Called before the output of tracked records is sent (exactly once: a transaction opens)."""
        return None

    def due(self) -> bool:
        elapsed_ms = (self.clock() - self.last_commit) * 1000.0
        return bool(self.pending) and (
            self.pending_records >= self.max_records or elapsed_ms >= self.interval_ms
        )

    def send(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> bool:
        """Send one output record; False (counted, logged) when that record cannot be sent."""
        try:
            self.producer.send(topic, value, key, partition)
            return True
        except KafkaClientError as exc:
            self.not_sent(topic, key, exc)
            return False

    def send_many(self, topic: str, values: Sequence[bytes], keys: Sequence[bytes]) -> None:
        """``send`` for many records (the forecasts of a batch): a record that cannot be sent is counted and
        logged, and the ones after it are sent."""
        at = 0
        while at < len(values):
            try:
                at += self.producer.send_many(topic, values[at:], keys[at:])
            except KafkaClientError as exc:
                failed = at + getattr(exc, "sent", 0)
                self.not_sent(topic, keys[failed], exc)
                at = failed + 1

    def not_sent(self, topic: str, key: bytes | None, exc: KafkaClientError) -> None:
        """A record ``send`` refused: counted and logged when the failure is the record's own; fencing and
        failures of the client, topic or broker propagate."""
        if exc.reason == "fenced":
            raise ProducerFenced(f"fenced while sending: {exc.detail}") from exc
        if exc.reason not in RECORD_FAILURES:
            raise exc
        self.refused(topic, key, exc.reason, exc.detail)

    def refused(self, topic: str, key: bytes | None, reason: str, detail: str) -> None:
        """A record that was not sent or not taken by the broker: counted, logged, skipped."""
        self.on_send_failure(reason)
        log.error(
            "a record for %s (key %r) was not written (%s): %s; the service goes on",
            topic,
            key,
            reason,
            detail,
        )

    @abstractmethod
    def commit(self, wait: bool = True) -> bool:
        """Make the output of the tracked records durable and commit their offsets; True when done.
        ``wait=False`` (the loop's cadence) lets a committer that can commit later without blocking."""

    @abstractmethod
    def close(self, timeout: float) -> None: ...


def is_fenced(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) says another producer with this transactional id took over."""
    return _reason_in_chain(exc, "fenced")


def is_group_fenced(exc: BaseException | None) -> bool:
    """Whether the offsets were refused because the group does not know this member's generation."""
    return _reason_in_chain(exc, "group")


def _reason_in_chain(exc: BaseException | None, reason: str) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, KafkaClientError) and exc.reason == reason:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
