"""The client interface on confluent-kafka (librdkafka): the default client.

librdkafka does the protocol, batching and group membership on its own threads, off the GIL; rebalance
callbacks and delivery reports are served on the thread that calls ``poll`` / ``flush``.

One noun a module: ``config`` (connection properties, error reasons, the error callback), ``consumer``,
``producer`` and ``admin``; here the names the rest of the service uses, and ``brokers_answering``.
"""

from __future__ import annotations

from confluent_kafka import KafkaError

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaClientError
from forecaster.service.clients.confluent.admin import ConfluentAdmin
from forecaster.service.clients.confluent.config import _Connection as _Connection
from forecaster.service.clients.confluent.config import connection_config, reason_of, translate
from forecaster.service.clients.confluent.consumer import ConfluentConsumer
from forecaster.service.clients.confluent.producer import STUCK_GRACE_S, ConfluentProducer

__all__ = [
    "STUCK_GRACE_S",
    "ConfluentAdmin",
    "ConfluentConsumer",
    "ConfluentProducer",
    "brokers_answering",
    "connection_config",
    "reason_of",
    "translate",
]


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
