"""Security on a real broker: ``forecaster serve`` over SASL_SSL (SCRAM-SHA-512, TLS with a test CA) with
ACLs on, a wrong password, a principal denied write on the output topic, and a raw librdkafka client.

The module starts its own broker with ``KAFKA_SASL_PORT`` (``deploy/kafka/start``; other ports, its own
data folder, stopped and wiped at the end), so the session's shared broker is not touched. Its plaintext
listener (principal ``User:ANONYMOUS``, a super user) sets up topics and ACLs and reads the results; the
services and clients under test connect to the SASL_SSL listener, where every user but ``admin`` may do
only what an ACL allows.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaAdminClient
from kafka.admin import ACL, ACLOperation, ACLPermissionType, ResourcePattern, ResourceType
from kafka.admin import ACLResourcePatternType as Pattern

from forecaster.checkpoints.hotswap import fresh_model
from forecaster.checkpoints.store import load_checkpoint, promote, save_checkpoint
from forecaster.config import KafkaSettings, Settings
from forecaster.engine.choice import Choice
from forecaster.engine.engine import reference_forecast
from forecaster.errors import KafkaSetupError
from forecaster.records import encode_input
from forecaster.scaling import Scaling
from forecaster.service.clients import COMPACTED, TopicSpec, ensure_topics, wait_for_broker
from forecaster.tools.synthetic import generate

# One pytest-xdist worker runs this file: its module fixture (a secure broker on a fixed port) is set up once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("security")]

ROOT = Path(__file__).resolve().parents[2]
START_MS = 1_700_000_000_000
MECHANISM = "SCRAM-SHA-512"
# Test-only secrets of the module's throwaway broker. `forecaster` may do what the service needs;
# `reader-only` the same except write to the output topic.
USERS = {"admin": "admin-secret", "forecaster": "forecaster-secret", "reader-only": "reader-only-secret"}
GUARANTEES = ["at_least_once", "exactly_once"]
# The service-level tests below run over both client libraries.
SERVICE_CLIENTS = ["confluent", "kafka-python"]


@dataclass(frozen=True)
class SecureBroker:
    plaintext: str  # User:ANONYMOUS, a super user: setup and checks
    sasl_ssl: str  # what the services and clients under test use
    cafile: Path


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory):
    """A broker of this module alone with a SASL_SSL listener and ACLs on; stopped and wiped at the end."""
    port = int(os.environ.get("FORECASTER_TEST_SECURE_BROKER_PORT", "19592"))
    data = tmp_path_factory.mktemp("secure-kafka")
    env = {
        **os.environ,
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(port + 1),
        "KAFKA_SASL_PORT": str(port + 2),
        "KAFKA_DATA_DIR": str(data),
        "KAFKA_SASL_ADMIN_PASSWORD": USERS["admin"],
        "KAFKA_SASL_USERS": " ".join(f"{u}:{p}" for u, p in USERS.items() if u != "admin"),
    }
    script = ROOT / "deploy" / "kafka"
    started = subprocess.run([str(script / "start")], env=env, capture_output=True, text=True, check=False)
    try:
        assert started.returncode == 0, f"deploy/kafka/start failed:\n{started.stderr}"
        # It says where the CA file is and which users it made.
        assert f"CA file {data / 'tls' / 'ca.pem'}" in started.stderr
        assert "reader-only:reader-only-secret" in started.stderr
        broker = SecureBroker(f"127.0.0.1:{port}", f"127.0.0.1:{port + 2}", data / "tls" / "ca.pem")
        wait_for_broker(KafkaSettings(bootstrap_servers=broker.plaintext), timeout=60)
        yield broker
    finally:
        subprocess.run([str(script / "stop"), "--wipe"], env=env, capture_output=True, check=False)


def allow(
    user: str, kind: ResourceType, name: str, *operations: ACLOperation, prefixed: bool = False
) -> list[ACL]:
    pattern = ResourcePattern(kind, name, Pattern.PREFIXED if prefixed else Pattern.LITERAL)
    return [ACL(f"User:{user}", "*", op, ACLPermissionType.ALLOW, pattern) for op in operations]


def service_acls(user: str, topics, write_output: bool) -> list[ACL]:
    """What ``forecaster serve`` needs: read the input in its group, write forecasts, dead letters and the
    state changelog (and read it back to restore), check the changelog's config, run transactions."""
    acls = [
        *allow(user, ResourceType.TOPIC, topics.input, ACLOperation.READ),
        *allow(user, ResourceType.GROUP, topics.group, ACLOperation.READ),
        *allow(user, ResourceType.TOPIC, topics.deadletter, ACLOperation.WRITE),
        *allow(
            user,
            ResourceType.TOPIC,
            topics.changelog,
            ACLOperation.READ,
            ACLOperation.WRITE,
            ACLOperation.DESCRIBE_CONFIGS,
        ),
        # the transactional id is "<group>-<instance id>"
        *allow(user, ResourceType.TRANSACTIONAL_ID, topics.group, ACLOperation.WRITE, prefixed=True),
    ]
    if write_output:
        return [*acls, *allow(user, ResourceType.TOPIC, topics.output, ACLOperation.WRITE)]
    return [*acls, *allow(user, ResourceType.TOPIC, topics.output, ACLOperation.DESCRIBE)]


@dataclass(frozen=True)
class SecureTopics:
    """The topics and group of one test on the secure broker (the fields ``serve`` reads)."""

    bootstrap: str  # the SASL_SSL listener: what the service under test connects to
    input: str
    output: str
    deadletter: str
    changelog: str
    group: str


@pytest.fixture
def topics(secure_broker: SecureBroker, group_factory) -> SecureTopics:
    """Replaces the shared broker's ``topics`` in this module, so that ``serve`` runs against the secure
    broker: topics made over the plaintext listener, ACLs for `forecaster` and `reader-only` on them."""
    name = group_factory
    made = SecureTopics(
        bootstrap=secure_broker.sasl_ssl,
        input=name("in"),
        output=name("out"),
        deadletter=name("dl"),
        changelog=name("cl"),
        group=name("g"),
    )
    admin = KafkaAdminClient(bootstrap_servers=secure_broker.plaintext, client_id="security-tests")  # ACLs
    try:
        ensure_topics(
            KafkaSettings(bootstrap_servers=secure_broker.plaintext, client_id="security-tests"),
            [
                TopicSpec(made.input, 3),
                TopicSpec(made.output, 2),
                TopicSpec(made.deadletter, 1),
                TopicSpec(made.changelog, 3, config=COMPACTED),
            ],
        )
        acls = service_acls("forecaster", made, write_output=True)
        acls += service_acls("reader-only", made, write_output=False)
        created = admin.create_acls(acls)
        assert not created["failed"], created["failed"]
    finally:
        admin.close()
    return made


@pytest.fixture(scope="module")
def kafka_bootstrap(secure_broker: SecureBroker) -> str:
    """In this module: the secure broker's plaintext listener, so that the conftest's ``broker`` helpers
    (send, read, committed) set up and check through it, and the session's broker is not needed."""
    return secure_broker.plaintext


@pytest.fixture(params=SERVICE_CLIENTS)
def kafka_client(request) -> str:
    """The client ``forecaster serve`` uses in this module (overrides the integration conftest's)."""
    return request.param


@pytest.fixture
def sasl_env(secure_broker: SecureBroker):
    """``sasl_env(user, password=None)``: the service's settings for a SASL_SSL login as ``user``."""

    def env(user: str, password: str | None = None) -> dict[str, str]:
        return {
            "FORECASTER_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "FORECASTER_KAFKA__SASL_MECHANISM": MECHANISM,
            "FORECASTER_KAFKA__SASL_USERNAME": user,
            "FORECASTER_KAFKA__SASL_PASSWORD": USERS[user] if password is None else password,
            "FORECASTER_KAFKA__SSL_CAFILE": str(secure_broker.cafile),
        }

    return env


def publish_model(root: Path):
    """A seeded model published as the checkpoint the services load; returns the loaded copy."""
    settings = Settings(model={"cell": "gru", "hidden_size": 8, "num_layers": 1, "horizon": 3, "seed": 5})
    version = save_checkpoint(root, fresh_model(settings), Scaling.from_settings(settings.scaling))
    promote(root, version)
    return load_checkpoint(root)


def input_records(frame) -> list[tuple[bytes, bytes]]:
    """One record per value, keyed by series, in time order."""
    rows = frame.sort_values("ts")
    return [
        (name.encode(), encode_input(name, ts, value))
        for name, ts, value in zip(rows["series"], rows["ts"], rows["value"], strict=True)
    ]


def check_each_value_forecast_once(forecasts, frame, loaded) -> None:
    """One forecast per input value, equal (1e-5) to the full-sequence pass of the loaded checkpoint."""
    bodies = [f.json() for f in forecasts]
    counts = Counter((b["series"], b["ts"]) for b in bodies)
    assert set(counts) == set(zip(frame["series"], frame["ts"], strict=True))
    assert set(counts.values()) == {1}, [key for key, n in counts.items() if n > 1][:5]
    for name, group in frame.groupby("series"):
        got = sorted((b for b in bodies if b["series"] == name), key=lambda b: b["ts"])
        expected = reference_forecast(
            loaded.model, group["value"].to_numpy(), loaded.scaling, Choice()
        )  # (T, H)
        np.testing.assert_allclose([b["forecast"] for b in got], expected, rtol=1e-5, atol=1e-5, err_msg=name)


# ---- the service -------------------------------------------------------------------------------------


def test_a_wrong_password_fails_at_start_with_one_line(topics, serve, sasl_env):
    service = serve(**sasl_env("forecaster", password="not-the-password")).start(wait_ready=False)
    code = service.proc.wait(timeout=90)  # bounded: it neither hangs nor loops
    log = service.log_path.read_text()
    lines = [line for line in log.splitlines() if line.strip()]
    assert code == 1, log
    assert lines[-1].startswith("forecaster serve: authentication failed at Kafka at"), log
    assert f"({MECHANISM} user forecaster; " in lines[-1]
    assert not [line for line in lines if " kafka." in line], log  # no line per lost connection
    assert "not-the-password" not in log
    # one attempt of a few logins (kafka-python's backoff between them), then the exit: no hot loop
    logins = int(re.search(r"(\d+) login\(s\) tried", lines[-1]).group(1))
    assert 1 <= logins <= 20, lines[-1]


def test_a_broker_certificate_the_ca_file_does_not_vouch_for_fails_with_one_line(secure_broker):
    settings = KafkaSettings(
        bootstrap_servers=secure_broker.sasl_ssl,
        security_protocol="SASL_SSL",
        sasl_mechanism=MECHANISM,
        sasl_username="forecaster",
        sasl_password=USERS["forecaster"],
        ssl_cafile=secure_broker.cafile.with_name("broker.pem"),  # the broker's own, not its CA
    )
    with pytest.raises(
        KafkaSetupError, match="TLS handshake with Kafka at .* failed: .*certificate verify failed"
    ):
        wait_for_broker(settings, timeout=60)


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_denied_write_on_the_output_commits_no_unforecast_input_then_the_service_user_forecasts_all(
    guarantee, topics, serve, sasl_env, broker, tmp_path
):
    loaded = publish_model(tmp_path / "checkpoints")
    frame = generate(n_series=6, n_values=20, start_ms=START_MS, step_ms=60_000, seed=7)
    settings = {"FORECASTER_SERVICE__PROCESSING_GUARANTEE": guarantee, "FORECASTER_SERVICE__INSTANCE_ID": "a"}

    # Step 1. `reader-only` may read the input but not write forecasts: it must stop without committing.
    denied = serve(**sasl_env("reader-only"), **settings).start()
    broker.send(topics.input, input_records(frame))
    code = denied.proc.wait(timeout=60)
    assert code not in (0, None), denied.tail()
    tail = denied.tail().lower()
    assert "topicauthorizationfailed" in tail or "topic authorization failed" in tail, denied.tail()
    made_it = broker.read(topics.output, isolation_level="read_committed")
    forecast_up_to: dict[int, int] = {}  # input partition -> the offset after its last forecast value
    for record in made_it:
        source = record.json()["input"]
        forecast_up_to[source["partition"]] = max(
            forecast_up_to.get(source["partition"], 0), source["offset"] + 1
        )
    committed = broker.committed(topics.input, topics.group)
    assert all(offset <= forecast_up_to.get(p, 0) for p, offset in committed.items()), (
        committed,
        forecast_up_to,
    )

    # Step 2. The service's own user, same group and instance, takes over: every value, exactly once.
    service = serve(**sasl_env("forecaster"), **settings).start()
    broker.read(topics.output, count=len(frame), timeout=60, isolation_level="read_committed")
    assert service.terminate() == 0
    check_each_value_forecast_once(
        broker.read(topics.output, isolation_level="read_committed"), frame, loaded
    )


# ---- librdkafka -------------------------------------------------------------------------------------


def test_librdkafka_clients_log_in_over_sasl_ssl_and_the_acls_hold(topics, secure_broker, broker):
    """The listener works for confluent-kafka (librdkafka), the service's coming default client."""
    import confluent_kafka  # a dev dependency; the service's own until its client interface lands

    def config(user: str) -> dict[str, str]:
        return {
            "bootstrap.servers": secure_broker.sasl_ssl,
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": MECHANISM,
            "sasl.username": user,
            "sasl.password": USERS[user],
            "ssl.ca.location": str(secure_broker.cafile),
        }

    def produce(user: str, value: bytes) -> list:
        outcomes = []
        producer = confluent_kafka.Producer({**config(user), "message.timeout.ms": 20_000})
        producer.produce(
            topics.output, key=b"k", value=value, on_delivery=lambda err, _msg: outcomes.append(err)
        )
        assert producer.flush(30) == 0
        return outcomes

    assert produce("forecaster", b"allowed") == [None]
    [refused] = produce("reader-only", b"refused")
    assert refused.code() == confluent_kafka.KafkaError.TOPIC_AUTHORIZATION_FAILED

    consumer = confluent_kafka.Consumer(
        {
            **config("admin"),
            "group.id": topics.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topics.output])
        received = []
        for _ in range(60):
            message = consumer.poll(1.0)
            if message is not None and message.error() is None:
                received.append(message.value())
            if received:
                break
    finally:
        consumer.close()
    assert received == [b"allowed"]
    assert [r.value for r in broker.read(topics.output)] == [b"allowed"]
