"""The deployment files hold together: compose parses and runs commands the CLI accepts, every setting is
reachable, the Prometheus configs and rules pass promtool, the dashboard is well formed, the scripts parse.

Nothing here needs a broker or a container engine (the compose client only parses; there is no engine).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from forecaster.cli import build_parser
from forecaster.config import MetricsSettings, Settings, TrainSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "forecaster.json"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "forecaster.yaml"
FORECASTER_IMAGE = "${FORECASTER_IMAGE:-forecaster:latest}"
REQUIRED_ALERTS = {
    "ForecasterNoForecasts",
    "ForecasterConsumerLagGrowing",
    "ForecasterDeadLetterRateHigh",
    "ForecasterOnlineErrorWorseThanPrevious",
    "ForecasterTrainerNotSucceeding",
    "ForecasterModelSwapRefused",
    "ForecasterLatencyOverGoal",
    "ForecasterValuesClipped",
}


# --- helpers ---------------------------------------------------------------------------------------


def compose_client() -> list[str] | None:
    """`docker compose` (the v2 plugin) or the standalone `docker-compose`, whichever is installed."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's ``${VAR}`` / ``${VAR:-default}`` interpolation, applied to every string of a structure."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def compose_file(env: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})


def setting_variables() -> list[str]:
    """Every environment variable that sets a field of ``Settings``."""
    names = []
    for section, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, BaseModel):
            names += [f"FORECASTER_{section.upper()}__{sub.upper()}" for sub in type(default).model_fields]
        else:
            names.append(f"FORECASTER_{section.upper()}")
    return names


def env_example() -> dict[str, str]:
    """The variables .env.example names, commented (a default) or not; values without inline comments."""
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(\S*)", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def load_topics_script():
    loader = importlib.machinery.SourceFileLoader("deploy_topics", str(ROOT / "deploy" / "topics"))
    spec = importlib.util.spec_from_loader("deploy_topics", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target, rows' nested panels included."""
    queries = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            queries.append((panel.get("title", ""), target.get("expr", "")))
    return queries


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels += panel.get("panels", [])
    return panels


# --- docker compose ------------------------------------------------------------------------------


@pytest.mark.parametrize("env_file", [None, ENV_EXAMPLE], ids=["defaults", "env-example"])
@pytest.mark.parametrize("overlay", [None, COMPOSE_GPU], ids=["cpu", "gpu-overlay"])
def test_compose_config_parses(env_file: Path | None, overlay: Path | None, tmp_path: Path) -> None:
    client = compose_client()
    if client is None:
        pytest.skip("no compose client: install the docker compose plugin or Debian's docker-compose")
    # A copy of the files in a clean folder: a developer's own .env must not decide the outcome.
    files = [COMPOSE] + ([overlay] if overlay else [])
    for path in [*files, ENV_EXAMPLE]:
        shutil.copy(path, tmp_path / path.name)
    if env_file is not None:
        shutil.copy(env_file, tmp_path / ".env")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORECASTER_", "COMPOSE_", "ENV_FILE"))}
    result = subprocess.run(
        [*client, *(a for path in files for a in ("-f", str(tmp_path / path.name))), "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    # The env file reached the forecaster services (.env when there is one, else .env.example).
    assert services["forecaster"]["environment"]["FORECASTER_KAFKA__PARTITIONS"] == "6"
    assert services["forecaster"]["environment"]["FORECASTER_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:19092"
    if overlay is not None:  # the GPU service is the forecaster service itself, not one beside it
        assert services["forecaster"]["environment"]["FORECASTER_STATE__DEVICE"] == "cuda"
        assert services["forecaster"]["image"] == "forecaster:gpu"
        assert services["trainer"]["image"] == "forecaster:latest"
    assert not any("gpu" in name for name in services)


def test_compose_services_and_dependencies() -> None:
    services = compose_file()["services"]
    assert {"kafka", "topics", "forecaster", "trainer", "producer", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert condition["condition"] in ("service_healthy", "service_completed_successfully")
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}'s health"
    for name in ("forecaster", "trainer", "producer"):
        assert services[name]["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert services[name]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        assert "checkpoints:/checkpoints" in services[name]["volumes"]
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    assert set(gpu) == {"forecaster"}  # an overlay of the service, so the CPU one does not run beside it
    assert gpu["forecaster"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["alertmanager"]["profiles"] == ["alerts"]


def test_compose_is_written_as_people_write_it() -> None:
    """One build block (an anchor), settings from an env file, readiness and Grafana health checked, no topic
    auto-creation in the broker."""
    text = COMPOSE.read_text()
    assert text.count("dockerfile:") == 1 and "build: *build" in text
    services = compose_file()["services"]
    raw = yaml.safe_load(text)
    assert raw["x-forecaster"]["env_file"] == "${ENV_FILE:-.env.example}"
    for name in ("topics", "forecaster", "trainer", "producer"):
        assert services[name]["build"] == interpolate(raw["x-build"], {}), name
        assert services[name]["env_file"] == ".env.example", name  # interpolated without an ENV_FILE
    assert env_example()["ENV_FILE"] == ".env"  # once copied to .env, it names itself
    assert "/readyz" in " ".join(services["forecaster"]["healthcheck"]["test"])
    assert "/api/health" in " ".join(services["grafana"]["healthcheck"]["test"])
    assert services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert services["topics"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}


def test_compose_kafka_is_a_single_kraft_node() -> None:
    kafka = compose_file()["services"]["kafka"]
    env = kafka["environment"]
    assert kafka["image"].startswith("apache/kafka:4.")
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env[key] == "1", key
    # The compose network's listener is the one the forecaster services use.
    listeners = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    bootstrap = compose_file()["x-forecaster"]["environment"]["FORECASTER_KAFKA__BOOTSTRAP_SERVERS"]
    assert listeners["PLAINTEXT"] == bootstrap
    assert listeners["PLAINTEXT_HOST"].endswith(":9092")
    assert "kafka-data:/var/lib/kafka/data" in kafka["volumes"]
    assert env["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"


def forecaster_commands() -> dict[str, list[str]]:
    """Service name -> argv after `forecaster`, for every service that runs the forecaster CLI."""
    commands = {}
    for name, service in compose_file()["services"].items():
        if service.get("image") == "forecaster:latest" and "entrypoint" not in service:
            commands[name] = [str(arg) for arg in service["command"]]
    return commands


def test_compose_commands_match_the_cli() -> None:
    commands = forecaster_commands()
    assert {"forecaster", "trainer", "producer"} <= set(commands)
    assert commands["forecaster"][0] == "serve"
    assert commands["trainer"][:2] == ["train", "--every"]
    assert commands["producer"][0] == "produce"
    parser = build_parser()
    for name, argv in commands.items():
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"compose service {name}: `forecaster {' '.join(argv)}` is refused by the CLI")
        assert args.command == argv[0]
    # Each subcommand's --help, in a fresh interpreter, as the container runs it.
    for sub in sorted({argv[0] for argv in commands.values()}):
        result = subprocess.run(
            [sys.executable, "-m", "forecaster", sub, "--help"], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        for option in {a for argv in commands.values() if argv[0] == sub for a in argv if a.startswith("--")}:
            assert option in result.stdout, f"`forecaster {sub} --help` does not list {option}"


def test_compose_topics_service_runs_the_topic_script() -> None:
    topics = compose_file()["services"]["topics"]
    assert topics["entrypoint"] == ["forecaster-topics"]
    assert "COPY deploy/topics /usr/local/bin/forecaster-topics" in DOCKERFILE.read_text()
    assert os.access(ROOT / "deploy" / "topics", os.X_OK), (
        "deploy/topics must be executable (COPY keeps the mode)"
    )
    args = load_topics_script().parse_args([str(a) for a in topics["command"]])
    assert args.wait == 120


def test_topic_script_specs_follow_the_settings() -> None:
    topics = load_topics_script()
    settings = Settings(kafka={"partitions": 4, "input_topic": "in", "changelog_topic": "log"})
    specs = {
        spec.name: spec
        for spec in topics.topic_specs(settings, topics.parse_args(["--deadletter-partitions", "2"]))
    }
    assert specs["in"].partitions == specs["log"].partitions == 4
    assert specs["log"].config == {"cleanup.policy": "compact"}
    assert specs[settings.kafka.output_topic].partitions == 4
    assert specs[settings.kafka.deadletter_topic].partitions == 2
    assert not specs["in"].config


def test_every_setting_is_in_env_example() -> None:
    """.env.example is the env file of the compose services: every setting is in it (commented: the default)."""
    documented = env_example()
    for variable in setting_variables():
        assert variable in documented, f"{variable} is missing from .env.example"
    # Every compose-level variable the compose files interpolate is documented too.
    used = set(_VARIABLE.findall(COMPOSE.read_text() + COMPOSE_GPU.read_text()))
    for variable, _default in used:
        assert variable in documented, f"{variable} (docker-compose.yml) is missing from .env.example"


def test_env_example_values_are_valid_settings() -> None:
    values = {k: v for k, v in env_example().items() if k.startswith("FORECASTER_") and v}
    values.pop("FORECASTER_CHECKPOINTS__DIR", None)  # a path that need not exist here
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORECASTER_")} | values
    result = subprocess.run(
        [sys.executable, "-m", "forecaster", "config"], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_dockerfile_builds_one_non_root_image_with_a_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'VOLUME ["/checkpoints"]' in text
    assert "FORECASTER_CHECKPOINTS__DIR=/checkpoints" in text
    assert re.search(r"^HEALTHCHECK .*\n.*/healthz", text, re.M)
    assert 'ENTRYPOINT ["forecaster"]' in text
    # Everything the image copies is in the build context (.dockerignore keeps it).
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
            assert path not in ignored, f"{path} is copied but .dockerignore leaves it out"


# --- Prometheus ----------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; .ci/run installs it)")
    return path


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.local.yml"])
def test_promtool_check_config(config: str) -> None:
    result = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS / config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(PROMETHEUS / "rules.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_on_their_situations() -> None:
    """deploy/prometheus/rules.test.yml: each alert fires on its case and stays quiet on the near miss."""
    result = subprocess.run(
        [promtool(), "test", "rules", str(PROMETHEUS / "rules.test.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    rules = [r for g in yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"] for r in g["rules"]]
    tested = (PROMETHEUS / "rules.test.yml").read_text()
    for rule in rules:
        if "alert" in rule:
            assert f'alertname="{rule["alert"]}"' in tested, f"{rule['alert']} has no case in rules.test.yml"


def test_alerts_are_complete() -> None:
    rules = [r for g in yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"] for r in g["rules"]]
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    assert set(alerts) >= REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert "for" in rule, name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    assert "0.025" in alerts["ForecasterLatencyOverGoal"]["expr"]


def test_scrape_configs_point_at_the_metrics_ports() -> None:
    compose = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    local = yaml.safe_load((PROMETHEUS / "prometheus.local.yml").read_text())
    serve_port, train_port = MetricsSettings().port, TrainSettings().metrics_port
    jobs = {job["job_name"]: job for job in compose["scrape_configs"]}
    assert jobs["forecaster"]["dns_sd_configs"][0] == {
        "names": ["forecaster"],
        "type": "A",
        "port": serve_port,
        "refresh_interval": "15s",
    }
    assert jobs["forecaster-trainer"]["static_configs"][0]["targets"] == [f"trainer:{train_port}"]
    services = compose_file()["services"]
    assert services["forecaster"]["environment"]["FORECASTER_METRICS__PORT"] == str(serve_port)
    assert services["trainer"]["environment"]["FORECASTER_TRAIN__METRICS_PORT"] == str(train_port)
    jobs = {job["job_name"]: job for job in local["scrape_configs"]}
    assert jobs["forecaster"]["static_configs"][0]["targets"] == [f"127.0.0.1:{serve_port}"]
    assert jobs["forecaster-trainer"]["static_configs"][0]["targets"] == [f"127.0.0.1:{train_port}"]
    assert compose["rule_files"] == local["rule_files"] == ["rules.yml"]
    # Compose mounts the folder that holds both files.
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]


# --- Grafana -------------------------------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource_uid = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]["uid"]
    assert dashboard["uid"] == "forecaster-overview"
    panels = all_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource_uid, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty query"
            assert target["datasource"]["uid"] == datasource_uid, panel["title"]
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"]["uid"] == datasource_uid, annotation["name"]
    # No two panels overlap on the grid.
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        box = panel["gridPos"]
        mine = {
            (x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])
        }
        assert box["x"] + box["w"] <= 24, panel["title"]
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine


def test_dashboard_covers_what_an_operator_reads() -> None:
    exprs = " ".join(expr for _title, expr in dashboard_queries(json.loads(DASHBOARD.read_text())))
    for metric in (
        "forecaster_records_consumed_total",
        "forecaster_forecasts_emitted_total",
        "forecaster_consumer_lag",
        "forecaster_end_to_end_latency_seconds_bucket",
        "forecaster_step_seconds_bucket",
        "forecaster_batch_size_bucket",
        "forecaster_forecast_abs_error_sum",
        "forecaster_series_resident",
        "forecaster_state_bytes",
        "forecaster_records_invalid_total",
        "forecaster_trainer_loss",
        "forecaster_trainer_last_success_timestamp_seconds",
        "forecaster_model_info",
    ):
        assert metric in exprs, metric
    assert "by (model_version)" in exprs
    annotations = json.loads(DASHBOARD.read_text())["annotations"]["list"]
    assert any("forecaster_model_info" in a.get("expr", "") for a in annotations), "no swap annotation"


def test_grafana_provisioning_matches_compose() -> None:
    provider = yaml.safe_load(PROVIDER.read_text())["providers"][0]
    grafana = compose_file()["services"]["grafana"]
    assert provider["type"] == "file"
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert (
        "GRAFANA_ADMIN_PASSWORD"
        in yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]["environment"][
            "GF_SECURITY_ADMIN_PASSWORD"
        ]
    )
    assert (
        env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{provider['options']['path']}/forecaster.json"
    )


# --- the local pipeline scripts ------------------------------------------------------------------


@pytest.mark.parametrize("script", ["deploy/local/up", "deploy/local/down", "deploy/local/common.sh"])
def test_local_scripts_parse(script: str) -> None:
    path = ROOT / script
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    if not script.endswith(".sh"):
        assert os.access(path, os.X_OK), f"{script} is not executable"


def test_local_up_defaults_are_valid_commands() -> None:
    """The producer arguments and the trainer period deploy/local/up uses when none are given."""
    from forecaster.train.periodic import parse_duration

    text = (ROOT / "deploy" / "local" / "up").read_text()
    produce = re.search(r'^default_produce_args="([^"]*)"$', text, re.M).group(1).split()
    every = re.search(r'^train_every="\$\{TRAIN_EVERY:-([^}]*)\}"$', text, re.M).group(1)
    try:
        build_parser().parse_args(["produce", *produce])
        build_parser().parse_args(["train", "--every", every])
    except SystemExit:
        pytest.fail(f"deploy/local/up's defaults are refused by the CLI: produce {produce}, --every {every}")
    assert parse_duration(every) > 0
    assert "--values" in produce and produce[produce.index("--values") + 1] == "0", (
        "the demo producer must not stop"
    )


def test_makefile_targets_call_the_scripts() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for target, script in (("up", "deploy/local/up"), ("down", "deploy/local/down"), ("test", "pytest")):
        result = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        assert script in result.stdout, f"make {target} does not run {script}"


# --- the README's commands -----------------------------------------------------------------------


def readme_block(heading: str) -> list[str]:
    """The command lines of the first bash block under ``## heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    (command,) = readme_block("Test it")
    match = re.search(r"^TEST_COMMAND=\((.*)\)$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert match and match.group(1) == command


def test_the_test_command_installs_what_the_tests_need_first() -> None:
    """`make test` after the run command on a fresh clone: pytest is installed by the command itself."""
    assert readme_block("Test it") == ["make test"]
    assert readme_block("Run it")[0].startswith("pip install -e . && make up")
    result = subprocess.run(
        ["make", "-n", "test", "PYTHON=python3"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    install = next(i for i, line in enumerate(lines) if "pip install" in line)
    assert "-e '.[dev,notebooks]'" in lines[install]
    assert any("-m pytest" in line for line in lines[install + 1 :])
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert any(requirement.startswith("pytest") for requirement in dev)


# --- the image's versions and the alert route -------------------------------------------------------


def test_the_image_installs_pinned_versions_of_every_runtime_dependency() -> None:
    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()
        assert name in pins, f"{requirement} has no pinned version in deploy/constraints.txt"
    text = DOCKERFILE.read_text()
    installs = re.findall(r"^\s*(?:RUN )?pip install [^;\n]*", text, re.M)
    assert installs and all("-c /opt/constraints.txt" in command for command in installs), installs
    assert "COPY deploy/constraints.txt /opt/constraints.txt" in text


def test_alertmanager_config_routes_critical_and_warning_to_the_webhook() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    assert config["route"]["receiver"] == "log" and set(receivers["log"]) == {"name"}
    (route,) = config["route"]["routes"]
    assert route["receiver"] == "webhook" and route["matchers"] == ['severity=~"critical|warning"']
    assert receivers["webhook"]["webhook_configs"][0]["url"] == "http://127.0.0.1:5001/alerts"
    if amtool := shutil.which("amtool"):
        result = subprocess.run(
            [amtool, "check-config", str(ROOT / "deploy" / "alertmanager" / "alertmanager.yml")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    prometheus = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert prometheus["alerting"]["alertmanagers"][0]["dns_sd_configs"][0]["names"] == ["alertmanager"]
    services = compose_file()["services"]
    assert "./deploy/alertmanager:/etc/alertmanager:ro" in services["alertmanager"]["volumes"]
