"""The commit step, exactly once: forecasts, state changelog and input offsets in one Kafka transaction.

A kind of ``forecaster.service.committer.Committer``. ``track`` opens a transaction when a poll brought
records (forecasts and dead letters are sent into it as they are made); ``commit`` closes it every
``interval_ms`` or ``max_records``, and also when only evictions wait to be written (an idle stream):

    Step 1. the forecasts and dead letters of the interval are already in the transaction;
    Step 2. the changelog records of the series changed (and evicted) since the last commit;
    Step 3. the input offsets, with the consumer's group metadata (a stale member is fenced);
    Step 4. commit.

A failed transaction is aborted and ``failed`` tells recovery (``forecaster.service.exactly_once.recovery``)
to reset the state to the last committed snapshot and re-consume from the committed offsets. A commit that
does not answer within ``timeout_s``, or a producer the client says cannot go on, is replaced rather than
retried, since a late answer could otherwise complete an old transaction behind a new one; the new
producer's ``init_transactions`` settles the old one either way. A producer fenced by another with the
same transactional id means this instance is a zombie: ``ProducerFenced`` is raised and the service exits.

>>> committer = ExactlyOnceCommitter(None, None, None, producer=_Idle(), interval_ms=100, max_records=10)
>>> committer.due(), committer.failed
(False, None)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from forecaster.errors import ForecasterError, KafkaClientError, ProducerFenced
from forecaster.retry import Backoff
from forecaster.service.committer import Committer, is_fenced

log = logging.getLogger(__name__)

# The offsets' step is one exchange with the group coordinator: no answer within this long (librdkafka can
# wait on a coordinator it lost track of after a broker restart) and the producer is replaced, the
# transaction's records consumed again, instead of the instance standing still for the whole
# transaction timeout.
OFFSETS_TIMEOUT_S = 5.0


def transactional_id(settings: Any) -> str:
    """The instance's transactional id: the setting, else ``<group_id>-<instance_id>``."""
    service = settings.service
    return service.transactional_id or f"{settings.kafka.group_id}-{service.instance_id}"


class _Idle:
    """A stand-in producer for examples: transactions that do nothing."""

    def init_transactions(self, timeout: float) -> None: ...


class ExactlyOnceCommitter(Committer):
    """Commits forecasts + changelog + offsets atomically; see the module docstring.

    ``changes()`` returns the changelog records to write now as ``(partition, key, value)`` and
    ``waiting()`` whether some wait without any input (evictions); ``producer_factory()`` builds a
    transactional producer (called again to replace a broken one). ``on_commit(ok)`` is called once per
    transaction; ``failed`` is None, ``"aborted"`` or ``"replace"``.
    """

    def __init__(
        self,
        consumer: Any,
        producer_factory: Callable[[], Any] | None,
        changes: Callable[[], Sequence[tuple[int, bytes, bytes]]] | None,
        *,
        waiting: Callable[[], bool] = lambda: False,
        changelog_topic: str = "ts.state-changelog",
        interval_ms: float,
        max_records: int,
        timeout_s: float = 60.0,
        producer: Any = None,
        transactional_id: str = "",
        on_commit: Callable[[bool], None] = lambda ok: None,
        on_changelog: Callable[[int], None] = lambda n: None,
        on_send_failure: Callable[[str], None] = lambda reason: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            consumer,
            producer if producer is not None else producer_factory(),
            interval_ms=interval_ms,
            max_records=max_records,
            on_commit=on_commit,
            on_send_failure=on_send_failure,
            clock=clock,
        )
        self.producer_factory = producer_factory
        self.changes = changes
        self.waiting = waiting
        self.changelog_topic = changelog_topic
        self.timeout_s = timeout_s
        self.on_changelog = on_changelog
        self.transactional_id = transactional_id
        self.fenced = False  # once fenced, nothing more is sent: the instance stops
        self.producer.init_transactions(timeout_s)
        self.open = False
        self.failed: str | None = None
        self.error: BaseException | None = None  # why the last transaction failed

    # ---- the hot path --------------------------------------------------------------------------------

    def opening(self) -> None:
        """A transaction must be open before output is sent."""
        if not self.open:
            self.producer.begin_transaction()
            self.open = True

    def due(self) -> bool:
        elapsed_ms = (self.clock() - self.last_commit) * 1000.0
        if self.open:
            return self.pending_records >= self.max_records or elapsed_ms >= self.interval_ms
        return elapsed_ms >= self.interval_ms and not self.fenced and self.waiting()

    # ---- commit --------------------------------------------------------------------------------------

    def commit(self, wait: bool = True) -> bool:
        """Close the open transaction (one is opened for evictions waiting); True when it committed.
        It always waits: the transaction's records become readable with its commit."""
        self.last_commit = self.clock()
        if self.fenced:
            return False
        if not self.open:
            if not self.waiting():
                return True
            self.opening()
        offsets = dict(self.pending)
        try:
            # Step 1. the interval's forecasts and dead letters were sent into this transaction as made.
            # Step 2. the state of every series changed (or evicted) since the last commit.
            changes = self.changes()
            for partition, key, value in changes:
                self.producer.send(self.changelog_topic, value, key, partition)
            # Step 3. the input offsets, bound to this member's generation of the group. A member the
            # group has dropped (generation -1: the client noticed, but has not rejoined yet) must not
            # commit: the broker does not check the generation of such a commit.
            if offsets:
                generation = self.consumer.generation()
                if generation is not None and generation < 0:
                    raise KafkaClientError("group", "this member is not in the group (generation -1)")
                self.producer.send_offsets_to_transaction(
                    offsets, self.consumer.group_metadata(), min(self.timeout_s, OFFSETS_TIMEOUT_S)
                )
            # Step 4. commit (bounded: an answer that never comes is an indefinite error).
            self.producer.commit_transaction(self.timeout_s)
        except KafkaClientError as exc:
            if exc.reason == "fenced":
                raise self._fenced(exc) from exc
            self.error = exc
            if exc.reason == "auth":  # not allowed: replaying cannot help; stop without committing
                self._abort(str(exc))
                raise
            if exc.reason in ("timeout", "fatal"):
                self._fail("replace", f"commit did not complete ({exc})")
            else:
                self._abort(str(exc))
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
            self.producer.abort_transaction(self.timeout_s)
        except KafkaClientError as exc:
            if exc.reason == "fenced":
                raise self._fenced(exc) from exc
            self._fail("replace", f"{detail}; abort failed too ({exc})")
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
        self.pending, self.pending_records = {}, 0
        self.producer.take_failures()  # what failed in it is gone with it

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
            backoff = Backoff(first=0.2, cap=5.0)
            while self.producer is None:
                try:
                    producer = self.producer_factory()
                    producer.init_transactions(self.timeout_s)
                    self.producer = producer
                except (KafkaClientError, ForecasterError) as exc:
                    if is_fenced(exc):
                        raise ProducerFenced(f"fenced while re-creating the producer: {exc}") from exc
                    log.warning("transactional producer not ready (%s); trying again", exc)
                    backoff.wait()
            log.info("transactional producer re-created")
        self.failed = None
        self.last_commit = self.clock()

    def close(self, timeout: float) -> None:
        """Abort what is open (the service commits before closing) and close the producer."""
        if self.open and not self.fenced:
            self._abort("closing")
        self.producer.close(timeout=timeout)
