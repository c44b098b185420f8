"""``wait_for_broker`` on refused logins with ``kafka.client = kafka-python``, its admin client replaced by
one that logs what kafka-python logs and fails as it fails. The real broker: test_security.py."""

from __future__ import annotations

import logging

import pytest
from kafka.errors import KafkaConnectionError, KafkaTimeoutError, SaslAuthenticationFailedError

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaSetupError
from forecaster.service import clients
from forecaster.service.clients import kafkapython

SASL = {
    "client": "kafka-python",
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_username": "u",
    "sasl_password": "p",
}


@pytest.fixture
def attempts(monkeypatch):
    """``attempts(*lost)``: every bootstrap attempt logs the connections ``lost``, then times out."""
    made: list[dict] = []

    def install(*lost: Exception) -> list[dict]:
        def make_admin(settings, timeout=None):
            made.append({"timeout": timeout})
            for error in lost:  # kafka-python logs each lost connection more than once
                logging.getLogger("kafka.net.connection").error("%s: Connection lost: %s", "conn", error)
                logging.getLogger("kafka.net.manager").warning(
                    "Bootstrap connection to %s failed: %s", "b-0", error
                )
            raise kafkapython.translate(KafkaTimeoutError("Unable to bootstrap"), "create an admin client")

        monkeypatch.setattr(kafkapython, "KafkaPythonAdmin", make_admin)
        return made

    return install


def test_a_refused_login_ends_the_wait_after_one_attempt(attempts):
    made = attempts(SaslAuthenticationFailedError("invalid credentials"))
    settings = KafkaSettings(bootstrap_servers="broker:9094", **SASL)
    expected = r"authentication failed at Kafka at broker:9094 \(SCRAM-SHA-512 user u; 1 login\(s\) tried\): .*invalid"
    with pytest.raises(KafkaSetupError, match=expected):
        clients.wait_for_broker(settings, timeout=60)
    assert len(made) == 1
    assert made[0]["timeout"] == kafkapython.BOOTSTRAP_ATTEMPT_MS / 1000


def test_logins_the_broker_closes_count_as_refused_with_sasl(attempts):
    made = attempts(KafkaConnectionError("socket disconnected"), KafkaConnectionError("socket disconnected"))
    with pytest.raises(KafkaSetupError, match=r"2 login\(s\) tried\): the broker closed the connection"):
        clients.wait_for_broker(KafkaSettings(bootstrap_servers="broker:9094", **SASL), timeout=60)
    assert len(made) == 1


def test_without_sasl_a_closed_connection_is_waited_out(attempts):
    made = attempts(KafkaConnectionError("socket disconnected"))
    with pytest.raises(KafkaSetupError, match="no answer from Kafka at broker:9092 within 1.5s"):
        clients.wait_for_broker(
            KafkaSettings(bootstrap_servers="broker:9092", client="kafka-python"), timeout=1.5
        )
    assert len(made) >= 2  # it kept trying until its deadline


def test_kafka_pythons_lines_stay_out_of_the_log_while_it_waits(attempts, caplog):
    attempts(SaslAuthenticationFailedError("invalid credentials"))
    with caplog.at_level(logging.WARNING), pytest.raises(KafkaSetupError):
        clients.wait_for_broker(KafkaSettings(bootstrap_servers="broker:9094", **SASL), timeout=60)
    assert not [r for r in caplog.records if r.name.startswith("kafka")]
    assert logging.getLogger("kafka").propagate  # as it was


def test_with_librdkafka_a_refused_login_ends_the_wait_too(monkeypatch):
    from confluent_kafka import KafkaError

    from forecaster.errors import KafkaClientError
    from forecaster.service.clients import confluent

    made = []

    class Refused:
        def __init__(self, settings, timeout=None):
            made.append(self)
            self.connection = confluent._Connection("admin")
            self.connection.error(
                KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: invalid")
            )

        def brokers(self, timeout):
            raise KafkaClientError("unavailable", "Failed to get metadata")

    monkeypatch.setattr(confluent, "ConfluentAdmin", Refused)
    settings = KafkaSettings(bootstrap_servers="broker:9094", **{**SASL, "client": "confluent"})
    with pytest.raises(
        KafkaSetupError, match=r"authentication failed at Kafka at broker:9094 \(SCRAM-SHA-512 user u"
    ):
        clients.wait_for_broker(settings, timeout=60)
    assert len(made) == 1


class _DescribingAdmin:
    """An admin whose ``describe`` answers with ``outcome`` (configs by topic) or raises it."""

    def __init__(self, outcome) -> None:
        self.outcome = outcome

    def describe(self, names, configs, timeout):
        if isinstance(outcome := self.outcome, Exception):
            raise outcome
        return outcome


def test_the_message_limit_is_the_smallest_topic_limit_and_unknown_when_configs_may_not_be_read() -> None:
    from types import SimpleNamespace

    from forecaster.errors import KafkaClientError, KafkaSetupError
    from forecaster.service.clients.topics import max_message_bytes

    limits = {"a": SimpleNamespace(config={"max.message.bytes": "2048"}), "b": SimpleNamespace(config={})}
    assert max_message_bytes(_DescribingAdmin(limits), ["a", "b"]) == 2048
    # A principal allowed to write but not to read configurations starts with the settings' limit.
    refused = KafkaClientError("auth", "Topic authorization failed")
    assert max_message_bytes(_DescribingAdmin(refused), ["a"]) is None
    with pytest.raises(KafkaSetupError, match="cannot describe topics a"):
        max_message_bytes(_DescribingAdmin(KafkaClientError("timeout", "no answer")), ["a"])
