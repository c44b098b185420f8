"""``deploy/kafka/start`` started from a folder that holds a directory named ``kafka``: its readiness check
must not import that folder as the client library (it did, and stopped a healthy broker after 90 s)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from forecaster.config import KafkaSettings
from forecaster.service.clients import wait_for_broker

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_start_from_a_folder_holding_a_kafka_directory(tmp_path: Path) -> None:
    decoy = tmp_path / "kafka"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("# importable, but not the client library\n")
    port, controller = free_port(), free_port()
    env = {
        **os.environ,
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(controller),
        "KAFKA_DATA_DIR": str(tmp_path / "data"),
        "KAFKA_START_TIMEOUT": "120",
        "PYTHONPATH": "",  # nothing but the current folder could lead Python to the decoy
    }
    script = ROOT / "deploy" / "kafka"
    started = subprocess.run(
        [str(script / "start")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    try:
        assert started.returncode == 0, started.stderr
        assert wait_for_broker(KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"), timeout=30) >= 1
    finally:
        subprocess.run(
            [str(script / "stop"), "--wipe"], cwd=tmp_path, env=env, capture_output=True, timeout=120
        )
