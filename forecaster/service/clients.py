"""kafka-python clients built from ``KafkaSettings``, topic creation, and the broker check.

This is the one place where kafka-python's setup errors (no broker, refused credentials, a topic that is
not as expected) become ``KafkaSetupError``; the clients returned are plain kafka-python objects.

>>> specs = [TopicSpec("ts.input", partitions=6), TopicSpec("ts.state-changelog", 6, config=COMPACTED)]
>>> specs[1].config["cleanup.policy"]
'compact'
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailedError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaSetupError

COMPACTED: Mapping[str, str] = {"cleanup.policy": "compact"}

# Consumer defaults that suit every reader in forecaster: offsets are committed explicitly (after the
# work is done, or inside a transaction), a new group starts from the oldest record so no input is
# skipped, and records of aborted transactions are never seen.
CONSUMER_DEFAULTS: Mapping[str, Any] = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "isolation_level": "read_committed",
}


@dataclass(frozen=True)
class TopicSpec:
    """A topic as forecaster needs it: name, partition count, replication, topic configs.

    >>> TopicSpec("ts.state-changelog", partitions=6, config={"cleanup.policy": "compact"}).partitions
    6
    """

    name: str
    partitions: int
    replication_factor: int = 1
    config: Mapping[str, str] = field(default_factory=dict)


def _where(settings: KafkaSettings) -> str:
    return f"Kafka at {settings.bootstrap_servers}"


def make_producer(settings: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """A ``KafkaProducer`` with the connection options of ``settings``; ``overrides`` win."""
    options = {**settings.client_options(), **overrides}
    try:
        return KafkaProducer(**options)
    except KafkaError as exc:
        raise KafkaSetupError(f"cannot create a producer for {_where(settings)}: {exc}") from exc


def make_consumer(settings: KafkaSettings, *topics: str, **overrides: Any) -> KafkaConsumer:
    """A ``KafkaConsumer`` in group ``settings.group_id`` with ``CONSUMER_DEFAULTS``; ``overrides`` win.

    Topics given here are subscribed; pass none to ``assign`` or ``subscribe`` later.
    """
    options = {**settings.client_options(), "group_id": settings.group_id, **CONSUMER_DEFAULTS, **overrides}
    try:
        return KafkaConsumer(*topics, **options)
    except KafkaError as exc:
        raise KafkaSetupError(f"cannot create a consumer for {_where(settings)}: {exc}") from exc


def make_admin(settings: KafkaSettings, **overrides: Any) -> KafkaAdminClient:
    """A ``KafkaAdminClient`` with the connection options of ``settings``; the caller closes it."""
    options = {**settings.client_options(), **overrides}
    try:
        return KafkaAdminClient(**options)
    except KafkaError as exc:
        raise KafkaSetupError(f"cannot reach {_where(settings)}: {exc}") from exc


@contextmanager
def _admin_for(admin_or_settings: KafkaAdminClient | KafkaSettings) -> Iterator[KafkaAdminClient]:
    if isinstance(admin_or_settings, KafkaSettings):
        admin = make_admin(admin_or_settings)
        try:
            yield admin
        finally:
            admin.close()
    else:
        yield admin_or_settings


# One bootstrap attempt of wait_for_broker waits at most this long, so that refused credentials (which
# kafka-python only logs, retrying them until its bootstrap times out) end the wait soon.
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
            if tls or isinstance(arg, SaslAuthenticationFailedError):
                self.refused = self.refused or arg
            self.closed_by_broker = self.closed_by_broker or closed
            if (tls or closed or isinstance(arg, SaslAuthenticationFailedError)) and all(
                arg is not seen for seen in self.lost
            ):
                self.lost.append(arg)


def wait_for_broker(settings: KafkaSettings, timeout: float = 60.0) -> dict[str, Any]:
    """Block until the cluster answers with at least one broker; return ``describe_cluster()``.

    Refused credentials or a certificate that does not verify end the wait after one attempt with a
    one-line ``KafkaSetupError``: retrying cannot help, and a service should exit rather than loop.
    kafka-python's line per lost connection is kept out of the log meanwhile (unless it logs at DEBUG):
    the error says what happened.
    """
    refused = _RefusedConnections()
    kafka_log = logging.getLogger("kafka")
    kafka_log.addHandler(refused)
    propagate, kafka_log.propagate = kafka_log.propagate, kafka_log.isEnabledFor(logging.DEBUG)
    try:
        return _wait_for_broker(settings, timeout, refused)
    finally:
        kafka_log.propagate = propagate
        kafka_log.removeHandler(refused)


def _wait_for_broker(settings: KafkaSettings, timeout: float, refused: _RefusedConnections) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            raise KafkaSetupError(f"no answer from {_where(settings)} within {timeout:g}s: {last}")
        refused.lost, refused.closed_by_broker = [], False
        try:
            admin = make_admin(settings, bootstrap_timeout_ms=max(min(left_ms, BOOTSTRAP_ATTEMPT_MS), 1000))
            try:
                cluster = admin.describe_cluster()
            finally:
                admin.close()
            if cluster.get("brokers"):
                return cluster
            last = RuntimeError("metadata lists no broker")
        except (KafkaSetupError, KafkaError) as exc:
            last = exc
            _raise_if_refused(settings, refused)
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))


def _raise_if_refused(settings: KafkaSettings, refused: _RefusedConnections) -> None:
    """After a failed bootstrap attempt: a ``KafkaSetupError`` when the broker refused us, not when it
    is merely away. With SASL, an attempt in which the broker closed the connections it had accepted
    counts as a refused login (kafka-python lost the broker's answer; see ``_RefusedConnections``)."""
    tries = f"{len(refused.lost)} login(s) tried"
    failed = f"authentication failed at {_where(settings)} ({settings.sasl_mechanism} user {settings.sasl_username}"
    if isinstance(refused.refused, SaslAuthenticationFailedError):
        raise KafkaSetupError(f"{failed}; {tries}): {refused.refused}")
    if refused.refused is not None:
        raise KafkaSetupError(f"TLS handshake with {_where(settings)} failed: {refused.refused}")
    if refused.closed_by_broker and settings.security_protocol.startswith("SASL"):
        raise KafkaSetupError(
            f"{failed}; {tries}): the broker closed the connection during the SASL login"
            " (check sasl_username, sasl_password and sasl_mechanism)"
        )


def ensure_topics(
    admin_or_settings: KafkaAdminClient | KafkaSettings,
    specs: Iterable[TopicSpec],
    timeout: float = 30.0,
) -> list[str]:
    """Create the topics of ``specs`` that are missing; return the names created.

    A topic that exists already must have the partition count of its spec and the configs the spec
    names (e.g. ``cleanup.policy=compact``), or ``KafkaSetupError`` says what differs: forecaster never
    silently runs on a changelog that is not co-partitioned with its input.
    """
    specs = list(specs)
    if not specs:
        return []
    timeout_ms = int(timeout * 1000)
    try:
        with _admin_for(admin_or_settings) as admin:
            # Step 1. What exists already.
            existing = _partition_counts(admin, [spec.name for spec in specs])
            missing = [spec for spec in specs if spec.name not in existing]
            # Step 2. Create the missing ones; another process may win the race for some of them.
            created = _create(admin, missing, timeout_ms)
            if len(created) < len(missing):
                existing = _partition_counts(admin, [spec.name for spec in specs])
            # Step 3. Everything that was not ours to create must match its spec.
            _check(admin, [spec for spec in specs if spec.name not in created], existing)
            if created:
                admin.wait_for_topics(created, timeout_ms=timeout_ms)
            return created
    except KafkaError as exc:
        names = ", ".join(spec.name for spec in specs)
        raise KafkaSetupError(f"cannot set up topics {names} on the broker: {exc}") from exc


def _partition_counts(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    counts = {}
    for topic in admin.describe_topics(names):
        if topic["error_code"] == UnknownTopicOrPartitionError.errno:
            continue
        if topic["error_code"] != 0:
            raise KafkaSetupError(f"cannot describe topic {topic['name']}: error code {topic['error_code']}")
        counts[topic["name"]] = len(topic["partitions"])
    return counts


def _create(admin: KafkaAdminClient, specs: list[TopicSpec], timeout_ms: int) -> list[str]:
    created = []
    for spec in specs:
        request = {
            spec.name: {
                "num_partitions": spec.partitions,
                "replication_factor": spec.replication_factor,
                "configs": {key: str(value) for key, value in spec.config.items()},
            }
        }
        try:
            admin.create_topics(request, timeout_ms=timeout_ms)
        except TopicAlreadyExistsError:
            continue
        created.append(spec.name)
    return created


def _check(admin: KafkaAdminClient, specs: list[TopicSpec], partitions: dict[str, int]) -> None:
    for spec in specs:
        if partitions.get(spec.name) != spec.partitions:
            raise KafkaSetupError(
                f"topic {spec.name} has {partitions.get(spec.name)} partitions, expected {spec.partitions}"
                " (its partition count must match; recreate it or change the setting)"
            )
    with_config = [spec for spec in specs if spec.config]
    if not with_config:
        return
    resources = [
        ConfigResource(ConfigResourceType.TOPIC, spec.name, {key: None for key in spec.config})
        for spec in with_config
    ]
    described = admin.describe_configs(resources, config_filter="all")["topic"]
    for spec in with_config:
        actual = described.get(spec.name, {})
        for key, wanted in spec.config.items():
            value = actual.get(key, {}).get("value")
            if value != str(wanted):
                raise KafkaSetupError(f"topic {spec.name} has {key}={value}, expected {wanted}")


def create_missing_topics(kafka: KafkaSettings, names: Sequence[str]) -> list[str]:
    """Create those of ``names`` that do not exist (``kafka.partitions`` each); existing ones are left as
    they are: at least once, no topic has to be co-partitioned with the input."""
    admin = make_admin(kafka)
    try:
        existing = set(admin.list_topics())
        specs = [TopicSpec(n, kafka.partitions, kafka.replication_factor) for n in names if n not in existing]
        return ensure_topics(admin, specs)
    except KafkaError as exc:
        raise KafkaSetupError(f"cannot list or create topics {', '.join(names)}: {exc}") from exc
    finally:
        admin.close()
