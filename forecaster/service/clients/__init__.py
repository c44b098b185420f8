"""The Kafka clients behind one small interface (``base``): confluent-kafka by default, kafka-python as a
choice (``kafka.client``). Everything above (the loop, both committers, restore, the trainer's history
reader, ``forecaster produce``) is written once against ``Consumer``, ``Producer`` and ``Admin``.

>>> from forecaster.config import KafkaSettings
>>> KafkaSettings().client
'confluent'
"""

from __future__ import annotations

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaClientError, KafkaSetupError
from forecaster.service.clients.base import (
    Admin,
    Consumer,
    ConsumerOptions,
    Failure,
    Producer,
    ProducerOptions,
    Rebalance,
    Record,
    TopicPartition,
    by_partition,
    next_offsets,
)
from forecaster.service.clients.topics import (
    COMPACTED,
    TopicSpec,
    create_missing_topics,
    ensure_topics,
    max_message_bytes,
    wait_for_broker,
)

__all__ = [
    "COMPACTED",
    "Admin",
    "Consumer",
    "ConsumerOptions",
    "Failure",
    "Producer",
    "ProducerOptions",
    "Rebalance",
    "Record",
    "TopicPartition",
    "TopicSpec",
    "by_partition",
    "client_configuration",
    "create_missing_topics",
    "ensure_topics",
    "make_admin",
    "make_consumer",
    "make_producer",
    "max_message_bytes",
    "next_offsets",
    "wait_for_broker",
]


def _where(settings: KafkaSettings) -> str:
    return f"Kafka at {settings.bootstrap_servers} ({settings.client})"


def _library_class(settings: KafkaSettings, kind: str) -> type:
    """The ``Consumer`` / ``Producer`` / ``Admin`` class of the library ``settings.client``."""
    if settings.client == "kafka-python":
        from forecaster.service.clients import kafkapython

        return getattr(kafkapython, f"KafkaPython{kind}")
    from forecaster.service.clients import confluent

    return getattr(confluent, f"Confluent{kind}")


def make_consumer(settings: KafkaSettings, options: ConsumerOptions | None = None) -> Consumer:
    """A consumer of the library ``settings.client``; ``options.group_id=None`` makes a reader."""
    options = options or ConsumerOptions(group_id=settings.group_id)
    try:
        return _library_class(settings, "Consumer")(settings, options)
    except KafkaClientError as exc:
        raise KafkaSetupError(f"cannot create a consumer for {_where(settings)}: {exc}") from exc


def make_producer(settings: KafkaSettings, options: ProducerOptions | None = None) -> Producer:
    """A producer of the library ``settings.client`` (transactional when ``options.transactional_id``)."""
    options = options or ProducerOptions()
    try:
        return _library_class(settings, "Producer")(settings, options)
    except KafkaClientError as exc:
        raise KafkaSetupError(f"cannot create a producer for {_where(settings)}: {exc}") from exc


def make_admin(settings: KafkaSettings, timeout: float | None = None) -> Admin:
    """An admin client of the library ``settings.client``; the caller closes it."""
    try:
        return _library_class(settings, "Admin")(settings, timeout)
    except KafkaClientError as exc:
        raise KafkaSetupError(f"cannot reach {_where(settings)}: {exc}") from exc


def client_configuration(settings: KafkaSettings) -> dict:
    """The library of ``settings.client`` and the connection configuration it gets, secrets masked."""
    if settings.client == "kafka-python":
        from forecaster.service.clients.kafkapython import connection_options as connection
    else:
        from forecaster.service.clients.confluent import connection_config as connection
    shown = {key: "**********" if "password" in key else value for key, value in connection(settings).items()}
    return {"library": settings.client, "connection": shown}
