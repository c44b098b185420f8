"""The connection of the confluent-kafka client: librdkafka's connection properties, its errors sorted into
``KafkaClientError`` reasons, and the error callback that notes connection trouble.

>>> config = connection_config(KafkaSettings(bootstrap_servers="a:9092,b:9092"))
>>> config["bootstrap.servers"], config["security.protocol"]
('a:9092,b:9092', 'PLAINTEXT')
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaClientError
from forecaster.logs import librdkafka_logger

log = logging.getLogger(__name__)


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
