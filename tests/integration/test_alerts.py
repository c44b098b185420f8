"""Alerts go somewhere: a firing rule reaches Alertmanager (deploy/alertmanager/alertmanager.yml), which posts
critical and warning alerts to the webhook and logs the rest.

Real Debian ``prometheus`` and ``prometheus-alertmanager`` on free loopback ports, the shipped configs
with the ports and the webhook address put in (as deploy/local/up does), a rule that fires at once, and a
small HTTP server in the test as the webhook receiver.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.local.yml"
RULES = {
    "groups": [
        {
            "name": "test",
            "rules": [
                {"alert": "TestWarningNow", "expr": "vector(1)", "labels": {"severity": "warning"}},
                {"alert": "TestInfoNow", "expr": "vector(1)", "labels": {"severity": "info"}},
            ],
        }
    ]
}

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install {name}; .ci/run installs it)")
    return path


class Webhook:
    """Records every JSON body posted to it."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append({"path": self.path, **json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()
    hook.server.server_close()


def start(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def test_a_firing_rule_reaches_the_webhook_and_the_log(tmp_path: Path, webhook: Webhook) -> None:
    prometheus, alertmanager = binary("prometheus"), binary("prometheus-alertmanager")
    am_port, prom_port = free_port(), free_port()
    # The shipped configs, with the addresses of this test (as deploy/local/up writes its copies).
    config = ALERTMANAGER_CONFIG.read_text().replace("http://127.0.0.1:5001/alerts", webhook.url)
    assert config != ALERTMANAGER_CONFIG.read_text(), "the webhook address in alertmanager.yml moved"
    (tmp_path / "alertmanager.yml").write_text(config)
    prom = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]
    prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{am_port}"]
    prom["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    prom["rule_files"] = [str(tmp_path / "rules.yml")]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(RULES))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom))
    processes = []

    def ready(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    processes.append(
        start(
            [
                alertmanager,
                f"--config.file={tmp_path / 'alertmanager.yml'}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
                "--log.level=debug",
            ],
            tmp_path / "alertmanager.log",
        )
    )
    # Alertmanager first, so that Prometheus's first sends find it.
    deadline = time.monotonic() + 30
    while not ready(am_port) and time.monotonic() < deadline and processes[0].poll() is None:
        time.sleep(0.2)
    processes.append(
        start(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                # A first send can go before the notifier knows its Alertmanager: resend soon, not in 1 m.
                "--rules.alert.resend-delay=2s",
            ],
            tmp_path / "prometheus.log",
        )
    )
    try:
        deadline = time.monotonic() + 120  # group_wait (10 s) after the first evaluation
        while not webhook.posts and time.monotonic() < deadline:
            assert all(p.poll() is None for p in processes), (tmp_path / "alertmanager.log").read_text()
            time.sleep(0.5)
        assert webhook.posts, (tmp_path / "alertmanager.log").read_text()[-3000:]
        post = webhook.posts[0]
        assert post["path"] == "/alerts" and post["status"] == "firing" and post["receiver"] == "webhook"
        names = {alert["labels"]["alertname"] for post in webhook.posts for alert in post["alerts"]}
        assert names == {"TestWarningNow"}  # info goes to the log receiver, not the webhook
        # The info alert: logged by Alertmanager, flushed from the root route (the `log` receiver).
        logged = (tmp_path / "alertmanager.log").read_text().splitlines()
        assert any('msg="Received alert" alert=TestInfoNow' in line for line in logged)
        flushed = [line for line in logged if "msg=flushing" in line and "TestInfoNow" in line]
        assert flushed and all("severity=~" not in line for line in flushed)
    finally:
        for process in processes:
            stop(process)
