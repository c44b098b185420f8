"""The live check of the observability: the local pipeline (deploy/local/up) against the test broker, a real
Prometheus scraping it every second, and every PromQL expression of the dashboard and of the rules
evaluated through the Prometheus HTTP API.

A dashboard query passes when it evaluates and returns data, and every metric it names exists; a rule (or
an annotation) passes when it evaluates and every metric it names exists (an alert that does not fire
returns nothing, which is fine). Then deploy/local/down must leave no process behind.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from forecaster.config import KafkaSettings
from forecaster.service.clients import make_producer

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "forecaster.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
# What Grafana's interval variables stand for at a 1 s scrape interval (rate() needs two samples).
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$__interval": "5s", "$__range": "5m"}
WAIT_FOR_DATA_SECONDS = 90

# One pytest-xdist worker runs this file: its module fixture (a running pipeline) is set up once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("observability")]


# --- PromQL against a Prometheus -----------------------------------------------------------------

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (function names, labels and keywords left out).

    >>> sorted(metric_names('sum by (le) (rate(a_bucket{x="y"}[5m])) / on () b + time()'))
    ['a_bucket', 'b']
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", text):
        if match.group(1).lower() not in _KEYWORDS:
            names.add(match.group(1))
    return names


def grafana_expr(expr: str, chosen: dict[str, str] | None = None) -> str:
    """``expr`` as Grafana sends it: its interval variables, and the dashboard's variables as ``chosen``."""
    for variable, value in {**GRAFANA_VARIABLES, **(chosen or {})}.items():
        expr = expr.replace(variable, value)
    return expr


class Prometheus:
    """The bits of the HTTP API these checks use."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> dict:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        try:
            with urllib.request.urlopen(self.url + path + query, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422: a bad expression; the body says why
            return json.load(exc)

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)

    def has_metric(self, name: str) -> bool:
        answer = self.query(f'count(last_over_time({{__name__="{name}"}}[10m]))')
        return answer["status"] == "success" and bool(answer["data"]["result"])


def check_expression(prometheus: Prometheus, where: str, expr: str, need_data: bool) -> list[str]:
    """Problems with one expression: it does not evaluate, returns nothing, or names a missing metric."""
    answer = prometheus.query(expr)
    if answer["status"] != "success":
        return [f"{where}: `{expr}` does not evaluate: {answer.get('error')}"]
    problems = [
        f"{where}: metric {name} does not exist"
        for name in sorted(metric_names(expr))
        if not prometheus.has_metric(name)
    ]
    if need_data and not answer["data"]["result"]:
        problems.append(f"{where}: `{expr}` returns no data")
    return problems


def dashboard_variables(prometheus: Prometheus, dashboard: dict) -> tuple[dict[str, str], list[str]]:
    """A value for each ``label_values(metric, label)`` variable, picked as a user would (the first one its
    query offers), and the problems: a variable whose query offers nothing."""
    chosen, problems = {}, []
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"])
        if match is None:
            problems.append(f"variable {variable['name']}: not a label_values(metric, label) query")
            continue
        metric, label = match.groups()
        answer = prometheus.query(f"count by ({label}) ({metric})")
        values = sorted(r["metric"][label] for r in answer["data"]["result"] if label in r["metric"])
        if not values:
            problems.append(f"variable {variable['name']}: {variable['query']['query']} offers no value")
            continue
        chosen["$" + variable["name"]] = values[0]
    return chosen, problems


def check_dashboard(prometheus: Prometheus, dashboard: dict) -> list[str]:
    """Every variable offers a value; with those chosen, every panel query evaluates with data and every
    annotation query evaluates."""
    chosen, problems = dashboard_variables(prometheus, dashboard)
    if problems:
        return problems
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    for panel in panels:
        for target in panel.get("targets", []):
            where = f"panel {panel['title']!r} ({target['refId']})"
            expr = grafana_expr(target["expr"], chosen)
            problems += check_expression(prometheus, where, expr, need_data=True)
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            where = f"annotation {annotation['name']!r}"
            expr = grafana_expr(annotation["expr"], chosen)
            problems += check_expression(prometheus, where, expr, need_data=False)
    return problems


def check_rules(prometheus: Prometheus, rules: dict) -> list[str]:
    problems = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            where = f"rule {rule.get('alert') or rule.get('record')}"
            problems += check_expression(prometheus, where, rule["expr"], need_data=False)
    return problems


# --- the pipeline --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting for its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(") ", 1)[1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def produce_garbage(bootstrap: str, topic: str) -> int:
    """Records the service must dead-letter, so the dead-letter panel has something to show."""
    bad = [b"not json", b"[1, 2, 3]", b'{"series": "g1"}', b'{"series": "g2", "value": "high"}', b"\xff\xfe"]
    producer = make_producer(KafkaSettings(bootstrap_servers=bootstrap))
    try:
        for i, value in enumerate(bad):
            producer.send(topic, key=f"g{i}".encode(), value=value)
        producer.flush()
    finally:
        producer.close(timeout=10)
    return len(bad)


@pytest.fixture(scope="module")
def pipeline(kafka_bootstrap: str, kafka_admin, tmp_path_factory: pytest.TempPathFactory):
    """deploy/local/up on unique topics and free ports, with history and a few bad records in the input."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus; .ci/run installs it)")
    run_dir = tmp_path_factory.mktemp("local")
    name = f"obs-{uuid.uuid4().hex[:10]}"
    topics = {
        "INPUT": f"{name}.input",
        "OUTPUT": f"{name}.forecasts",
        "DEADLETTER": f"{name}.deadletter",
        "CHANGELOG": f"{name}.changelog",
    }
    ports = {
        "serve": free_port(),
        "train": free_port(),
        "prometheus": free_port(),
        "alertmanager": free_port(),
    }
    env = {key: value for key, value in os.environ.items() if not key.startswith("FORECASTER_")}
    env.update(
        {
            "PYTHON": sys.executable,
            "LOCAL_RUN_DIR": str(run_dir),
            "FORECASTER_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
            **{f"FORECASTER_KAFKA__{key}_TOPIC": topic for key, topic in topics.items()},
            "FORECASTER_KAFKA__GROUP_ID": name,
            "FORECASTER_KAFKA__PARTITIONS": "2",
            "FORECASTER_MODEL__HIDDEN_SIZE": "8",
            "FORECASTER_MODEL__NUM_LAYERS": "1",
            "FORECASTER_MODEL__HORIZON": "3",
            "FORECASTER_TRAIN__EPOCHS": "2",
            "FORECASTER_TRAIN__SEASON": "24",
            # Shadow promotion, a candidate at every run after the first: the champion-and-challenger
            # panels have a trial to show.
            "FORECASTER_CHECKPOINTS__PROMOTION": "shadow",
            "FORECASTER_TRAIN__PUBLISH_ONLY_IF_BETTER": "false",
            "FORECASTER_SERVICE__CHECKPOINT_POLL_SECONDS": "0.5",
            "FORECASTER_METRICS__REFRESH_SECONDS": "0.5",
            "FORECASTER_METRICS__LAG_INTERVAL_SECONDS": "1",
            "FORECASTER_METRICS__PORT": str(ports["serve"]),
            "FORECASTER_TRAIN__METRICS_PORT": str(ports["train"]),
            "PROMETHEUS_PORT": str(ports["prometheus"]),
            "ALERTMANAGER_PORT": str(ports["alertmanager"]),
            "PROMETHEUS_SCRAPE_INTERVAL": "1s",
            "TRAIN_EVERY": "15s",
            "TRAIN_ARGS": "--no-progress",
            "PRODUCE_ARGS": "--series 20 --values 0 --rate 100 --step-ms 1000 --no-progress",
            "UP_TIMEOUT": "90",
            "DOWN_TIMEOUT": "20",
        }
    )
    created = list(topics.values())
    try:
        # History for the trainer's first run: 20 series x 150 values, one a second (the period of the live
        # producer below: the trained model's period is the history's), ending now.
        start_ms = int(time.time() * 1000) - 150 * 1_000
        history = subprocess.run(
            [
                sys.executable,
                "-m",
                "forecaster",
                "produce",
                "--series",
                "20",
                "--values",
                "150",
                "--start-ms",
                str(start_ms),
                "--step-ms",
                "1000",
                "--no-progress",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert history.returncode == 0, history.stderr
        garbage = produce_garbage(kafka_bootstrap, topics["INPUT"])
        up = subprocess.run(
            [str(ROOT / "deploy" / "local" / "up")],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert up.returncode == 0, f"deploy/local/up failed:\n{up.stdout}\n{up.stderr}"
        pids = {path.stem: int(path.read_text()) for path in run_dir.glob("*.pid")}
        yield {
            "env": env,
            "run_dir": run_dir,
            "topics": topics,
            "pids": pids,
            "up": up,
            "garbage": garbage,
            "prometheus": Prometheus(f"http://127.0.0.1:{ports['prometheus']}"),
            "deadline": time.monotonic() + WAIT_FOR_DATA_SECONDS,
        }
    finally:
        subprocess.run([str(ROOT / "deploy" / "local" / "down")], env=env, timeout=120, check=False)
        kafka_admin.delete(created, 30)


def settle(pipeline, check) -> list[str]:
    """``check()`` until it finds no problem, or its last problems once WAIT_FOR_DATA_SECONDS have passed
    since the pipeline came up (metrics appear as the pieces get going; recorded series a rule later)."""
    while True:
        problems = check()
        if not problems or time.monotonic() > pipeline["deadline"]:
            if problems:
                for piece in ("serve", "train", "produce"):
                    log = pipeline["run_dir"] / f"{piece}.log"
                    print(f"--- {piece}.log (tail)\n" + "\n".join(log.read_text().splitlines()[-15:]))
            return problems
        time.sleep(2.0)


@pytest.fixture(scope="module")
def dashboard_problems(pipeline) -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return settle(pipeline, lambda: check_dashboard(pipeline["prometheus"], dashboard))


@pytest.fixture(scope="module")
def rule_problems(pipeline, dashboard_problems) -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return settle(pipeline, lambda: check_rules(pipeline["prometheus"], rules))


# --- the checks ----------------------------------------------------------------------------------


def test_up_prints_where_to_look(pipeline) -> None:
    out = pipeline["up"].stdout
    env = pipeline["env"]
    for needle in (
        f"http://127.0.0.1:{env['FORECASTER_METRICS__PORT']}/metrics",
        f"http://127.0.0.1:{env['FORECASTER_TRAIN__METRICS_PORT']}/metrics",
        f"http://127.0.0.1:{env['PROMETHEUS_PORT']}",
        str(pipeline["run_dir"]),
        pipeline["topics"]["OUTPUT"],
    ):
        assert needle in out
    alertmanager = {"alertmanager"} if shutil.which("prometheus-alertmanager") else set()
    assert set(pipeline["pids"]) == {"serve", "train", "produce", "prometheus"} | alertmanager
    if alertmanager:
        assert f"http://127.0.0.1:{env['ALERTMANAGER_PORT']}" in out
        # Prometheus finds it (the alerting block of prometheus.local.yml, with the port put in).
        expected = [f"http://127.0.0.1:{env['ALERTMANAGER_PORT']}/api/v2/alerts"]

        def found() -> list[str]:
            answer = pipeline["prometheus"].get("/api/v1/alertmanagers")["data"]["activeAlertmanagers"]
            return [] if [a["url"] for a in answer] == expected else [f"Prometheus sends alerts to {answer}"]

        assert settle(pipeline, found) == []


def test_every_dashboard_query_returns_data(dashboard_problems: list[str]) -> None:
    assert dashboard_problems == []


def test_every_rule_evaluates_on_existing_metrics(pipeline, rule_problems: list[str]) -> None:
    prometheus = pipeline["prometheus"]
    assert rule_problems == []
    # Prometheus evaluates the same rules itself (every second here): none reports an error.
    groups = prometheus.get("/api/v1/rules")["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    expected = {
        r.get("alert") or r.get("record")
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
    }
    assert set(loaded) == expected
    for name, rule in loaded.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"


def test_a_query_on_a_missing_metric_fails_the_check(pipeline, dashboard_problems: list[str]) -> None:
    prometheus = pipeline["prometheus"]
    dashboard = json.loads(DASHBOARD.read_text())
    broken = copy.deepcopy(dashboard)
    template = next(p for p in broken["panels"] if p["type"] == "timeseries")
    missing = {**copy.deepcopy(template), "id": 999, "title": "typo"}
    missing["targets"] = [
        {**template["targets"][0], "expr": "sum(rate(forecaster_forecasts_emited_total[$__rate_interval]))"}
    ]
    broken["panels"].append(missing)
    problems = check_dashboard(prometheus, broken)
    assert any("'typo'" in p and "forecaster_forecasts_emited_total does not exist" in p for p in problems)
    assert any("'typo'" in p and "returns no data" in p for p in problems)
    # A metric that exists but a label value that does not: evaluates, but the panel would be empty.
    empty = copy.deepcopy(missing)
    empty["targets"][0]["expr"] = 'sum(forecaster_consumer_lag{partition="no-such-partition"})'
    assert any(
        "returns no data" in p for p in check_expression(prometheus, "x", empty["targets"][0]["expr"], True)
    )
    # A rule on a missing metric, and one that does not parse.
    rules = {
        "groups": [
            {
                "name": "g",
                "rules": [
                    {"alert": "A", "expr": "forecaster_no_such_metric > 0"},
                    {"alert": "B", "expr": "rate(forecaster_commits_total)"},
                ],
            }
        ]
    }
    problems = check_rules(prometheus, rules)
    assert any("rule A" in p and "forecaster_no_such_metric does not exist" in p for p in problems)
    assert any("rule B" in p and "does not evaluate" in p for p in problems)


def test_the_pipeline_forecasts_dead_letters_and_swaps(pipeline, kafka_admin, dashboard_problems) -> None:
    prometheus = pipeline["prometheus"]

    def value(expr: str) -> float:
        result = prometheus.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    def facts() -> list[str]:
        wanted = {
            "sum(forecaster_forecasts_emitted_total) > 0": value("sum(forecaster_forecasts_emitted_total)")
            > 0,
            "every bad record counted": value("sum(forecaster_records_invalid_total)") == pipeline["garbage"],
            "a swap succeeded": value('sum(forecaster_model_swaps_total{result="ok"})') >= 1,
            "a run published": value('sum(forecaster_trainer_runs_total{result="published"})') >= 1,
            "a trained version serves": value('count(forecaster_model_info{version!="init"})') == 1,
        }
        return [fact for fact, holds in wanted.items() if not holds]

    assert settle(pipeline, facts) == []
    # deploy/topics made the changelog compacted and co-partitioned with the input.
    changelog = pipeline["topics"]["CHANGELOG"]
    described = kafka_admin.describe(list(pipeline["topics"].values()), ["cleanup.policy"], 30)
    assert described[changelog].config["cleanup.policy"] == "compact"
    assert described[changelog].partitions == described[pipeline["topics"]["INPUT"]].partitions == 2


def test_down_leaves_no_process(pipeline, dashboard_problems) -> None:
    pids = pipeline["pids"]
    assert all(alive(pid) for pid in pids.values()), "a piece died while the pipeline ran"
    down = subprocess.run(
        [str(ROOT / "deploy" / "local" / "down")],
        env=pipeline["env"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert down.returncode == 0, down.stderr
    for name, pid in pids.items():
        assert not alive(pid), f"{name} (pid {pid}) still runs"
        assert group_members(pid) == [], f"{name}'s process group still has {group_members(pid)}"
    assert list(pipeline["run_dir"].glob("*.pid")) == []
