"""The producer on kafka-python: sends, marks over the futures of the records sent, and transactions whose
calls (which wait without a limit) run on a helper thread and are bounded."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from typing import Any

from kafka import KafkaProducer
from kafka import TopicPartition as _TP
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaClientError
from forecaster.service.clients.base import Failure, Producer, ProducerOptions, TopicPartition, call_within
from forecaster.service.clients.kafkapython.config import connection_options, reason_of, translate

log = logging.getLogger(__name__)


def bounded(call: Callable[[], Any], timeout: float, what: str) -> Any:
    """``call()`` waited for at most ``timeout`` s (``call_within``): kafka-python's transaction calls wait
    without a limit, and a producer that never answers must be replaced, not waited for."""
    try:
        return call_within(call, timeout, what)
    except KafkaClientError:
        raise
    except BaseException as exc:
        raise translate(exc, what) from exc


class KafkaPythonProducer(Producer):
    name = "kafka-python"

    def __init__(self, settings: KafkaSettings, options: ProducerOptions) -> None:
        self.message_max_bytes = options.message_max_bytes
        kwargs: dict[str, Any] = {
            **connection_options(settings, options.client_id),
            "linger_ms": options.linger_ms,
            "max_request_size": options.message_max_bytes,
            **options.extra,
        }
        if options.transactional_id:
            kwargs["transactional_id"] = options.transactional_id
            kwargs["transaction_timeout_ms"] = options.transaction_timeout_ms
        try:
            self._p = KafkaProducer(**kwargs)
        except KafkaError as exc:
            raise translate(exc, "create a producer") from exc
        self._futures: list[tuple[str, bytes | None, Any]] = []
        # the futures sent since the last mark (from the first send on: a mark covers every record before
        # it); a transaction starts it afresh, since transactions are not marked
        self._marked: collections.deque[Any] = collections.deque()

    def send(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
        if not self.fits(key, value):
            size = len(value or b"") + len(key or b"")
            raise KafkaClientError(
                "too_large", f"a record of {size} bytes to {topic} exceeds {self.message_max_bytes}"
            )
        try:
            future = self._p.send(topic, value=value, key=key, partition=partition)
        except KafkaError as exc:
            raise translate(exc, f"send to {topic}") from exc
        self._futures.append((topic, key, future))
        self._marked.append(future)

    def mark(self) -> collections.deque[Any]:
        """The futures of the records sent since the previous mark, with that mark before them."""
        mark = self._marked
        self._marked = collections.deque([mark])
        return mark

    def answered(self, mark: Any) -> bool:
        while mark:  # done futures (and answered earlier marks) leave from the front
            head = mark[0]
            if isinstance(head, collections.deque):
                if not self.answered(head):
                    return False
            elif not head.is_done:
                return False
            mark.popleft()
        return True

    def flush(self, timeout: float | None = None) -> int:
        try:
            self._p.flush(timeout)
        except KafkaError as exc:
            raise translate(exc, "flush") from exc
        return sum(1 for _, _, future in self._futures if not future.is_done)

    def take_failures(self) -> list[Failure]:
        failures, pending = [], []
        for topic, key, future in self._futures:
            if not future.is_done:
                pending.append((topic, key, future))
            elif future.failed():
                failures.append(Failure(topic, key, reason_of(future.exception), repr(future.exception)))
        self._futures = pending
        return failures

    def init_transactions(self, timeout: float) -> None:
        bounded(self._p.init_transactions, timeout, "init_transactions")

    def begin_transaction(self) -> None:
        try:
            self._p.begin_transaction()
        except KafkaError as exc:
            raise translate(exc, "begin_transaction") from exc
        self._futures = []
        self._marked = collections.deque()

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_metadata: Any, timeout: float
    ) -> None:
        stored = {_TP(tp[0], tp[1]): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
        bounded(
            lambda: self._p.send_offsets_to_transaction(stored, group_metadata),
            timeout,
            "send_offsets_to_transaction",
        )

    def commit_transaction(self, timeout: float) -> None:
        bounded(self._p.commit_transaction, timeout, "commit_transaction")

    def abort_transaction(self, timeout: float) -> None:
        bounded(self._p.abort_transaction, timeout, "abort_transaction")

    def close(self, timeout: float) -> None:
        try:
            self._p.close(timeout=timeout)
        except KafkaError as exc:
            log.debug("closing the producer: %r", exc)
