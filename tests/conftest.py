"""Session-wide test fixtures: the real Kafka broker, and unique topics and consumer groups on it.

The broker is the one at ``FORECASTER_KAFKA__BOOTSTRAP_SERVERS`` (default 127.0.0.1:9092) when it
answers; otherwise ``deploy/kafka/start`` boots one for the session (its own data folder under .run/)
and it is stopped and wiped when the session ends. Every test under tests/integration/ is marked
``integration`` automatically, so ``pytest -m "not integration"`` runs without a broker.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from forecaster.config import KafkaSettings
from forecaster.service.clients import TopicSpec, ensure_topics, make_admin, wait_for_broker

ROOT = Path(__file__).resolve().parent.parent
INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"
BOOTSTRAP_ENV = "FORECASTER_KAFKA__BOOTSTRAP_SERVERS"
# Training run in this process (``main(["train", ...])``) must not lower the whole test session's priority.
os.environ.setdefault("FORECASTER_TRAIN__NICENESS", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _port_open(address: str) -> bool:
    host, _, port = address.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def _unique(prefix: str, request: pytest.FixtureRequest) -> str:
    test = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:80].strip("-")
    return f"{prefix}-{test}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The bootstrap address of a real broker that answers, started for the session if needed."""
    address = os.environ.get(BOOTSTRAP_ENV, "127.0.0.1:9092")
    if _port_open(address):
        wait_for_broker(KafkaSettings(bootstrap_servers=address), timeout=60)
        yield address
        return
    host, _, port = address.split(",")[0].rpartition(":")
    env = {
        **os.environ,
        "KAFKA_HOST": host,
        "KAFKA_PORT": port,
        "KAFKA_CONTROLLER_PORT": os.environ.get("KAFKA_CONTROLLER_PORT", str(int(port) + 1)),
        "KAFKA_DATA_DIR": str(ROOT / ".run" / f"kafka-pytest-{port}"),
    }
    started = subprocess.run(
        [str(ROOT / "deploy" / "kafka" / "start")], env=env, capture_output=True, text=True, check=False
    )
    if started.returncode != 0:
        pytest.fail(f"no broker at {address} and deploy/kafka/start failed:\n{started.stderr}", pytrace=False)
    try:
        wait_for_broker(KafkaSettings(bootstrap_servers=address), timeout=60)
        yield address
    finally:
        subprocess.run([str(ROOT / "deploy" / "kafka" / "stop"), "--wipe"], env=env, check=False)


@pytest.fixture
def kafka_settings(kafka_bootstrap: str) -> KafkaSettings:
    """``KafkaSettings`` pointed at the test broker (a fresh object per test: mutate freely)."""
    return KafkaSettings(bootstrap_servers=kafka_bootstrap)


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Iterator:
    """One admin client for the session."""
    admin = make_admin(KafkaSettings(bootstrap_servers=kafka_bootstrap, client_id="forecaster-tests"))
    yield admin
    admin.close()


TopicFactory = Callable[..., str]


@pytest.fixture
def topic_factory(kafka_admin, request: pytest.FixtureRequest) -> Iterator[TopicFactory]:
    """Create topics with unique names: ``topic_factory(partitions=3, config={...}) -> name``.

    The topics are deleted when the test ends.
    """
    created: list[str] = []

    def create(partitions: int = 1, config: Mapping[str, str] | None = None, prefix: str = "t") -> str:
        name = _unique(prefix, request)
        ensure_topics(kafka_admin, [TopicSpec(name, partitions, config=dict(config or {}))])
        created.append(name)
        return name

    yield create
    if created:
        # Best effort: unique names keep tests apart even if a deletion fails.
        with contextlib.suppress(Exception):
            kafka_admin.delete(created, 30)


@pytest.fixture
def group_factory(request: pytest.FixtureRequest) -> Callable[[], str]:
    """Unique consumer group ids: ``group_factory() -> "g-<test>-<random>"``."""
    return lambda prefix="g": _unique(prefix, request)
