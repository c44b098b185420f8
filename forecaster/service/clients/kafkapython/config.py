"""The connection of the kafka-python client: the connection keyword arguments, its errors sorted into
``KafkaClientError`` reasons, and refused logins told apart from a broker merely away.

>>> options = connection_options(KafkaSettings(bootstrap_servers="a:9092,b:9092"))
>>> options["bootstrap_servers"], options["security_protocol"]
(['a:9092', 'b:9092'], 'PLAINTEXT')
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import kafka.errors as _errors
from kafka.errors import (
    ClusterAuthorizationFailedError,
    CommitFailedError,
    FencedInstanceIdError,
    GroupAuthorizationFailedError,
    IllegalGenerationError,
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    ProducerFencedError,
    RebalanceInProgressError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
    UnknownMemberIdError,
)

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaClientError

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
