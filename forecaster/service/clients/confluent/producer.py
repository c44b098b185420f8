"""The producer on confluent-kafka: sends, delivery reports counted down by marks, and transactions whose
calls are bounded (a call librdkafka does not return from marks the producer stuck)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka import Producer as _Producer
from confluent_kafka import TopicPartition as _TP

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaClientError
from forecaster.service.clients.base import (
    RECORD_OVERHEAD_BYTES,
    Failure,
    Producer,
    ProducerOptions,
    TopicPartition,
    call_within,
)
from forecaster.service.clients.confluent.config import _Connection, connection_config, reason_of, translate

log = logging.getLogger(__name__)


# How long past its own timeout a transactional call may block before the producer is given up on:
# librdkafka can miss the timeout of a coordinator request (send_offsets_to_transaction after a broker
# restart was seen blocked for minutes; librdkafka issues 5456 and 5511).
STUCK_GRACE_S = 2.0


class _Mark:
    """The delivery reports still due for the records sent since the previous mark (librdkafka calls it
    once per record, refused records too: those are kept as failures)."""

    __slots__ = ("left", "failures", "previous")

    def __init__(self, failures: list[Failure], previous: _Mark | None = None) -> None:
        self.left = 0
        self.failures = failures
        self.previous = previous  # dropped once every record before this mark was answered

    def answered(self) -> bool:
        chain, mark = [], self
        while mark is not None:
            if mark.left > 0:
                return False
            chain.append(mark)
            mark = mark.previous
        for mark in chain:
            mark.previous = None
        return True

    def __call__(self, error: KafkaError | None, message: Any) -> None:
        self.left -= 1
        if error is not None:
            self.failures.append(Failure(message.topic(), message.key(), reason_of(error), error.str()))


class ConfluentProducer(Producer):
    name = "confluent"

    def __init__(self, settings: KafkaSettings, options: ProducerOptions) -> None:
        self.connection = _Connection(f"producer {options.transactional_id or ''}".strip())
        self.message_max_bytes = options.message_max_bytes
        config = {
            **connection_config(settings, options.client_id),
            "linger.ms": options.linger_ms,
            "enable.idempotence": True,
            "acks": "all",
            # A key goes to the partition the Java client and kafka-python choose (murmur2), not librdkafka's
            # CRC32 default: producers of any client agree, so a series stays in one partition.
            "partitioner": "murmur2_random",
            "message.max.bytes": options.message_max_bytes,
            "queue.buffering.max.messages": 1_000_000,
            **self.connection.callbacks(),
            **options.extra,
        }
        if options.transactional_id:
            config["transactional.id"] = options.transactional_id
            config["transaction.timeout.ms"] = options.transaction_timeout_ms
        try:
            self._p = _Producer(config)
        except KafkaException as exc:
            raise translate(exc, "create a producer") from exc
        self._failures: list[Failure] = []
        self._marks = _Mark(self._failures)  # every record's delivery report counts down the open mark
        self._unserved = 0
        self._stuck: str | None = None  # the transactional call librdkafka did not return from

    def send(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
        if not self.fits(key, value):
            size = len(value or b"") + len(key or b"")
            raise KafkaClientError(
                "too_large", f"a record of {size} bytes to {topic} exceeds {self.message_max_bytes}"
            )
        while True:
            try:
                self._p.produce(
                    topic, value, key, -1 if partition is None else partition, on_delivery=self._marks
                )
                break
            except BufferError:  # the local queue is full: let librdkafka send some, then try again
                try:
                    self._p.poll(0.05)
                except KafkaException as exc:
                    raise translate(exc, f"send to {topic}") from exc
            except KafkaException as exc:
                raise translate(exc, f"send to {topic}") from exc
        self._marks.left += 1
        self._unserved += 1
        if self._unserved >= 256:  # serve delivery reports now and then (cheap)
            self._unserved = 0
            try:
                self._p.poll(0)
            except KafkaException as exc:
                raise translate(exc, f"send to {topic}") from exc

    def send_many(self, topic: str, values: Sequence[bytes], keys: Sequence[bytes]) -> int:
        """``send`` for many records, with the per-record checks done once: when every record fits, one
        loop of ``produce`` calls (the forecasts of a batch); else one at a time."""
        limit = self.message_max_bytes - RECORD_OVERHEAD_BYTES
        if (
            len(values) != len(keys)
            or max(map(len, values), default=0) + max(map(len, keys), default=0) > limit
        ):
            return super().send_many(topic, values, keys)
        produce, poll, mark, sent = self._p.produce, self._p.poll, self._marks, 0
        try:
            for value, key in zip(values, keys, strict=True):
                while True:
                    try:
                        produce(topic, value, key, -1, on_delivery=mark)
                        break
                    except BufferError:  # the local queue is full: let librdkafka send some, then again
                        poll(0.05)
                sent += 1
        except KafkaException as exc:
            error = translate(exc, f"send to {topic}")
            error.sent = sent  # type: ignore[attr-defined]
            raise error from exc
        finally:
            mark.left += sent
            self._unserved += sent
        if self._unserved >= 256:  # serve delivery reports now and then (cheap)
            self._unserved = 0
            try:
                poll(0)
            except KafkaException as exc:
                raise translate(exc, f"send to {topic}") from exc
        return sent

    def flush(self, timeout: float | None = None) -> int:
        self._unserved = 0
        try:
            left = self._p.flush(-1 if timeout is None else timeout)
        except KafkaException as exc:
            raise translate(exc, "flush") from exc
        if not left:
            self.connection.up()
        return left

    def take_failures(self) -> list[Failure]:
        self._serve()
        failures = list(self._failures)
        self._failures.clear()  # the list the marks append to
        return failures

    def _serve(self) -> None:
        try:
            self._p.poll(0)  # serve the reports that arrived
        except KafkaException as exc:  # a fatal producer (fenced): its transaction calls say so
            log.debug("serving delivery reports: %r", exc)

    def mark(self) -> _Mark:
        mark = self._marks
        self._marks = _Mark(self._failures, mark)
        return mark

    def answered(self, mark: Any) -> bool:
        """Without waiting: whether the reports of every record sent before ``mark`` were served."""
        if not mark.answered():
            self._serve()
        return mark.answered()

    def _transactional(self, what: str, call: Callable[[float], Any], timeout: float) -> None:
        """``call(timeout)``, again while librdkafka says the error is retriable, within ``timeout``."""
        if self._stuck is not None:
            raise KafkaClientError("fatal", f"{what}: this producer is stuck in {self._stuck}; replace it")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                self._bounded(what, call, max(left, 0.1))
                return
            except KafkaException as exc:
                error = exc.args[0]
                if error.retriable() and not error.txn_requires_abort() and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise translate(exc, what) from exc

    def _bounded(self, what: str, call: Callable[[float], Any], timeout: float) -> None:
        """``call(timeout)``, waited for at most ``timeout`` + ``STUCK_GRACE_S``: a call librdkafka does not
        return from in time marks this producer stuck (the committer replaces it; its successor fences
        this one)."""
        try:
            call_within(lambda: call(timeout), timeout + STUCK_GRACE_S, what)
        except KafkaClientError as exc:  # librdkafka raises KafkaException: this is the wait running out
            self._stuck = what
            raise KafkaClientError(
                "timeout",
                f"{what}: librdkafka did not return within {timeout + STUCK_GRACE_S:.0f} s (its own timeout"
                f" {timeout:.0f} s); the producer is replaced",
            ) from exc

    def init_transactions(self, timeout: float) -> None:
        self._transactional("init_transactions", self._p.init_transactions, timeout)

    def begin_transaction(self) -> None:
        try:
            self._p.begin_transaction()
        except KafkaException as exc:
            raise translate(exc, "begin_transaction") from exc

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_metadata: Any, timeout: float
    ) -> None:
        parts = [_TP(tp[0], tp[1], offset) for tp, offset in offsets.items()]
        self._transactional(
            "send_offsets_to_transaction",
            lambda left: self._p.send_offsets_to_transaction(parts, group_metadata, left),
            timeout,
        )

    def commit_transaction(self, timeout: float) -> None:
        self._transactional("commit_transaction", self._p.commit_transaction, timeout)

    def abort_transaction(self, timeout: float) -> None:
        self._transactional("abort_transaction", self._p.abort_transaction, timeout)

    def close(self, timeout: float) -> None:
        if self._stuck is not None:  # its transaction is settled by the producer that replaces it
            return
        try:
            self._p.flush(timeout)
        except KafkaException as exc:  # e.g. fenced: nothing more can be delivered
            log.debug("closing the producer: %r", exc)
