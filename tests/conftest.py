"""Session-wide test fixtures: the real Kafka broker, and unique topics and consumer groups on it.

The broker is the one at ``FORECASTER_KAFKA__BOOTSTRAP_SERVERS`` (default 127.0.0.1:9092) when it
answers; otherwise ``deploy/kafka/start`` boots one for the run (its own data folder under .run/; with
pytest-xdist's workers, one of them) and it is stopped and wiped when the run ends. Every test under
tests/integration/ is marked ``integration`` automatically, so ``pytest -m "not integration"`` runs
without a broker.
"""

from __future__ import annotations

import contextlib
import fcntl
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


def _broker_env(address: str) -> dict[str, str]:
    host, _, port = address.split(",")[0].rpartition(":")
    return {
        **os.environ,
        "KAFKA_HOST": host,
        "KAFKA_PORT": port,
        "KAFKA_CONTROLLER_PORT": os.environ.get("KAFKA_CONTROLLER_PORT", str(int(port) + 1)),
        "KAFKA_DATA_DIR": str(ROOT / ".run" / f"kafka-pytest-{port}"),
    }


def _started_marker(address: str) -> Path:
    """Written by the process that started the session's broker; the run's main process stops it."""
    return ROOT / ".run" / f"kafka-pytest-{address.split(',')[0].rpartition(':')[2]}.started"


def pytest_configure(config: pytest.Config) -> None:
    # One id for the whole run, inherited by pytest-xdist's workers (they start after this).
    if not hasattr(config, "workerinput"):
        os.environ.setdefault("FORECASTER_TEST_RUN", uuid.uuid4().hex)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The main process (never an xdist worker) stops the broker a test of this run started."""
    if hasattr(config, "workerinput"):
        return
    address = os.environ.get(BOOTSTRAP_ENV, "127.0.0.1:9092")
    marker = _started_marker(address)
    if marker.exists() and marker.read_text() == os.environ.get("FORECASTER_TEST_RUN"):
        subprocess.run(
            [str(ROOT / "deploy" / "kafka" / "stop"), "--wipe"], env=_broker_env(address), check=False
        )
        marker.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The bootstrap address of a real broker that answers, started for the run if needed.

    Parallel workers (pytest -n) take a lock first, so one of them starts it and the others find it; the
    run's main process stops it at the end (``pytest_unconfigure``).
    """
    address = os.environ.get(BOOTSTRAP_ENV, "127.0.0.1:9092")
    if not _port_open(address):
        marker = _started_marker(address)
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _port_open(address):
                started = subprocess.run(
                    [str(ROOT / "deploy" / "kafka" / "start")],
                    env=_broker_env(address),
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if started.returncode != 0:
                    pytest.fail(
                        f"no broker at {address} and deploy/kafka/start failed:\n{started.stderr}",
                        pytrace=False,
                    )
                marker.write_text(os.environ.get("FORECASTER_TEST_RUN", ""))
    wait_for_broker(KafkaSettings(bootstrap_servers=address), timeout=60)
    yield address


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
