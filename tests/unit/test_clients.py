"""``wait_for_broker`` on refused logins with ``kafka.client = kafka-python``, its admin client replaced by
one that logs what kafka-python logs and fails as it fails (the real broker: test_security.py); and the
input consumer's fetch settings as each library gets them."""

from __future__ import annotations

import logging

import pytest
from kafka.errors import KafkaConnectionError, KafkaTimeoutError, SaslAuthenticationFailedError

from forecaster.config import FETCH_DEFAULTS, KafkaSettings, Settings
from forecaster.errors import KafkaSetupError
from forecaster.service import clients
from forecaster.service.build import consumer_options
from forecaster.service.clients import kafkapython
from forecaster.service.clients.confluent import consumer as confluent_consumer
from forecaster.service.clients.kafkapython import consumer as kafkapython_consumer

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


def test_a_transactional_call_librdkafka_does_not_return_from_gives_the_producer_up(monkeypatch) -> None:
    """librdkafka can block past the timeout it was given (a coordinator request after a broker restart):
    the call is waited for at most timeout + grace, then the producer says it is stuck (reason timeout, so
    the committer replaces it) and refuses further transactional calls instead of blocking again."""
    import threading
    import time

    from forecaster.errors import KafkaClientError
    from forecaster.service.clients import ProducerOptions, confluent

    monkeypatch.setattr(confluent.producer, "STUCK_GRACE_S", 0.2)
    producer = confluent.ConfluentProducer(
        KafkaSettings(bootstrap_servers="127.0.0.1:1"), ProducerOptions(transactional_id="stuck")
    )
    release = threading.Event()
    timeouts: list[float] = []

    def answers(timeout: float) -> None:
        timeouts.append(timeout)

    producer._transactional("commit_transaction", answers, 1.0)  # an answer in time: returns
    assert len(timeouts) == 1 and 0.5 < timeouts[0] <= 1.0
    started = time.monotonic()
    with pytest.raises(KafkaClientError) as raised:
        producer._transactional("send_offsets_to_transaction", lambda timeout: release.wait(30), 0.3)
    assert raised.value.reason == "timeout" and "did not return" in str(raised.value)
    assert time.monotonic() - started < 5
    with pytest.raises(KafkaClientError) as again:
        producer._transactional("commit_transaction", answers, 1.0)
    assert again.value.reason == "fatal" and len(timeouts) == 1  # not called again
    producer.close(timeout=0)  # no flush on a stuck producer
    release.set()


def test_librdkafka_lines_go_through_logging_and_a_broker_away_is_told_once_a_while() -> None:
    """A consumer with no broker to reach: librdkafka's connect failures arrive in the
    forecaster.librdkafka logger, and the Repeats filter lets one through per interval."""
    import io
    import time

    from forecaster.logs import Repeats
    from forecaster.service.clients import ConsumerOptions, confluent

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(Repeats(interval=60.0))
    counted = []
    counter = logging.Handler()
    counter.emit = counted.append  # every line, before the filter
    target = logging.getLogger("forecaster.librdkafka")
    target.addHandler(handler)
    target.addHandler(counter)
    try:
        consumer = confluent.ConfluentConsumer(
            KafkaSettings(bootstrap_servers="127.0.0.1:1"), ConsumerOptions(group_id="nobody")
        )
        consumer.assign({clients.TopicPartition("t", 0): 0})
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            consumer.poll(10, 0.1)
        consumer.close()
    finally:
        target.removeHandler(handler)
        target.removeHandler(counter)
    failed = [r for r in counted if "Connection refused" in r.getMessage()]
    assert failed  # librdkafka's line, through logging
    # librdkafka >= 2.12 holds back most of its own repeats; more attempts say the same, and are held
    for record in failed * 3:
        handler.handle(logging.makeLogRecord(record.__dict__))
    shown = [line for line in stream.getvalue().splitlines() if "Connection refused" in line]
    assert len(shown) == 1


@pytest.mark.parametrize(
    ("client", "names"),
    [
        ("confluent", ("fetch.min.bytes", "fetch.wait.max.ms")),
        ("kafka-python", ("fetch_min_bytes", "fetch_max_wait_ms")),
    ],
)
def test_the_input_consumers_fetch_settings_reach_both_libraries(monkeypatch, client, names) -> None:
    """``service.fetch_min_bytes`` and ``service.fetch_wait_max_ms`` (how long a record may wait for a batch
    to fill at the broker) are what each library's consumer is made with."""
    made: list[dict] = []

    def capture(*args, **kwargs):
        made.append(args[0] if args else kwargs)
        raise RuntimeError("captured")

    monkeypatch.setattr(confluent_consumer, "_Consumer", capture)
    monkeypatch.setattr(kafkapython_consumer, "KafkaConsumer", capture)
    settings = Settings(kafka={"client": client}, service={"fetch_min_bytes": 12_345, "fetch_wait_max_ms": 7})
    with pytest.raises(RuntimeError, match="captured"):
        clients.make_consumer(settings.kafka, consumer_options(settings))
    assert (made[0][names[0]], made[0][names[1]]) == (12_345, 7)
    unset = Settings(kafka={"client": client}).service  # each client's own defaults fill what is not set
    assert (unset.fetch_min_bytes, unset.fetch_wait_max_ms) == FETCH_DEFAULTS[client]
