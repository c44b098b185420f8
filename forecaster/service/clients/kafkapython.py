"""The client interface on kafka-python (pure Python; ``kafka.client = kafka-python``).

kafka-python runs the group protocol inside ``poll`` (a heartbeat thread keeps the session alive) and its
transaction calls wait without a limit: here they run on a helper thread and are bounded.

>>> options = connection_options(KafkaSettings(bootstrap_servers="a:9092,b:9092"))
>>> options["bootstrap_servers"], options["security_protocol"]
(['a:9092', 'b:9092'], 'PLAINTEXT')
"""

from __future__ import annotations

import collections
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import kafka.errors as _errors
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import TopicPartition as _TP
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import (
    ClusterAuthorizationFailedError,
    CommitFailedError,
    FencedInstanceIdError,
    GroupAuthorizationFailedError,
    IllegalGenerationError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    ProducerFencedError,
    RebalanceInProgressError,
    RequestTimedOutError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
    UnknownMemberIdError,
    UnknownTopicOrPartitionError,
)
from kafka.structs import OffsetAndMetadata

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaClientError
from forecaster.service.clients.base import (
    Admin,
    Consumer,
    ConsumerOptions,
    Failure,
    Producer,
    ProducerOptions,
    Rebalance,
    Record,
    TopicInfo,
    TopicPartition,
    call_within,
)

log = logging.getLogger(__name__)

_REASONS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (ProducerFencedError, "fenced"),
    (
        (
            CommitFailedError,
            UnknownMemberIdError,
            IllegalGenerationError,
            FencedInstanceIdError,
            RebalanceInProgressError,
        ),
        "group",
    ),
    ((KafkaTimeoutError, RequestTimedOutError), "timeout"),
    ((MessageSizeTooLargeError, _errors.RecordListTooLargeError), "too_large"),
    (
        (
            _errors.SaslAuthenticationFailedError,
            TopicAuthorizationFailedError,
            GroupAuthorizationFailedError,
            ClusterAuthorizationFailedError,
            TransactionalIdAuthorizationFailedError,
        ),
        "auth",
    ),
    ((KafkaConnectionError, NodeNotReadyError), "unavailable"),
)


def reason_of(exc: BaseException) -> str:
    """The ``KafkaClientError`` reason of a kafka-python error; a later ``send`` wraps a fencing error as
    an argument of a plain ``KafkaError``, so arguments are looked at too."""
    for kinds, reason in _REASONS:
        if isinstance(exc, kinds) or any(isinstance(arg, kinds) for arg in getattr(exc, "args", ())):
            return reason
    return "other"


def translate(exc: BaseException, what: str) -> KafkaClientError:
    return KafkaClientError(reason_of(exc), f"{what}: {exc!r}")


def connection_options(settings: KafkaSettings, client_id: str | None = None) -> dict[str, Any]:
    """Keyword arguments shared by kafka-python's producer, consumer and admin client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers.split(","),
        "client_id": client_id or settings.client_id,
        "security_protocol": settings.security_protocol,
        "request_timeout_ms": settings.request_timeout_ms,
        "reconnect_backoff_max_ms": settings.reconnect_backoff_max_ms,
    }
    if settings.sasl_mechanism:
        options["sasl_mechanism"] = settings.sasl_mechanism
    if settings.sasl_username:
        options["sasl_plain_username"] = settings.sasl_username
    if settings.sasl_password is not None:
        options["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_check_hostname"] = settings.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(settings, name) is not None:
                options[name] = str(getattr(settings, name))
        if settings.ssl_password is not None:
            options["ssl_password"] = settings.ssl_password.get_secret_value()
    return options


def bounded(call: Callable[[], Any], timeout: float, what: str) -> Any:
    """``call()`` waited for at most ``timeout`` s (``call_within``): kafka-python's transaction calls wait
    without a limit, and a producer that never answers must be replaced, not waited for."""
    try:
        return call_within(call, timeout, what)
    except KafkaClientError:
        raise
    except BaseException as exc:
        raise translate(exc, what) from exc


def _tps(tps: Sequence[TopicPartition]) -> list[_TP]:
    return [_TP(tp[0], tp[1]) for tp in tps]


class _Listener(ConsumerRebalanceListener):
    def __init__(self, owner: KafkaPythonConsumer, rebalance: Rebalance) -> None:
        self.owner = owner
        self.rebalance = rebalance

    def _call(self, callback: Callable[[list[TopicPartition]], None], tps: Any) -> None:
        self.owner.in_rebalance = True
        try:
            callback([TopicPartition(tp.topic, tp.partition) for tp in tps])
        finally:
            self.owner.in_rebalance = False

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._call(self.rebalance.on_revoke, revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self._call(self.rebalance.on_assign, assigned)

    def on_partitions_lost(self, lost: Any) -> None:
        self._call(self.rebalance.on_lost, lost)


class KafkaPythonConsumer(Consumer):
    name = "kafka-python"

    def __init__(self, settings: KafkaSettings, options: ConsumerOptions) -> None:
        kwargs: dict[str, Any] = {
            **connection_options(settings, options.client_id),
            "group_id": options.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": options.auto_offset_reset,
            "isolation_level": options.isolation_level,
            "session_timeout_ms": options.session_timeout_ms,
            "heartbeat_interval_ms": options.heartbeat_interval_ms
            or max(100, options.session_timeout_ms // 3),
            "max_poll_interval_ms": options.max_poll_interval_ms,
            "fetch_max_wait_ms": options.fetch_wait_max_ms,
            "max_partition_fetch_bytes": options.max_partition_fetch_bytes,
            "fetch_max_bytes": options.fetch_max_bytes,
        }
        if options.group_id is not None and options.cooperative:
            kwargs["partition_assignment_strategy"] = [CooperativeStickyAssignor()]
        try:
            self._c = KafkaConsumer(**kwargs)
        except KafkaError as exc:
            raise translate(exc, "create a consumer") from exc
        self.in_rebalance = False  # a commit from inside the listener must not wait (see ``commit``)

    def subscribe(self, topic: str, rebalance: Rebalance) -> None:
        self._c.subscribe([topic], listener=_Listener(self, rebalance))

    def unsubscribe(self) -> None:
        self._c.unsubscribe()

    def assign(self, start: Mapping[TopicPartition, int | None]) -> None:
        self._c.assign(_tps(list(start)))
        for tp, offset in start.items():
            self.seek(tp, offset)

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition) for tp in self._c.assignment()]

    def group_metadata(self) -> Any:
        return self._c.group_metadata()

    def generation(self) -> int | None:
        return getattr(self._c.group_metadata(), "generation_id", None)

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        try:
            polled = self._c.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        except KafkaError as exc:
            raise translate(exc, "poll") from exc
        # kafka-python's ConsumerRecord has the attributes of ``Record``: no copy.
        return [record for part in polled.values() for record in part]

    def pause(self, tps: Sequence[TopicPartition]) -> None:
        if tps:
            self._c.pause(*_tps(tps))

    def resume(self, tps: Sequence[TopicPartition]) -> None:
        if tps:
            self._c.resume(*_tps(tps))

    def seek(self, tp: TopicPartition, offset: int | None) -> None:
        if offset is None:
            self._c.seek_to_beginning(_TP(tp[0], tp[1]))
        else:
            self._c.seek(_TP(tp[0], tp[1]), offset)

    def position(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        try:
            return {TopicPartition(tp[0], tp[1]): self._c.position(_TP(tp[0], tp[1])) for tp in tps}
        except KafkaError as exc:
            raise translate(exc, "read positions") from exc

    def committed(self, tps: Sequence[TopicPartition], timeout: float) -> dict[TopicPartition, int | None]:
        try:
            return {TopicPartition(tp[0], tp[1]): self._c.committed(_TP(tp[0], tp[1])) for tp in tps}
        except KafkaError as exc:
            raise translate(exc, "read committed offsets") from exc

    def end_offsets(self, tps: Sequence[TopicPartition], timeout: float) -> dict[TopicPartition, int]:
        try:
            ends = self._c.end_offsets(_tps(tps))
        except KafkaError as exc:
            raise translate(exc, "read end offsets") from exc
        return {TopicPartition(tp.topic, tp.partition): offset for tp, offset in ends.items()}

    def beginning_offsets(self, tps: Sequence[TopicPartition], timeout: float) -> dict[TopicPartition, int]:
        try:
            begins = self._c.beginning_offsets(_tps(tps))
        except KafkaError as exc:
            raise translate(exc, "read beginning offsets") from exc
        return {TopicPartition(tp.topic, tp.partition): offset for tp, offset in begins.items()}

    def partitions_for(self, topic: str, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:  # None until the metadata of the topic arrived
            found = self._c.partitions_for_topic(topic)
            if found or time.monotonic() >= deadline:
                return sorted(found or [])
            time.sleep(0.1)

    def commit(self, offsets: Mapping[TopicPartition, int], wait: bool = True) -> None:
        stored = {_TP(tp[0], tp[1]): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
        if not wait or self.in_rebalance:  # the listener runs inside poll: a blocking commit is not allowed
            self._c.commit_async(stored, callback=self._answered)
            return
        try:
            self._c.commit(stored)
        except KafkaError as exc:
            raise translate(exc, "commit offsets") from exc

    def _answered(self, offsets: Any, result: Any) -> None:
        failed = isinstance(result, Exception)
        self.commit_answered(not failed, repr(result) if failed else "")

    def close(self) -> None:
        self._c.close(autocommit=False)


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
        # the futures sent since the last mark; kept once marks are asked for (at least once)
        self._marked: collections.deque[Any] | None = None

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
        if self._marked is not None:
            self._marked.append(future)

    def mark(self) -> collections.deque[Any]:
        """The futures of the records sent since the previous mark, with that mark before them."""
        mark, self._marked = self._marked or collections.deque(), collections.deque()
        self._marked.append(mark)
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


class KafkaPythonAdmin(Admin):
    name = "kafka-python"

    def __init__(self, settings: KafkaSettings, timeout: float | None = None) -> None:
        extra = {} if timeout is None else {"bootstrap_timeout_ms": max(int(timeout * 1000), 1000)}
        try:
            self._a = KafkaAdminClient(**connection_options(settings), **extra)
        except KafkaError as exc:
            raise translate(exc, "create an admin client") from exc

    def brokers(self, timeout: float) -> int:
        try:
            return len(self._a.describe_cluster().get("brokers") or [])
        except KafkaError as exc:
            raise translate(exc, "describe the cluster") from exc

    def list_topics(self, timeout: float) -> set[str]:
        try:
            return set(self._a.list_topics())
        except KafkaError as exc:
            raise translate(exc, "list topics") from exc

    def describe(
        self, names: Sequence[str], config_keys: Sequence[str], timeout: float
    ) -> dict[str, TopicInfo]:
        try:
            counts = {}
            for topic in self._a.describe_topics(list(names)):
                if topic["error_code"] == UnknownTopicOrPartitionError.errno:
                    continue
                if topic["error_code"] != 0:
                    raise KafkaClientError(
                        "other", f"cannot describe topic {topic['name']}: error {topic['error_code']}"
                    )
                counts[topic["name"]] = len(topic["partitions"])
            configs: dict[str, dict[str, str]] = {name: {} for name in counts}
            if config_keys and counts:
                resources = [
                    ConfigResource(ConfigResourceType.TOPIC, name, {key: None for key in config_keys})
                    for name in counts
                ]
                described = self._a.describe_configs(resources, config_filter="all")["topic"]
                for name in counts:
                    entries = described.get(name, {})
                    configs[name] = {key: entries[key]["value"] for key in config_keys if key in entries}
        except KafkaError as exc:
            raise translate(exc, f"describe topics {', '.join(names)}") from exc
        return {name: TopicInfo(name, count, configs[name]) for name, count in counts.items()}

    def create(
        self, name: str, partitions: int, replication_factor: int, config: Mapping[str, str], timeout: float
    ) -> bool:
        request = {
            name: {
                "num_partitions": partitions,
                "replication_factor": replication_factor,
                "configs": {key: str(value) for key, value in config.items()},
            }
        }
        try:
            self._a.create_topics(request, timeout_ms=int(timeout * 1000))
        except TopicAlreadyExistsError:
            return False
        except KafkaError as exc:
            raise translate(exc, f"create topic {name}") from exc
        try:
            self._a.wait_for_topics([name], timeout_ms=int(timeout * 1000))
        except KafkaError as exc:
            raise translate(exc, f"wait for topic {name}") from exc
        return True

    def delete(self, names: Sequence[str], timeout: float) -> None:
        if names:
            try:
                self._a.delete_topics(list(names), timeout_ms=int(timeout * 1000))
            except KafkaError as exc:
                log.debug("delete topics %s: %r", names, exc)

    def close(self) -> None:
        self._a.close()


# One bootstrap attempt of ``brokers_answering`` waits at most this long, so that refused credentials
# (which kafka-python only logs, retrying them until its bootstrap times out) end the wait soon.
BOOTSTRAP_ATTEMPT_MS = 5_000


class _RefusedConnections(logging.Handler):
    """What kafka-python logs, and only logs, about the connections it loses while it bootstraps.

    A refused SASL login reaches kafka-python as the broker's error answer and the broker's close in one
    read, and kafka-python 3.0 mostly drops the answer: the login failure then looks like a connection the
    broker closed. Both are noted here.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.refused: Exception | None = None  # the broker's or TLS's own word: bad credentials, bad cert
        self.lost: list[Exception] = []  # one per lost login (each is logged several times)
        self.closed_by_broker = False

    def emit(self, record: logging.LogRecord) -> None:
        for arg in record.args if isinstance(record.args, tuple) else ():
            tls = isinstance(arg, ssl.SSLError) or isinstance(getattr(arg, "__context__", None), ssl.SSLError)
            closed = isinstance(arg, KafkaConnectionError) and "disconnected" in str(arg)
            refused = isinstance(arg, _errors.SaslAuthenticationFailedError)
            if tls or refused:
                self.refused = self.refused or arg
            self.closed_by_broker = self.closed_by_broker or closed
            if (tls or closed or refused) and all(arg is not seen for seen in self.lost):
                self.lost.append(arg)


def brokers_answering(settings: KafkaSettings, timeout: float) -> int:
    """One bootstrap attempt: how many brokers the cluster lists. Refused credentials or a certificate that
    does not verify raise ``KafkaClientError`` with reason ``auth`` (retrying cannot help); kafka-python's
    line per lost connection is kept out of the log meanwhile (unless it logs at DEBUG)."""
    refused = _RefusedConnections()
    kafka_log = logging.getLogger("kafka")
    kafka_log.addHandler(refused)
    propagate, kafka_log.propagate = kafka_log.propagate, kafka_log.isEnabledFor(logging.DEBUG)
    try:
        try:
            admin = KafkaPythonAdmin(settings, min(timeout, BOOTSTRAP_ATTEMPT_MS / 1000.0))
            try:
                return admin.brokers(timeout)
            finally:
                admin.close()
        except KafkaClientError:
            _raise_if_refused(settings, refused)
            raise
    finally:
        kafka_log.propagate = propagate
        kafka_log.removeHandler(refused)


def _raise_if_refused(settings: KafkaSettings, refused: _RefusedConnections) -> None:
    """After a failed bootstrap attempt: an ``auth`` error when the broker refused us, not when it is
    merely away. With SASL, an attempt in which the broker closed the connections it had accepted counts
    as a refused login (kafka-python lost the broker's answer; see ``_RefusedConnections``)."""
    where = f"Kafka at {settings.bootstrap_servers}"
    tries = f"{len(refused.lost)} login(s) tried"
    failed = f"authentication failed at {where} ({settings.sasl_mechanism} user {settings.sasl_username}"
    if isinstance(refused.refused, _errors.SaslAuthenticationFailedError):
        raise KafkaClientError("auth", f"{failed}; {tries}): {refused.refused}")
    if refused.refused is not None:
        raise KafkaClientError("auth", f"TLS handshake with {where} failed: {refused.refused}")
    if refused.closed_by_broker and settings.security_protocol.startswith("SASL"):
        raise KafkaClientError(
            "auth",
            f"{failed}; {tries}): the broker closed the connection during the SASL login"
            " (check sasl_username, sasl_password and sasl_mechanism)",
        )
