"""The client interface on confluent-kafka (librdkafka): the default client.

librdkafka does the protocol, batching and group membership on its own threads, off the GIL; rebalance
callbacks and delivery reports are served on the thread that calls ``poll`` / ``flush``.

>>> config = connection_config(KafkaSettings(bootstrap_servers="a:9092,b:9092"))
>>> config["bootstrap.servers"], config["security.protocol"]
('a:9092,b:9092', 'PLAINTEXT')
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    KafkaError,
    KafkaException,
)
from confluent_kafka import (
    Consumer as _Consumer,
)
from confluent_kafka import (
    Producer as _Producer,
)
from confluent_kafka import TopicPartition as _TP
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaClientError
from forecaster.logs import librdkafka_logger
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

# How long past its own timeout a transactional call may block before the producer is given up on:
# librdkafka can miss the timeout of a coordinator request (send_offsets_to_transaction after a broker
# restart was seen blocked for minutes; librdkafka issues 5456 and 5511).
STUCK_GRACE_S = 2.0

_REASONS: dict[int, str] = {}
for _reason, _names in {
    "fenced": ("_FENCED", "PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH"),
    "group": (
        "UNKNOWN_MEMBER_ID",
        "ILLEGAL_GENERATION",
        "FENCED_INSTANCE_ID",
        "REBALANCE_IN_PROGRESS",
        "_ASSIGNMENT_LOST",
    ),
    "timeout": ("_TIMED_OUT", "REQUEST_TIMED_OUT", "_MSG_TIMED_OUT", "_TIMED_OUT_QUEUE"),
    "too_large": ("MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE"),
    "auth": (
        "SASL_AUTHENTICATION_FAILED",
        "_AUTHENTICATION",
        "_SSL",
        "TOPIC_AUTHORIZATION_FAILED",
        "GROUP_AUTHORIZATION_FAILED",
        "CLUSTER_AUTHORIZATION_FAILED",
        "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
    ),
    "unavailable": ("_TRANSPORT", "_ALL_BROKERS_DOWN", "_RESOLVE", "_TRANSPORT"),
}.items():
    for _name in _names:
        if hasattr(KafkaError, _name):
            _REASONS[getattr(KafkaError, _name)] = _reason


def reason_of(error: KafkaError) -> str:
    """The ``KafkaClientError`` reason of a librdkafka error."""
    reason = _REASONS.get(error.code())
    if reason is not None:
        return reason
    if error.fatal():
        return "fatal"
    if error.txn_requires_abort():
        return "abortable"
    return "other"


def translate(exc: BaseException, what: str) -> KafkaClientError:
    """A ``KafkaClientError`` for a confluent-kafka exception raised by ``what``."""
    error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    if error is None:
        return KafkaClientError("other", f"{what}: {exc!r}")
    return KafkaClientError(reason_of(error), f"{what}: {error.str()} ({error.name()})")


def connection_config(settings: KafkaSettings, client_id: str | None = None) -> dict[str, Any]:
    """librdkafka properties for the connection settings (address, security, SASL, TLS, timeouts)."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": client_id or settings.client_id,
        "security.protocol": settings.security_protocol,
        "socket.timeout.ms": settings.request_timeout_ms,
        # Come back quickly after a broker restart (librdkafka's default backs off up to 10 s).
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": settings.reconnect_backoff_max_ms,
        "log.connection.close": False,
    }
    if settings.sasl_mechanism:
        config["sasl.mechanism"] = settings.sasl_mechanism
    if settings.sasl_username:
        config["sasl.username"] = settings.sasl_username
    if settings.sasl_password is not None:
        config["sasl.password"] = settings.sasl_password.get_secret_value()
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        config["ssl.endpoint.identification.algorithm"] = "https" if settings.ssl_check_hostname else "none"
        for name, key in (
            ("ssl_cafile", "ssl.ca.location"),
            ("ssl_certfile", "ssl.certificate.location"),
            ("ssl_keyfile", "ssl.key.location"),
        ):
            if getattr(settings, name) is not None:
                config[key] = str(getattr(settings, name))
        if settings.ssl_password is not None:
            config["ssl.key.password"] = settings.ssl_password.get_secret_value()
    return config


class _Connection:
    """librdkafka's error callback: connection trouble is noted here at debug level (the service logs a
    lost broker once, from its own checks, for both clients), a fatal error is logged as such."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.down = False
        self.refused: KafkaError | None = None  # credentials or a certificate refused

    def error(self, error: KafkaError) -> None:
        if reason_of(error) == "auth":
            self.refused = self.refused or error
            log.debug("%s: %s", self.what, error.str())
        elif error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE):
            self.down = True
            log.debug("%s: %s (librdkafka reconnects by itself)", self.what, error.str())
        elif error.fatal():
            log.error("%s: fatal client error: %s", self.what, error.str())
        else:
            log.debug("%s: %s", self.what, error.str())

    def up(self) -> None:
        self.down = False

    def callbacks(self, logged: bool = True) -> dict[str, Any]:
        """This error callback, and librdkafka's lines through Python's logging (a broker's repeats held
        back, see ``forecaster.logs``) rather than straight to stderr. Those lines wait in a queue until
        the client is polled, so a reader that may sit idle (``logged=False``) keeps only critical ones
        (its errors still reach the error callback)."""
        if not logged:
            return {"error_cb": self.error, "log_level": 2}
        return {"error_cb": self.error, "logger": librdkafka_logger()}


def _tps(tps: Sequence[TopicPartition]) -> list[_TP]:
    return [_TP(tp[0], tp[1]) for tp in tps]


class ConfluentConsumer(Consumer):
    name = "confluent"

    def __init__(self, settings: KafkaSettings, options: ConsumerOptions) -> None:
        self.connection = _Connection(f"consumer {options.group_id or 'reader'}")
        config = {
            **connection_config(settings, options.client_id),
            # librdkafka wants a group id even for a reader; a reader never joins or commits.
            "group.id": options.group_id or f"{settings.client_id}-reader",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": options.auto_offset_reset,
            "isolation.level": options.isolation_level,
            "session.timeout.ms": options.session_timeout_ms,
            "heartbeat.interval.ms": options.heartbeat_interval_ms
            or max(100, options.session_timeout_ms // 3),
            "max.poll.interval.ms": options.max_poll_interval_ms,
            "fetch.wait.max.ms": options.fetch_wait_max_ms,
            "max.partition.fetch.bytes": options.max_partition_fetch_bytes,
            "fetch.max.bytes": options.fetch_max_bytes,
            "receive.message.max.bytes": options.fetch_max_bytes + (1 << 20),
            "partition.assignment.strategy": "cooperative-sticky" if options.cooperative else "range",
            "on_commit": self._answered,
            **self.connection.callbacks(logged=options.group_id is not None),
        }
        try:
            self._c = _Consumer(config)
        except KafkaException as exc:
            raise translate(exc, "create a consumer") from exc
        self._rebalance = Rebalance()
        self.cooperative = options.cooperative

    def subscribe(self, topic: str, rebalance: Rebalance) -> None:
        self._rebalance = rebalance
        self._topic = topic

        def assigned(consumer: Any, parts: list[_TP]) -> None:
            # Assign first, so that what the callback does (pause) applies to assigned partitions.
            if self.cooperative:
                consumer.incremental_assign(parts)
            else:
                consumer.assign(parts)
            rebalance.on_assign([TopicPartition(p.topic, p.partition) for p in parts])

        def revoked(consumer: Any, parts: list[_TP]) -> None:
            rebalance.on_revoke([TopicPartition(p.topic, p.partition) for p in parts])

        def lost(consumer: Any, parts: list[_TP]) -> None:
            rebalance.on_lost([TopicPartition(p.topic, p.partition) for p in parts])

        self._c.subscribe([topic], on_assign=assigned, on_revoke=revoked, on_lost=lost)

    def unsubscribe(self) -> None:
        self._c.unsubscribe()

    def assign(self, start: Mapping[TopicPartition, int | None]) -> None:
        self._c.assign(
            [
                _TP(tp[0], tp[1], OFFSET_BEGINNING if offset is None else offset)
                for tp, offset in start.items()
            ]
        )

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition) for p in self._c.assignment()]

    def group_metadata(self) -> Any:
        return self._c.consumer_group_metadata()

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        # Wait for the first message only, then take what is already fetched: ``consume`` alone would
        # wait the whole timeout for a full batch, which is latency when traffic is light.
        try:
            first = self._c.poll(timeout)
            if first is None:
                return []
            messages = [first]
            if max_records > 1:
                messages += self._c.consume(num_messages=max_records - 1, timeout=0)
        except KafkaException as exc:
            raise translate(exc, "poll") from exc
        out = []
        for m in messages:
            error = m.error()
            if error is not None:
                self.connection.error(error)
                continue
            out.append(Record(m.topic(), m.partition(), m.offset(), m.timestamp()[1], m.key(), m.value()))
        if out:
            self.connection.up()
        return out

    def pause(self, tps: Sequence[TopicPartition]) -> None:
        if tps:
            self._c.pause(_tps(tps))

    def resume(self, tps: Sequence[TopicPartition]) -> None:
        if tps:
            self._c.resume(_tps(tps))

    def seek(self, tp: TopicPartition, offset: int | None) -> None:
        target = _TP(tp[0], tp[1], OFFSET_BEGINNING if offset is None else offset)
        try:
            self._c.seek(target)
        except KafkaException:
            # A partition whose fetcher has not started yet (just assigned, paused) cannot seek: assign
            # it again at the offset instead (local to this member; the group assignment is unchanged).
            self._c.incremental_unassign([_TP(tp[0], tp[1])])
            self._c.incremental_assign([target])

    def position(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {
            TopicPartition(p.topic, p.partition): p.offset
            for p in self._c.position(_tps(tps))
            if p.offset >= 0
        }

    def committed(self, tps: Sequence[TopicPartition], timeout: float) -> dict[TopicPartition, int | None]:
        try:
            parts = self._c.committed(_tps(tps), timeout=timeout)
        except KafkaException as exc:
            raise translate(exc, "read committed offsets") from exc
        return {
            TopicPartition(p.topic, p.partition): (
                None if p.offset == OFFSET_INVALID or p.offset < 0 else p.offset
            )
            for p in parts
        }

    def _watermarks(
        self, tps: Sequence[TopicPartition], timeout: float, high: bool
    ) -> dict[TopicPartition, int]:
        out = {}
        for tp in tps:
            try:
                low_high = self._c.get_watermark_offsets(_TP(tp[0], tp[1]), timeout=timeout, cached=False)
            except KafkaException as exc:
                raise translate(exc, f"read the offsets of {tp[0]}[{tp[1]}]") from exc
            if low_high is None:
                raise KafkaClientError("timeout", f"no offsets for {tp[0]}[{tp[1]}] within {timeout:g} s")
            out[TopicPartition(tp[0], tp[1])] = low_high[1] if high else low_high[0]
        return out

    def end_offsets(self, tps: Sequence[TopicPartition], timeout: float) -> dict[TopicPartition, int]:
        return self._watermarks(tps, timeout, high=True)

    def beginning_offsets(self, tps: Sequence[TopicPartition], timeout: float) -> dict[TopicPartition, int]:
        return self._watermarks(tps, timeout, high=False)

    def partitions_for(self, topic: str, timeout: float) -> list[int]:
        try:
            metadata = self._c.list_topics(topic, timeout=timeout)
        except KafkaException as exc:
            raise translate(exc, f"read the metadata of {topic}") from exc
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            return []
        return sorted(found.partitions)

    def commit(self, offsets: Mapping[TopicPartition, int], wait: bool = True) -> None:
        parts = [_TP(tp[0], tp[1], offset) for tp, offset in offsets.items()]
        try:
            self._c.commit(offsets=parts, asynchronous=not wait)
        except KafkaException as exc:
            raise translate(exc, "commit offsets") from exc

    def _answered(self, error: KafkaError | None, parts: list[_TP]) -> None:
        """librdkafka's answer to a commit that did not wait (served by ``poll``)."""
        failed = error is not None or any(p.error is not None for p in parts or ())
        detail = error.str() if error is not None else "; ".join(str(p.error) for p in parts if p.error)
        self.commit_answered(not failed, detail if failed else "")

    def close(self) -> None:
        try:
            self._c.close()
        except (KafkaException, RuntimeError) as exc:
            log.debug("closing the consumer: %r", exc)


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


class ConfluentAdmin(Admin):
    name = "confluent"

    def __init__(self, settings: KafkaSettings, timeout: float | None = None) -> None:
        self.connection = _Connection("admin")
        try:
            self._a = AdminClient({**connection_config(settings), **self.connection.callbacks()})
        except KafkaException as exc:
            raise translate(exc, "create an admin client") from exc

    def _metadata(self, timeout: float) -> Any:
        try:
            return self._a.list_topics(timeout=timeout)
        except KafkaException as exc:
            self._a.poll(0)  # serve the error callback: it may say why (credentials, certificate)
            raise translate(exc, "read the cluster metadata") from exc

    def brokers(self, timeout: float) -> int:
        return len(self._metadata(timeout).brokers)

    def list_topics(self, timeout: float) -> set[str]:
        return set(self._metadata(timeout).topics)

    def describe(
        self, names: Sequence[str], config_keys: Sequence[str], timeout: float
    ) -> dict[str, TopicInfo]:
        metadata = self._metadata(timeout)
        found = {
            name: len(metadata.topics[name].partitions)
            for name in names
            if name in metadata.topics and metadata.topics[name].error is None
        }
        configs: dict[str, dict[str, str]] = {name: {} for name in found}
        if config_keys and found:
            futures = self._a.describe_configs(
                [ConfigResource(ConfigResource.Type.TOPIC, name) for name in found], request_timeout=timeout
            )
            for resource, future in futures.items():
                try:
                    entries = future.result()
                except KafkaException as exc:
                    raise translate(exc, f"describe the configs of {resource.name}") from exc
                configs[resource.name] = {
                    key: entries[key].value
                    for key in config_keys
                    if key in entries and entries[key].value is not None
                }
        return {name: TopicInfo(name, count, configs[name]) for name, count in found.items()}

    def create(
        self, name: str, partitions: int, replication_factor: int, config: Mapping[str, str], timeout: float
    ) -> bool:
        topic = NewTopic(name, partitions, replication_factor, config={k: str(v) for k, v in config.items()})
        future = self._a.create_topics([topic], operation_timeout=timeout, request_timeout=timeout)[name]
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                return False
            raise translate(exc, f"create topic {name}") from exc
        deadline = time.monotonic() + timeout  # visible in the metadata before anyone uses it
        while time.monotonic() < deadline:
            topic_metadata = self._metadata(timeout).topics.get(name)
            if topic_metadata is not None and topic_metadata.error is None and topic_metadata.partitions:
                break
            time.sleep(0.05)
        return True

    def delete(self, names: Sequence[str], timeout: float) -> None:
        if not names:
            return
        for name, future in self._a.delete_topics(list(names), operation_timeout=timeout).items():
            try:
                future.result()
            except KafkaException as exc:
                log.debug("delete topic %s: %r", name, exc)

    def close(self) -> None:
        """Nothing to close (the admin client's threads end with the object)."""


def brokers_answering(settings: KafkaSettings, timeout: float) -> int:
    """One metadata request: how many brokers the cluster lists. Refused credentials or a certificate
    that does not verify raise ``KafkaClientError`` with reason ``auth`` (retrying cannot help)."""
    admin = ConfluentAdmin(settings)
    try:
        return admin.brokers(timeout)
    except KafkaClientError:
        refused = admin.connection.refused
        if refused is None:
            raise
        where = f"Kafka at {settings.bootstrap_servers}"
        if refused.code() == KafkaError._SSL:
            raise KafkaClientError("auth", f"TLS handshake with {where} failed: {refused.str()}") from None
        raise KafkaClientError(
            "auth",
            f"authentication failed at {where} ({settings.sasl_mechanism} user {settings.sasl_username};"
            f" 1 login(s) tried): {refused.str()}",
        ) from None
