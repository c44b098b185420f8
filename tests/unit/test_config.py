"""Settings: defaults, environment variables, one-line errors naming the variable, masked secrets."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import ValidationError

from forecaster.cli import main
from forecaster.config import KafkaSettings, Settings, load_settings
from forecaster.errors import ConfigError
from forecaster.service.clients.confluent import connection_config
from forecaster.service.clients.kafkapython import connection_options

SECRET = "hunter2-not-for-logs"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No FORECASTER_* variable of the calling shell (CI sets the bootstrap address) leaks in."""
    for name in list(os.environ):
        if name.startswith("FORECASTER_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults_name_the_topics_and_local_broker():
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.kafka.input_topic == "ts.input"
    assert settings.kafka.output_topic == "ts.forecasts"
    assert settings.kafka.deadletter_topic == "ts.deadletter"
    assert settings.kafka.changelog_topic == "ts.state-changelog"
    assert settings.kafka.security_protocol == "PLAINTEXT"
    assert settings.kafka.sasl_password is None


def test_environment_variables_use_prefix_and_double_underscore(clean_env):
    clean_env.setenv("FORECASTER_KAFKA__BOOTSTRAP_SERVERS", "kafka-a:9092, kafka-b:9093")
    clean_env.setenv("FORECASTER_KAFKA__INPUT_TOPIC", "metrics.raw")
    clean_env.setenv("FORECASTER_MODEL__HIDDEN_SIZE", "128")
    clean_env.setenv("FORECASTER_MODEL__CELL", "lstm")
    clean_env.setenv("FORECASTER_METRICS__PORT", "9200")
    clean_env.setenv("FORECASTER_LOG_LEVEL", "DEBUG")
    clean_env.setenv("FORECASTER_TRAIN__SEASONS", "[168, 8766]")
    settings = load_settings()
    assert settings.train.seasons == [168, 8766]
    assert settings.kafka.bootstrap_servers == "kafka-a:9092,kafka-b:9093"
    assert settings.kafka.client == "confluent"  # the default client
    assert connection_options(settings.kafka)["bootstrap_servers"] == ["kafka-a:9092", "kafka-b:9093"]
    assert connection_config(settings.kafka)["bootstrap.servers"] == "kafka-a:9092,kafka-b:9093"
    assert settings.kafka.input_topic == "metrics.raw"
    assert settings.model.hidden_size == 128
    assert settings.model.cell == "lstm"
    assert settings.metrics.port == 9200
    assert settings.log_level == "DEBUG"


def test_a_variable_without_the_prefix_is_ignored(clean_env):
    clean_env.setenv("MODEL__HIDDEN_SIZE", "7")
    assert load_settings().model.hidden_size == 64  # the default, not the unprefixed 7


def test_bad_value_gives_one_line_naming_the_variable(clean_env):
    clean_env.setenv("FORECASTER_MODEL__HIDDEN_SIZE", "-3")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert "FORECASTER_MODEL__HIDDEN_SIZE" in message
    assert "-3" in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FORECASTER_KAFKA__BOOTSTRAP_SERVERS", "no-port-here"),
        ("FORECASTER_KAFKA__SECURITY_PROTOCOL", "CARRIER_PIGEON"),
        ("FORECASTER_STATE__DEVICE", "tpu"),
        ("FORECASTER_METRICS__PORT", "70000"),
        ("FORECASTER_TRAIN__SEASONS", "[1]"),
        ("FORECASTER_TRAIN__SEASONS", "168"),
    ],
)
def test_other_bad_values_name_their_variable(clean_env, variable, value):
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


def test_sasl_without_credentials_is_refused(clean_env):
    clean_env.setenv("FORECASTER_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    clean_env.setenv("FORECASTER_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    clean_env.setenv("FORECASTER_KAFKA__SASL_PASSWORD", SECRET)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "FORECASTER_KAFKA" in str(caught.value)
    assert "sasl_username" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_sasl_needs_a_mechanism():
    with pytest.raises(ValidationError, match="sasl_mechanism"):
        KafkaSettings(security_protocol="SASL_PLAINTEXT")


def test_complete_sasl_settings_reach_both_clients(tmp_path):
    kafka = KafkaSettings(
        security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="svc", sasl_password=SECRET
    )
    options = connection_options(kafka)
    assert options["security_protocol"] == "SASL_PLAINTEXT"
    assert options["sasl_mechanism"] == "PLAIN"
    assert options["sasl_plain_username"] == "svc"
    assert options["sasl_plain_password"] == SECRET
    config = connection_config(kafka)
    assert config["security.protocol"] == "SASL_PLAINTEXT"
    assert config["sasl.mechanism"] == "PLAIN"
    assert config["sasl.username"] == "svc"
    assert config["sasl.password"] == SECRET


def test_tls_settings_reach_both_clients(tmp_path):
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    kafka = KafkaSettings(
        security_protocol="SSL",
        ssl_cafile=tmp_path / "ca.pem",
        ssl_certfile=tmp_path / "cert.pem",
        ssl_keyfile=tmp_path / "key.pem",
        ssl_password=SECRET,
        ssl_check_hostname=False,
        request_timeout_ms=7000,
    )
    config = connection_config(kafka)
    assert config["ssl.ca.location"] == str(tmp_path / "ca.pem")
    assert config["ssl.certificate.location"] == str(tmp_path / "cert.pem")
    assert config["ssl.key.location"] == str(tmp_path / "key.pem")
    assert config["ssl.key.password"] == SECRET
    assert config["ssl.endpoint.identification.algorithm"] == "none"
    assert config["socket.timeout.ms"] == 7000
    options = connection_options(kafka)
    assert options["ssl_cafile"] == str(tmp_path / "ca.pem")
    assert options["ssl_password"] == SECRET
    assert options["ssl_check_hostname"] is False
    assert options["request_timeout_ms"] == 7000


def test_secrets_never_appear_in_repr_str_or_masked_json():
    settings = Settings(
        kafka={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "PLAIN",
            "sasl_username": "svc",
            "sasl_password": SECRET,
            "ssl_password": SECRET,
        }
    )
    for text in (repr(settings), str(settings), repr(settings.kafka), settings.masked_json()):
        assert SECRET not in text
    dumped = json.loads(settings.masked_json())
    assert dumped["kafka"]["sasl_username"] == "svc"
    assert dumped["kafka"]["sasl_password"] not in (None, "")
    assert settings.kafka.sasl_password.get_secret_value() == SECRET


def test_config_command_prints_effective_settings_with_secrets_masked(clean_env, capsys):
    clean_env.setenv("FORECASTER_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    clean_env.setenv("FORECASTER_KAFKA__SASL_MECHANISM", "PLAIN")
    clean_env.setenv("FORECASTER_KAFKA__SASL_USERNAME", "svc")
    clean_env.setenv("FORECASTER_KAFKA__SASL_PASSWORD", SECRET)
    clean_env.setenv("FORECASTER_MODEL__HIDDEN_SIZE", "96")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    printed = json.loads(out)
    assert printed["model"]["hidden_size"] == 96
    assert printed["kafka"]["security_protocol"] == "SASL_PLAINTEXT"
    assert printed["kafka"]["sasl_username"] == "svc"


def test_config_command_exits_2_with_one_line_for_a_bad_value(clean_env, capsys):
    clean_env.setenv("FORECASTER_MODEL__HIDDEN_SIZE", "-3")
    assert main(["config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert "FORECASTER_MODEL__HIDDEN_SIZE" in lines[0]


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_config_command_shows_the_effective_client_with_secrets_masked(clean_env, capsys, client):
    clean_env.setenv("FORECASTER_KAFKA__CLIENT", client)
    clean_env.setenv("FORECASTER_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    clean_env.setenv("FORECASTER_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    clean_env.setenv("FORECASTER_KAFKA__SASL_USERNAME", "svc")
    clean_env.setenv("FORECASTER_KAFKA__SASL_PASSWORD", SECRET)
    assert main(["config", "--client"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    printed = json.loads(out)
    assert printed["library"] == client
    connection = printed["connection"]
    if client == "confluent":
        assert connection["sasl.mechanism"] == "SCRAM-SHA-512" and connection["sasl.username"] == "svc"
    else:
        assert connection["sasl_mechanism"] == "SCRAM-SHA-512" and connection["sasl_plain_username"] == "svc"


def test_max_message_bytes_defaults_to_kafkas_limit_and_refuses_too_small_or_absurd(clean_env):
    assert load_settings().service.max_message_bytes == 1_048_576
    clean_env.setenv("FORECASTER_SERVICE__MAX_MESSAGE_BYTES", "8192")
    assert load_settings().service.max_message_bytes == 8192
    for bad in ("100", "2000000000"):
        clean_env.setenv("FORECASTER_SERVICE__MAX_MESSAGE_BYTES", bad)
        with pytest.raises(ConfigError, match="FORECASTER_SERVICE__MAX_MESSAGE_BYTES"):
            load_settings()
