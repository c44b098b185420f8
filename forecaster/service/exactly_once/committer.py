"""The commit step, exactly once: forecasts, state changelog and input offsets in one Kafka transaction.

Same four calls as ``AtLeastOnceCommitter`` (``track``, ``in_flight``, ``due``, ``commit``). ``track`` opens
a transaction when a poll brought records (forecasts and dead letters are sent into it as they are made);
``commit`` closes it every ``interval_ms`` or ``max_records``:

    Step 1. the forecasts and dead letters of the interval are already in the transaction;
    Step 2. the changelog records of the series changed (and evicted) since the last commit;
    Step 3. the input offsets, with the consumer's group metadata (a stale member is fenced);
    Step 4. commit.

A failed transaction is aborted and ``failed`` tells the caller (``forecaster.service.exactly_once.recovery``) to reset the
state to the last committed snapshot and re-consume from the committed offsets. A commit that does not
answer within ``timeout_s`` is an indefinite error: the producer is replaced rather than retried, since
a late answer could otherwise complete an old transaction behind a new one; the new producer's
``init_transactions`` settles the old one either way. A producer fenced by another with the same
transactional id means this instance is a zombie: ``ProducerFenced`` is raised and the service exits.

>>> committer = TransactionalCommitter(None, None, None, producer=_Idle(), interval_ms=100, max_records=10)
>>> committer.due(), committer.failed
(False, None)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kafka.errors import (
    CommitFailedError,
    FencedInstanceIdError,
    IllegalGenerationError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFencedError,
    UnknownMemberIdError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition

from forecaster.errors import ForecasterError, ProducerFenced

log = logging.getLogger(__name__)


def is_fenced(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it wraps) says another producer with this transactional id took over.

    kafka-python raises ``ProducerFencedError`` itself, or, from a later ``send``, a plain ``KafkaError``
    carrying it as an argument; a rebalance listener's error arrives as the cause of another.
    """
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ProducerFencedError | ProducerFenced):
            return True
        if any(isinstance(a, ProducerFencedError | ProducerFenced) for a in getattr(exc, "args", ())):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def is_group_fenced(exc: BaseException | None) -> bool:
    """Whether the offsets were refused because the group does not know this member's generation."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(
            exc, CommitFailedError | UnknownMemberIdError | IllegalGenerationError | FencedInstanceIdError
        ):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def transactional_id(settings: Any) -> str:
    """The instance's transactional id: the setting, else ``<group_id>-<instance_id>``."""
    service = settings.service
    return service.transactional_id or f"{settings.kafka.group_id}-{service.instance_id}"


class _Idle:
    """A stand-in producer for examples: transactions that do nothing."""

    def init_transactions(self) -> None: ...


class TransactionalCommitter:
    """Commits forecasts + changelog + offsets atomically; see the module docstring.

    ``changes()`` returns the changelog records to write now as ``(partition, key, value)``;
    ``producer_factory()`` builds a transactional producer (called again to replace a broken one).
    ``on_commit(ok)`` is called once per transaction; ``failed`` is None, ``"aborted"`` or ``"replace"``.
    """

    def __init__(
        self,
        consumer: Any,
        producer_factory: Callable[[], Any] | None,
        changes: Callable[[], Sequence[tuple[int, bytes, bytes]]] | None,
        *,
        changelog_topic: str = "ts.state-changelog",
        interval_ms: float,
        max_records: int,
        timeout_s: float = 60.0,
        producer: Any = None,
        transactional_id: str = "",
        on_commit: Callable[[bool], None] = lambda ok: None,
        on_changelog: Callable[[int], None] = lambda n: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.producer_factory = producer_factory
        self.changes = changes
        self.changelog_topic = changelog_topic
        self.interval_ms = interval_ms
        self.max_records = max_records
        self.timeout_s = timeout_s
        self.on_commit = on_commit
        self.on_changelog = on_changelog
        self.clock = clock
        self.transactional_id = transactional_id
        self.fenced = False  # once fenced, nothing more is sent: the instance stops
        self.producer = producer if producer is not None else producer_factory()
        self.producer.init_transactions()
        self.pending: dict[TopicPartition, int] = {}  # next offset to read, per partition
        self.pending_records = 0
        self.in_flight: list[Any] = []  # sends of this transaction (kept for the error message)
        self.open = False
        self.failed: str | None = None
        self.error: BaseException | None = None  # why the last transaction failed
        self.last_commit = clock()

    # ---- the hot path --------------------------------------------------------------------------------

    def track(self, polled: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Note the records of a poll; their output is about to be sent, so a transaction must be open."""
        for tp, records in polled.items():
            if records:
                if not self.open:
                    self.producer.begin_transaction()
                    self.open = True
                self.pending[tp] = records[-1].offset + 1
                self.pending_records += len(records)

    def due(self) -> bool:
        elapsed_ms = (self.clock() - self.last_commit) * 1000.0
        return self.open and (self.pending_records >= self.max_records or elapsed_ms >= self.interval_ms)

    # ---- commit --------------------------------------------------------------------------------------

    def commit(self, wait: bool = True) -> bool:
        """Close the open transaction (if any); True when it committed. ``wait`` is accepted for the
        at-least-once interface: a transaction always waits (on the producer, never on the consumer)."""
        self.last_commit = self.clock()
        if not self.open or self.fenced:
            return not self.fenced
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self.pending.items()}
        try:
            # Step 1. the interval's forecasts and dead letters were sent into this transaction as made.
            # Step 2. the state of every series changed since the last commit.
            changes = self.changes()
            for partition, key, value in changes:
                self.in_flight.append(
                    self.producer.send(self.changelog_topic, key=key, value=value, partition=partition)
                )
            # Step 3. the input offsets, bound to this member's generation of the group.
            self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
            # Step 4. commit (bounded: an answer that never comes is an indefinite error).
            self._bounded(self.producer.commit_transaction)
        except KafkaTimeoutError as exc:
            self.error = exc
            self._fail("replace", f"commit did not complete within {self.timeout_s:g} s ({exc!r})")
            return False
        except (KafkaError, ForecasterError) as exc:
            if is_fenced(exc):
                raise self._fenced(exc) from exc
            self.error = exc
            failed = [f for f in self.in_flight if f.is_done and f.failed()]
            detail = f"{exc!r}" + (f"; first failed send: {failed[0].exception!r}" if failed else "")
            self._abort(detail)
            return False
        self._close_transaction()
        self.on_changelog(len(changes))
        self.on_commit(True)
        return True

    def _fenced(self, exc: BaseException) -> ProducerFenced:
        self._close_transaction()
        self.fenced = True
        return ProducerFenced(
            f"fenced by another instance with transactional id {self.transactional_id!r}: {exc}"
        )

    def abort(self, reason: str) -> None:
        """Abort the open transaction (partitions lost: its offsets could not commit anyway)."""
        if self.open and not self.fenced:
            self._abort(reason)

    def _abort(self, detail: str) -> None:
        try:
            self._bounded(self.producer.abort_transaction)
        except KafkaError as exc:
            if is_fenced(exc):
                raise self._fenced(exc) from exc
            self._fail("replace", f"{detail}; abort failed too ({exc!r})")
            return
        self._fail("aborted", detail)

    def _fail(self, how: str, detail: str) -> None:
        log.warning(
            "transaction %s (%d input records): %s; state goes back to the last commit and those records"
            " are consumed again",
            "aborted" if how == "aborted" else "failed",
            self.pending_records,
            detail,
        )
        self._close_transaction()
        self.failed = how if self.failed != "replace" else "replace"
        self.on_commit(False)

    def _close_transaction(self) -> None:
        self.open = False
        self.pending, self.pending_records, self.in_flight = {}, 0, []

    def _bounded(self, call: Callable[[], Any]) -> None:
        """``call()`` on a helper thread, waiting at most ``timeout_s``: kafka-python's transaction calls
        wait without a limit, and a producer that never answers must be replaced, not waited for."""
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                call()
            except BaseException as exc:  # handed back to the caller below
                outcome["error"] = exc
            outcome["done"] = True

        thread = threading.Thread(target=run, name="forecaster-txn", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if "done" not in outcome:
            raise KafkaTimeoutError(f"{getattr(call, '__name__', 'transaction call')} still waiting")
        if "error" in outcome:
            raise outcome["error"]

    # ---- after a failure -----------------------------------------------------------------------------

    def recover(self) -> None:
        """Make the producer usable again after ``failed``: a replaced producer settles the old transaction
        (``init_transactions`` completes or aborts it). Retries until the broker answers."""
        if self.failed == "replace":
            old, self.producer = self.producer, None
            try:
                old.close(timeout=0)
            except Exception as exc:  # noqa: BLE001 - a broken producer may fail to close; it is dropped
                log.debug("closing the replaced producer: %r", exc)
            while self.producer is None:
                try:
                    producer = self.producer_factory()
                    producer.init_transactions()
                    self.producer = producer
                except (KafkaError, ForecasterError) as exc:
                    if is_fenced(exc):
                        raise ProducerFenced(f"fenced while re-creating the producer: {exc}") from exc
                    log.warning("transactional producer not ready (%r); trying again", exc)
                    time.sleep(1.0)
            log.info("transactional producer re-created")
        self.failed = None
        self.last_commit = self.clock()

    def close(self, timeout: float) -> None:
        """Abort what is open (the service commits before closing) and close the producer."""
        if self.open and not self.fenced:
            self._abort("closing")
        self.producer.close(timeout=timeout)
