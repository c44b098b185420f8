"""Topics as forecaster needs them (created when missing, checked when present), and the broker check.

Written against the client interface's ``Admin``; this is where a broker or a topic that is not as the
service needs it becomes ``KafkaSetupError``.

>>> specs = [TopicSpec("ts.input", partitions=6), TopicSpec("ts.state-changelog", 6, config=COMPACTED)]
>>> specs[1].config["cleanup.policy"]
'compact'
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaClientError, KafkaSetupError
from forecaster.retry import Backoff
from forecaster.service.clients.base import Admin

log = logging.getLogger(__name__)

COMPACTED: Mapping[str, str] = {"cleanup.policy": "compact"}


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


@contextmanager
def admin_for(admin_or_settings: Admin | KafkaSettings) -> Iterator[Admin]:
    """The admin client given, or one made from settings and closed afterwards."""
    if isinstance(admin_or_settings, KafkaSettings):
        from forecaster.service.clients import make_admin

        admin = make_admin(admin_or_settings)
        try:
            yield admin
        finally:
            admin.close()
    else:
        yield admin_or_settings


def wait_for_broker(settings: KafkaSettings, timeout: float = 60.0) -> int:
    """Block until the cluster answers with at least one broker; returns how many it lists.

    Refused credentials or a certificate that does not verify end the wait after one attempt with a
    one-line ``KafkaSetupError``: retrying cannot help, and a service should exit rather than loop.
    """
    if settings.client == "kafka-python":
        from forecaster.service.clients.kafkapython import brokers_answering
    else:
        from forecaster.service.clients.confluent import brokers_answering
    deadline = time.monotonic() + timeout
    backoff = Backoff(first=0.1, cap=1.0, deadline=deadline)
    last: Exception | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise KafkaSetupError(f"no answer from {_where(settings)} within {timeout:g}s: {last}")
        try:
            brokers = brokers_answering(settings, max(min(left, 5.0), 1.0))
            if brokers:
                return brokers
            last = RuntimeError("metadata lists no broker")
        except KafkaClientError as exc:
            if exc.reason == "auth":
                raise KafkaSetupError(exc.detail) from exc
            last = exc
        backoff.wait()


def ensure_topics(
    admin_or_settings: Admin | KafkaSettings,
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
    keys = sorted({key for spec in specs for key in spec.config})
    try:
        with admin_for(admin_or_settings) as admin:
            # Step 1. What exists already.
            existing = admin.describe([spec.name for spec in specs], [], timeout)
            # Step 2. Create the missing ones; another process may win the race for some of them.
            created = [
                spec.name
                for spec in specs
                if spec.name not in existing
                and admin.create(spec.name, spec.partitions, spec.replication_factor, spec.config, timeout)
            ]
            # Step 3. Everything that was not ours to create must match its spec.
            others = [spec for spec in specs if spec.name not in created]
            if others:
                described = admin.describe([spec.name for spec in others], keys, timeout)
                for spec in others:
                    _check(spec, described.get(spec.name))
            return created
    except KafkaClientError as exc:
        names = ", ".join(spec.name for spec in specs)
        raise KafkaSetupError(f"cannot set up topics {names} on the broker: {exc}") from exc


def _check(spec: TopicSpec, info) -> None:
    partitions = None if info is None else info.partitions
    if partitions != spec.partitions:
        raise KafkaSetupError(
            f"topic {spec.name} has {partitions} partitions, expected {spec.partitions}"
            " (its partition count must match; recreate it or change the setting)"
        )
    for key, wanted in spec.config.items():
        value = info.config.get(key)
        if value != str(wanted):
            raise KafkaSetupError(f"topic {spec.name} has {key}={value}, expected {wanted}")


def create_missing_topics(kafka: KafkaSettings, names: Sequence[str]) -> list[str]:
    """Create those of ``names`` that do not exist (``kafka.partitions`` each); existing ones are left as
    they are: at least once, no topic has to be co-partitioned with the input."""
    try:
        with admin_for(kafka) as admin:
            existing = admin.list_topics(timeout=kafka.request_timeout_ms / 1000.0)
            specs = [
                TopicSpec(n, kafka.partitions, kafka.replication_factor) for n in names if n not in existing
            ]
            return ensure_topics(admin, specs)
    except KafkaClientError as exc:
        raise KafkaSetupError(f"cannot list or create topics {', '.join(names)}: {exc}") from exc


def max_message_bytes(
    admin_or_settings: Admin | KafkaSettings, names: Sequence[str], timeout: float = 30.0
) -> int | None:
    """The smallest ``max.message.bytes`` of the topics ``names`` (None when none is known, or when this
    principal may not read topic configurations: an ACL that allows writing need not allow that)."""
    try:
        with admin_for(admin_or_settings) as admin:
            described = admin.describe(list(names), ["max.message.bytes"], timeout)
    except KafkaClientError as exc:
        if exc.reason == "auth":
            log.warning(
                "may not read the configuration of %s (%s): records are sized by the settings alone",
                ", ".join(names),
                exc,
            )
            return None
        raise KafkaSetupError(f"cannot describe topics {', '.join(names)}: {exc}") from exc
    limits = [
        int(info.config["max.message.bytes"])
        for info in described.values()
        if "max.message.bytes" in info.config
    ]
    return min(limits) if limits else None
