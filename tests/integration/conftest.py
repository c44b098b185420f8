"""Helpers for the service tests: ``forecaster serve`` as a real process, and reading topics to the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from exactly_once import FAST, publish_model
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from forecaster.config import KafkaSettings, Settings
from forecaster.service.clients import COMPACTED, wait_for_broker

ROOT = Path(__file__).resolve().parents[2]

# The Kafka client libraries the service runs with in these tests; FORECASTER_TEST_CLIENTS narrows it
# (e.g. a CI job per client). Heavy tests pin one client with ``@pytest.mark.parametrize("kafka_client", ...)``.
CLIENTS = [c for c in os.environ.get("FORECASTER_TEST_CLIENTS", "confluent,kafka-python").split(",") if c]

# A small model so a test runs in seconds; the same values build the reference model in the tests.
SMALL_MODEL = {"cell": "gru", "hidden_size": 8, "num_layers": 1, "horizon": 3, "seed": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Topics:
    """The topics and group of one service under test."""

    bootstrap: str
    input: str
    output: str
    deadletter: str
    group: str
    changelog: str = ""  # compacted, co-partitioned with ``input`` (the exactly-once state changelog)

    def settings(self, **sections: dict) -> Settings:
        """The ``Settings`` the service process sees (for building the reference model in a test)."""
        return Settings(model=SMALL_MODEL, **sections)


@pytest.fixture
def topics(kafka_bootstrap, topic_factory, group_factory) -> Topics:
    return Topics(
        bootstrap=kafka_bootstrap,
        input=topic_factory(partitions=3, prefix="in"),
        output=topic_factory(partitions=2, prefix="out"),
        deadletter=topic_factory(partitions=1, prefix="dl"),
        group=group_factory(),
        changelog=topic_factory(partitions=3, config=COMPACTED, prefix="cl"),
    )


@dataclass
class ServeProcess:
    """``python -m forecaster serve`` with its settings in the environment; log in ``log_path``."""

    env: dict[str, str]
    log_path: Path
    metrics_port: int
    proc: subprocess.Popen | None = None
    exit_codes: list[int] = field(default_factory=list)

    def start(self, wait_ready: bool = True) -> ServeProcess:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forecaster", "serve"],
            env=self.env,
            cwd=ROOT,
            stdout=self.log,
            stderr=self.log,
        )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 45.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"forecaster serve exited with {self.proc.returncode}:\n{self.tail()}")
            if self.http("/readyz")[0] == 200:
                return
            time.sleep(0.2)
        pytest.fail(f"forecaster serve not ready after {timeout} s:\n{self.tail()}")

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample on ``/metrics``: ``{(name, sorted labels): value}``."""
        status, text = self.http("/metrics")
        assert status == 200, f"/metrics answered {status}"
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self._wait(timeout)

    def kill(self) -> int:
        """kill -9: no flush, no commit."""
        self.proc.kill()
        return self._wait(10.0)

    def _wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10.0)
            pytest.fail(f"forecaster serve did not stop within {timeout} s:\n{self.tail()}")
        self.log.close()
        self.exit_codes.append(code)
        if code not in (0, -9):
            print(f"forecaster serve exited with {code}:\n{self.tail()}")  # shown with the failure
        return code

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(params=CLIENTS)
def kafka_client(request: pytest.FixtureRequest) -> str:
    """The client library ``forecaster serve`` uses (``kafka.client``)."""
    return request.param


@pytest.fixture
def serve(topics: Topics, tmp_path: Path, kafka_client: str) -> Iterator[Callable[..., ServeProcess]]:
    """``serve(**env)`` -> a ``ServeProcess`` (not started) on the test's topics, with ``kafka_client``;
    stopped at teardown."""
    made: list[ServeProcess] = []

    def make(**extra_env: str) -> ServeProcess:
        port = free_port()
        env = {
            **os.environ,
            "FORECASTER_KAFKA__CLIENT": kafka_client,
            "FORECASTER_KAFKA__BOOTSTRAP_SERVERS": topics.bootstrap,
            "FORECASTER_KAFKA__INPUT_TOPIC": topics.input,
            "FORECASTER_KAFKA__OUTPUT_TOPIC": topics.output,
            "FORECASTER_KAFKA__DEADLETTER_TOPIC": topics.deadletter,
            "FORECASTER_KAFKA__CHANGELOG_TOPIC": topics.changelog,
            "FORECASTER_KAFKA__GROUP_ID": topics.group,
            "FORECASTER_CHECKPOINTS__DIR": str(tmp_path / "checkpoints"),
            "FORECASTER_STATE__DEVICE": "cpu",
            "FORECASTER_STATE__SPILL_DIR": str(tmp_path / "spill"),
            "FORECASTER_SERVICE__POLL_TIMEOUT_MS": "50",
            "FORECASTER_SERVICE__COMMIT_INTERVAL_MS": "50",
            "FORECASTER_METRICS__HOST": "127.0.0.1",
            "FORECASTER_METRICS__PORT": str(port),
            "FORECASTER_METRICS__REFRESH_SECONDS": "0.1",
            "FORECASTER_METRICS__LAG_INTERVAL_SECONDS": "0.2",
            "OMP_NUM_THREADS": "1",
            **{f"FORECASTER_MODEL__{k.upper()}": str(v) for k, v in SMALL_MODEL.items()},
            **extra_env,
        }
        process = ServeProcess(env, tmp_path / f"serve-{len(made)}.log", port)
        made.append(process)
        return process

    yield make
    for process in made:
        if process.proc is not None and process.proc.poll() is None:
            process.kill()
        if process.proc is not None:  # shown by pytest when the test failed
            print(f"--- {process.log_path.name} (exit {process.proc.returncode}) ---\n{process.tail(25)}")


def send(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
    """Produce ``(key, value)`` records and wait for the acknowledgements; returns how many."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    count = 0
    for key, value in records:
        producer.send(topic, key=key, value=value)
        count += 1
    producer.flush()
    producer.close()
    return count


@dataclass
class Consumed:
    key: bytes | None
    value: bytes | None
    partition: int
    offset: int

    def json(self) -> dict:
        return json.loads(self.value)


def read_topic(
    bootstrap: str,
    topic: str,
    count: int | None = None,
    timeout: float = 30.0,
    isolation_level: str = "read_uncommitted",
) -> list[Consumed]:
    """Every record of ``topic`` from the beginning: until ``count`` arrived (or ``timeout``), or, with
    ``count=None``, up to the end offsets as they are now (``read_committed``: the last stable offsets)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, isolation_level=isolation_level
    )
    deadline = time.monotonic() + timeout
    partitions = None
    while partitions is None and time.monotonic() < deadline:
        partitions = consumer.partitions_for_topic(topic)
        if partitions is None:
            time.sleep(0.1)
    assert partitions, f"topic {topic} has no partitions"
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    ends = consumer.end_offsets(tps)
    out: list[Consumed] = []
    try:
        while time.monotonic() < deadline:
            for part in consumer.poll(timeout_ms=200).values():
                out.extend(Consumed(r.key, r.value, r.partition, r.offset) for r in part)
            if count is not None and len(out) >= count:
                break
            if count is None and all(consumer.position(tp) >= ends[tp] for tp in tps):
                break
    finally:
        consumer.close()
    return out


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


class Broker:
    """The topic helpers, bound to the test broker: ``send``, ``read``, ``wait_for``."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    def send(self, topic: str, records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
        return send(self.bootstrap, topic, records)

    def read(
        self,
        topic: str,
        count: int | None = None,
        timeout: float = 30.0,
        isolation_level: str = "read_uncommitted",
    ) -> list[Consumed]:
        return read_topic(self.bootstrap, topic, count, timeout, isolation_level)

    def committed(self, topic: str, group: str) -> dict[int, int]:
        """The group's committed offset per partition of ``topic`` (0 where none is committed)."""
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False)
        try:
            partitions = sorted(consumer.partitions_for_topic(topic) or [])
            return {p: consumer.committed(TopicPartition(topic, p)) or 0 for p in partitions}
        finally:
            consumer.close(autocommit=False)

    wait_for = staticmethod(wait_until)


@pytest.fixture
def broker(kafka_bootstrap: str) -> Broker:
    return Broker(kafka_bootstrap)


# ---- exactly once (tests/integration/test_exactly_once*.py) ------------------------------------------


@pytest.fixture
def eos(topics, topic_factory, tmp_path, serve):
    """Topics with a changelog (6 input partitions), a published checkpoint, and a serve factory."""
    topics.input = topic_factory(partitions=6, prefix="in")
    topics.changelog = topic_factory(partitions=6, config=COMPACTED, prefix="cl")
    loaded = publish_model(tmp_path / "checkpoints")

    def start(instance: str, wait: bool = True, **env: str):
        process = serve(
            FORECASTER_SERVICE__INSTANCE_ID=instance,
            **{**FAST, **env},
        )
        return process.start(wait_ready=wait)

    return topics, loaded, start


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test alone (other ports, its own data): stopping it disturbs no other test."""
    port = int(os.environ.get("FORECASTER_TEST_OWN_BROKER_PORT", "19492"))
    env = {
        **os.environ,
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(port + 1),
        "KAFKA_DATA_DIR": str(tmp_path / "kafka"),
    }
    script = ROOT / "deploy" / "kafka"

    def run(name: str, *args: str) -> None:
        done = subprocess.run(
            [str(script / name), *args], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr

    run("start")
    address = f"127.0.0.1:{port}"
    wait_for_broker(KafkaSettings(bootstrap_servers=address), timeout=60)
    try:
        yield address, lambda: run("stop"), lambda: run("start")
    finally:
        run("stop", "--wipe")
