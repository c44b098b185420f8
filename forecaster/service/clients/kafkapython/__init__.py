"""The client interface on kafka-python (pure Python; ``kafka.client = kafka-python``).

kafka-python runs the group protocol inside ``poll`` (a heartbeat thread keeps the session alive) and its
transaction calls wait without a limit: here they run on a helper thread and are bounded.

One noun a module: ``config`` (connection options, error reasons, refused logins), ``consumer``,
``producer`` and ``admin``; here the names the rest of the service uses, and ``brokers_answering``.
"""

from __future__ import annotations

import logging

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaClientError
from forecaster.service.clients.kafkapython.admin import KafkaPythonAdmin
from forecaster.service.clients.kafkapython.config import (
    _raise_if_refused,
    _RefusedConnections,
    connection_options,
    reason_of,
    translate,
)
from forecaster.service.clients.kafkapython.consumer import KafkaPythonConsumer
from forecaster.service.clients.kafkapython.producer import KafkaPythonProducer, bounded

__all__ = [
    "BOOTSTRAP_ATTEMPT_MS",
    "KafkaPythonAdmin",
    "KafkaPythonConsumer",
    "KafkaPythonProducer",
    "bounded",
    "brokers_answering",
    "connection_options",
    "reason_of",
    "translate",
]


# One bootstrap attempt of ``brokers_answering`` waits at most this long, so that refused credentials
# (which kafka-python only logs, retrying them until its bootstrap times out) end the wait soon.
BOOTSTRAP_ATTEMPT_MS = 5_000


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
