"""Exactly once against the real broker, with real ``forecaster serve`` processes: kill -9 at random points,
a broker restart, scaling 1 -> 2 -> 3 -> 1, and refused changelog records.

Each test streams windowed records, reads the forecasts with ``read_committed`` and checks that every
value has exactly one forecast, equal (1e-5) to the full-sequence forward pass of the same checkpoint over
that series (what an uninterrupted run produces: invariant 1), so any lost, duplicated or wrongly
restored state shows.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from forecaster.checkpoints.hotswap import fresh_model
from forecaster.checkpoints.store import load_checkpoint, promote, save_checkpoint
from forecaster.config import KafkaSettings, Settings
from forecaster.engine.choice import Choice
from forecaster.engine.engine import reference_forecast
from forecaster.records import encode_window
from forecaster.scaling import Scaling
from forecaster.service.clients import COMPACTED, wait_for_broker
from forecaster.service.exactly_once import changelog
from forecaster.tools.synthetic import generate

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = {"cell": "gru", "hidden_size": 8, "num_layers": 1, "horizon": 3, "seed": 11}
START_MS = 1_700_000_000_000
WINDOW = 10  # values per input record
FAST = {
    "FORECASTER_SERVICE__SESSION_TIMEOUT_MS": "6000",  # the broker's minimum: a killed member leaves soon
    "FORECASTER_SERVICE__COMMIT_INTERVAL_MS": "200",
    "FORECASTER_STATE__WINDOW": "32",
}
# What these services emit per series: the model's forecast or, per step, the naive one the series picked.
SERVED = {"choice": Choice(), "window": int(FAST["FORECASTER_STATE__WINDOW"])}


# ---- helpers ---------------------------------------------------------------------------------------


def publish_model(root: Path) -> object:
    """A seeded model published as the checkpoint the services load; returns the loaded copy."""
    settings = Settings(model=TINY_MODEL)
    version = save_checkpoint(root, fresh_model(settings), Scaling.from_settings(settings.scaling))
    promote(root, version)
    return load_checkpoint(root)


def windowed_records(frame: pd.DataFrame) -> list[list[tuple[bytes, bytes]]]:
    """Rounds of records: round k holds the k-th window of every series (so a round is a time slice)."""
    rounds: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
    for name, group in frame.groupby("series", sort=False):
        ts, values = group["ts"].tolist(), group["value"].tolist()
        for k, lo in enumerate(range(0, len(ts), WINDOW)):
            rounds[k].append(
                (name.encode(), encode_window(name, ts[lo : lo + WINDOW], values[lo : lo + WINDOW]))
            )
    return [rounds[k] for k in sorted(rounds)]


def stream(bootstrap: str, topic: str, rounds: list, seconds: float) -> threading.Thread:
    """Produce the rounds evenly over ``seconds`` on a thread (acknowledged as it goes)."""

    def run() -> None:
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, retries=10**6)
        for batch in rounds:
            for key, value in batch:
                producer.send(topic, key=key, value=value)
            producer.flush()
            time.sleep(seconds / len(rounds))
        producer.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def read_committed(bootstrap: str, topic: str, count: int, timeout: float) -> list[dict]:
    """Forecast bodies of ``topic`` as a ``read_committed`` consumer sees them: until ``count`` arrived
    and the end offsets are reached (or ``timeout``)."""
    import json

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, isolation_level="read_committed"
    )
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for part in consumer.poll(timeout_ms=500).values():
                out.extend(json.loads(r.value) for r in part)
            if len(out) >= count:
                ends = consumer.end_offsets(tps)
                if all(consumer.position(tp) >= ends[tp] for tp in tps):
                    break
        return out
    finally:
        consumer.close()


def has_committed_state(service) -> bool:
    """Whether ``service`` has committed a transaction with state in the changelog: waited for before a
    test's kills or moves, so that a restore has something to restore even where the input comes late."""
    return service.metrics().get(("forecaster_changelog_records_total", ()), 0) > 0


def check_exactly_once(forecasts: list[dict], frame: pd.DataFrame, model, scaling: Scaling) -> None:
    """One forecast per value, equal to the uninterrupted run (the full forward pass) within 1e-5."""
    per_value = Counter((f["series"], f["ts"]) for f in forecasts)
    expected_keys = set(zip(frame["series"], frame["ts"], strict=True))
    missing = expected_keys - set(per_value)
    duplicated = {k: n for k, n in per_value.items() if n > 1}
    assert not missing, f"{len(missing)} values without a forecast, e.g. {sorted(missing)[:3]}"
    assert not duplicated, (
        f"{len(duplicated)} values with several forecasts, e.g. {list(duplicated.items())[:3]}"
    )
    assert set(per_value) == expected_keys
    by_series: dict[str, list[dict]] = defaultdict(list)
    for f in forecasts:
        by_series[f["series"]].append(f)
    for name, group in frame.groupby("series", sort=False):
        got = sorted(by_series[name], key=lambda f: f["ts"])
        expected = reference_forecast(model, group["value"].to_numpy(), scaling, **SERVED)  # (T, horizon)
        np.testing.assert_allclose(
            np.array([f["forecast"] for f in got]), expected, rtol=1e-5, atol=1e-5, err_msg=name
        )


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


# ---- kill -9 -----------------------------------------------------------------------------------------


def test_kill_9_at_random_points_loses_and_duplicates_nothing(eos, broker):
    topics, loaded, start = eos
    frame = generate(n_series=500, n_values=100, start_ms=START_MS, step_ms=60_000, seed=21)
    rng = random.Random(os.getpid())
    service = start("a")
    producer = stream(topics.bootstrap, topics.input, windowed_records(frame), seconds=25)
    broker.wait_for(lambda: has_committed_state(service), timeout=60, what="a first transaction with state")
    kills = 0
    while kills < 5:
        time.sleep(rng.uniform(0.5, 4.0))  # a random point of the stream and of the commit cycle
        assert service.kill() == -9
        kills += 1
        service = start("a")  # same instance id: its transactional id fences the dead one's transaction
    producer.join(120)
    forecasts = read_committed(topics.bootstrap, topics.output, len(frame), timeout=120)
    samples = service.metrics()
    assert service.terminate() == 0
    check_exactly_once(forecasts, frame, loaded.model, loaded.scaling)
    assert {f["model_version"] for f in forecasts} == {loaded.version}
    assert samples[("forecaster_series_restored_total", (("to", "resident"),))] > 0  # state came back


# ---- a broker restart ------------------------------------------------------------------------------


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


# A broker of its own, stopped and started: the heaviest test.
# Both clients: librdkafka can block past its timeout in send_offsets_to_transaction after a broker
# restart; the confluent client gives such a producer up and the committer replaces it.
@pytest.mark.parametrize("kafka_client", ["kafka-python", "confluent"])
def test_a_broker_restart_mid_stream_loses_and_duplicates_nothing(own_broker, serve, tmp_path, kafka_admin):
    from forecaster.service.clients import TopicSpec, ensure_topics

    address, stop_broker, start_broker = own_broker
    names = {"input": "eos-in", "output": "eos-out", "deadletter": "eos-dl", "changelog": "eos-cl"}
    ensure_topics(
        KafkaSettings(bootstrap_servers=address),
        [TopicSpec(names["input"], 4), TopicSpec(names["output"], 2), TopicSpec(names["deadletter"], 1)],
    )
    loaded = publish_model(tmp_path / "checkpoints")
    frame = generate(n_series=500, n_values=100, start_ms=START_MS, step_ms=60_000, seed=22)
    service = serve(
        FORECASTER_KAFKA__BOOTSTRAP_SERVERS=address,
        **{f"FORECASTER_KAFKA__{k.upper()}_TOPIC": v for k, v in names.items()},
        FORECASTER_SERVICE__INSTANCE_ID="a",
        **FAST,
    ).start()
    producer = stream(address, names["input"], windowed_records(frame), seconds=20)
    time.sleep(6)
    stop_broker()  # mid-stream: the service and the test's producer both wait for it
    time.sleep(3)
    assert service.proc.poll() is None, service.tail()
    start_broker()
    producer.join(180)
    forecasts = read_committed(address, names["output"], len(frame), timeout=150)
    assert service.proc.poll() is None, "the service should have ridden out the broker restart"
    # A clean stop commits what is open; under load right after the restart that once took over 30 s
    # (the commit waits up to service.transaction_timeout_ms), so it gets the transaction timeout.
    assert service.terminate(timeout=90.0) == 0
    check_exactly_once(forecasts, frame, loaded.model, loaded.scaling)


# ---- scale out and in --------------------------------------------------------------------------------


def test_scaling_1_2_3_1_loses_and_duplicates_nothing(eos, broker):
    topics, loaded, start = eos
    frame = generate(n_series=500, n_values=100, start_ms=START_MS, step_ms=60_000, seed=23)
    a = start("a")
    producer = stream(topics.bootstrap, topics.input, windowed_records(frame), seconds=30)
    broker.wait_for(lambda: has_committed_state(a), timeout=60, what="a first transaction with state")
    time.sleep(2)
    b = start("b")  # 1 -> 2: partitions move from a to b
    time.sleep(3)
    c = start("c")  # 2 -> 3
    time.sleep(4)
    assert b.terminate() == 0  # 3 -> 2 -> 1: their partitions come back to a
    assert c.terminate() == 0
    producer.join(120)
    forecasts = read_committed(topics.bootstrap, topics.output, len(frame), timeout=120)
    samples = a.metrics()
    assert a.terminate() == 0
    check_exactly_once(forecasts, frame, loaded.model, loaded.scaling)
    for log_of in (b, c):  # each newcomer restored partitions it took over
        assert "restored partitions [" in log_of.log_path.read_text()
    assert samples[("forecaster_series_restored_total", (("to", "resident"),))] > 0  # a took them back


# ---- zombies ---------------------------------------------------------------------------------------------


def test_a_paused_instance_loses_its_partitions_and_its_late_transaction_is_refused(eos, broker):
    """SIGSTOP past the session timeout: the group moves on without it; when it wakes, its open transaction
    cannot commit (its generation is stale), it aborts, goes back to the last commit and rejoins."""
    topics, loaded, start = eos
    frame = generate(n_series=500, n_values=100, start_ms=START_MS, step_ms=60_000, seed=25)
    a, b = start("a"), start("b")
    producer = stream(topics.bootstrap, topics.input, windowed_records(frame), seconds=25)
    time.sleep(4)
    a.proc.send_signal(signal.SIGSTOP)
    time.sleep(10)  # > session timeout: b takes every partition
    a.proc.send_signal(signal.SIGCONT)
    producer.join(120)
    forecasts = read_committed(topics.bootstrap, topics.output, len(frame), timeout=120)
    assert a.proc.poll() is None and b.proc.poll() is None
    samples = a.metrics()
    assert a.terminate() == 0 and b.terminate() == 0
    check_exactly_once(forecasts, frame, loaded.model, loaded.scaling)
    # a noticed that the group had moved on: its open transaction was refused, or its partitions were lost
    aborted = samples.get(("forecaster_transactions_total", (("result", "aborted"),)), 0)
    assert aborted >= 1 or "lost partitions" in a.log_path.read_text(), a.tail()


def test_a_second_instance_with_the_same_id_fences_the_first_which_exits(eos, broker):
    topics, loaded, start = eos
    frame = generate(n_series=50, n_values=40, start_ms=START_MS, step_ms=60_000, seed=26)
    first = start("same")
    # the stream outlasts the second's start: a zombie learns it is fenced at its next transaction
    producer = stream(topics.bootstrap, topics.input, windowed_records(frame), seconds=20)
    time.sleep(2)
    second = start("same")  # its init_transactions fences the first's producer
    code = first.proc.wait(60)
    first.log.close()
    assert code == 3, first.tail()  # EXIT_FENCED: a zombie stops and says why
    assert "zombie" in first.log_path.read_text()
    producer.join(60)
    forecasts = read_committed(topics.bootstrap, topics.output, len(frame), timeout=60)
    assert second.terminate() == 0
    check_exactly_once(forecasts, frame, loaded.model, loaded.scaling)


# ---- series churn: evicted series on disk --------------------------------------------------------------


def churn_rounds(frame: pd.DataFrame, group_size: int, visits: int) -> list[list[list[tuple[bytes, bytes]]]]:
    """Per visit, its rounds: groups of series take turns, each sending its next windows, so that the
    series of one group are evicted while the others run and come back at the next visit."""
    windows = {
        name: [r for r in windowed_records(group)] for name, group in frame.groupby("series", sort=False)
    }
    names = list(windows)
    groups = [names[i : i + group_size] for i in range(0, len(names), group_size)]
    per_visit = len(next(iter(windows.values()))) // visits
    return [
        [
            [windows[name][visit * per_visit + k][0] for name in group]
            for group in groups
            for k in range(per_visit)
        ]
        for visit in range(visits)
    ]


def test_churned_series_evicted_to_disk_come_back_exactly_across_kill_9(eos, broker, tmp_path):
    """300 series in 10 groups taking turns, at most 40 resident and 20 kB of evicted snapshots in memory:
    most evicted series live on disk, a restart restores them there, and each series comes back with the
    state an uninterrupted run has (one forecast per value, equal to the full forward pass)."""
    topics, loaded, start = eos
    frame = generate(n_series=300, n_values=60, start_ms=START_MS, step_ms=60_000, seed=27)
    first, second = churn_rounds(frame, group_size=30, visits=2)
    budget = 20_000
    env = {
        "FORECASTER_STATE__MAX_SERIES": "40",
        "FORECASTER_STATE__EVICTED_MEMORY_BYTES": str(budget),
        "FORECASTER_STATE__SPILL_DIR": str(tmp_path / "spill"),
    }
    service = start("a", **env)
    stream(topics.bootstrap, topics.input, first, seconds=8).join(60)
    assert (
        len(read_committed(topics.bootstrap, topics.output, len(frame) // 2, timeout=60)) == len(frame) // 2
    )
    before = service.metrics()
    assert before[("forecaster_evicted_series", (("where", "disk"),))] > 200
    assert before[("forecaster_evicted_bytes", (("where", "memory"),))] <= budget
    assert service.kill() == -9
    service = start("a", **env)  # restores 260 evicted series into the store, not into memory
    # most of them: the evictions of the last moments before the kill may not have been committed yet
    assert service.metrics()[("forecaster_series_restored_total", (("to", "evicted"),))] >= 200
    broker.wait_for(
        lambda: service.metrics().get(("forecaster_evicted_series", (("where", "disk"),)), 0) >= 200,
        timeout=10,
        what="the restored evicted series on disk",
    )
    producer = stream(topics.bootstrap, topics.input, second, seconds=12)
    time.sleep(5)
    assert service.kill() == -9  # mid-churn, at any point of a commit
    service = start("a", **env)
    producer.join(120)
    forecasts = read_committed(topics.bootstrap, topics.output, len(frame), timeout=120)
    samples = service.metrics()
    assert service.terminate() == 0
    check_exactly_once(forecasts, frame, loaded.model, loaded.scaling)
    assert samples[("forecaster_evicted_bytes", (("where", "memory"),))] <= budget
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == []  # removed on a clean stop


# ---- refused changelog records -------------------------------------------------------------------------


# Not about the client: run with kafka-python (the kill -9 and scaling tests restore with both).
@pytest.mark.parametrize("kafka_client", ["kafka-python"])
def test_corrupt_and_unknown_version_changelog_records_are_refused_and_those_series_start_fresh(eos, broker):
    topics, loaded, start = eos
    frame = generate(n_series=3, n_values=20, start_ms=START_MS, step_ms=60_000, seed=24)
    first, second = frame[frame["ts"] < START_MS + 10 * 60_000], frame[frame["ts"] >= START_MS + 10 * 60_000]
    service = start("a")
    send_frame(topics, first)
    assert len(read_committed(topics.bootstrap, topics.output, len(first), timeout=30)) == len(first)
    assert service.terminate() == 0
    # The changelog now holds each series' state; overwrite two of them in place (same key and partition).
    where = changelog_partitions(topics.bootstrap, topics.changelog)
    good = where["series-2"][1]
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap)
    corrupt = good[:-9] + bytes(b ^ 0x5A for b in good[-9:])  # a flipped tail: the checksum fails
    producer.send(topics.changelog, key=b"series-0", value=corrupt, partition=where["series-0"][0])
    unknown = changelog.MAGIC + bytes([99, 0]) + good[len(changelog.MAGIC) + 2 :]
    producer.send(topics.changelog, key=b"series-1", value=unknown, partition=where["series-1"][0])
    producer.flush()
    producer.close()

    service = start("a")
    send_frame(topics, second)
    forecasts = read_committed(topics.bootstrap, topics.output, len(frame), timeout=30)
    assert service.proc.poll() is None and service.http("/readyz")[0] == 200  # never a crash
    samples = service.metrics()
    assert samples[("forecaster_changelog_refused_total", (("reason", "corrupt"),))] == 1
    assert samples[("forecaster_changelog_refused_total", (("reason", "unknown_version"),))] == 1
    log_text = service.log_path.read_text()
    assert "series 'series-0'" in log_text and "refused (corrupt)" in log_text
    assert "series 'series-1'" in log_text and "refused (unknown_version)" in log_text
    assert service.terminate() == 0

    model, scaling = loaded.model, loaded.scaling
    later = [f for f in forecasts if f["ts"] >= START_MS + 10 * 60_000]
    for name, group in second.groupby("series"):
        got = np.array(
            [f["forecast"] for f in sorted((f for f in later if f["series"] == name), key=lambda f: f["ts"])]
        )
        if name == "series-2":  # restored: continues its whole history
            values = frame[frame["series"] == name]["value"].to_numpy()
            expected = reference_forecast(model, values, scaling, **SERVED)[10:]
        else:  # refused: started fresh from the values after the restart
            expected = reference_forecast(model, group["value"].to_numpy(), scaling, **SERVED)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=name)


def send_frame(topics, frame: pd.DataFrame) -> None:
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap)
    for batch in windowed_records(frame):
        for key, value in batch:
            producer.send(topics.input, key=key, value=value)
    producer.flush()
    producer.close()


def changelog_partitions(bootstrap: str, topic: str) -> dict[str, tuple[int, bytes]]:
    """The latest committed changelog record per series: (partition, value)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, isolation_level="read_committed")
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        latest: dict[str, tuple[int, bytes]] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(consumer.position(tp) < ends[tp] for tp in tps):
            for tp, records in consumer.poll(timeout_ms=200).items():
                latest.update((r.key.decode(), (tp.partition, r.value)) for r in records)
        return latest
    finally:
        consumer.close()


# ---- the changelog topic -------------------------------------------------------------------------------


def test_the_changelog_is_created_compacted_and_co_partitioned_or_refused_clearly(
    topic_factory, kafka_admin, kafka_settings
):
    from forecaster.errors import KafkaSetupError

    source = topic_factory(partitions=4, prefix="in")
    kafka_settings.changelog_topic = f"cl-created-{uuid.uuid4().hex[:8]}"
    try:
        assert changelog.ensure_changelog(kafka_settings, source) == 4
        name = kafka_settings.changelog_topic
        described = kafka_admin.describe([name], ["cleanup.policy"], 30)[name]
        assert described.partitions == 4 and described.config["cleanup.policy"] == "compact"
        assert changelog.ensure_changelog(kafka_settings, source) == 4  # exists and fits: fine
    finally:
        kafka_admin.delete([kafka_settings.changelog_topic], 30)
    kafka_settings.changelog_topic = topic_factory(partitions=3, config=COMPACTED, prefix="cl")
    with pytest.raises(KafkaSetupError, match="3 partitions, expected 4"):
        changelog.ensure_changelog(kafka_settings, source)
    kafka_settings.changelog_topic = topic_factory(partitions=4, prefix="cl")  # not compacted
    with pytest.raises(KafkaSetupError, match="cleanup.policy=delete, expected compact"):
        changelog.ensure_changelog(kafka_settings, source)
    kafka_settings.changelog_topic = f"cl-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(KafkaSetupError, match="does not exist"):
        changelog.ensure_changelog(kafka_settings, source, create=False)


# ---- shadow promotion --------------------------------------------------------------------------------


def _last_value_model(loaded) -> object:
    """A challenger of the champion's shape that forecasts the last value (untrained over a season-1
    baseline): on these series plainly better than the untrained champion, at every step."""
    from forecaster.model import ForecasterConfig, build_model

    config = ForecasterConfig(**{**loaded.model.config.model_dump(), "season": 1, "base_seasons": 1})
    return build_model(config, seed=1)


def _trial_active(service) -> bool:
    return any(
        name == "forecaster_shadow_active" and value == 1 for (name, _), value in service.metrics().items()
    )


@pytest.mark.parametrize("kafka_client", ["confluent"])
def test_shadow_promotes_a_better_challenger_and_a_kill_9_in_the_trial_changes_no_forecast(
    eos, broker, tmp_path
):
    """Shadow promotion, exactly once: the trial starts, the instance is killed -9 mid-trial, the new one
    tries the candidate again from its restored state and promotes it. Every value has one forecast; those
    of the champion's version equal its full pass (the trial changed nothing), and the candidate serves
    after its promotion, which its manifest records."""
    from forecaster.checkpoints.promotion import decision_of, propose
    from forecaster.checkpoints.store import latest_version

    topics, loaded, start = eos
    root = tmp_path / "checkpoints"
    challenger = save_checkpoint(root, _last_value_model(loaded), loaded.scaling)
    propose(root, challenger)
    frame = generate(n_series=60, n_values=120, start_ms=START_MS, step_ms=60_000, seed=31)
    rounds = windowed_records(frame)
    shadow = {
        "FORECASTER_CHECKPOINTS__PROMOTION": "shadow",
        "FORECASTER_SERVICE__CHECKPOINT_POLL_SECONDS": "0.2",
        # The trial compares forecasts as served: with the per-series choice on, the champion here (a
        # random model) would serve the last value wherever it loses to it, as the challenger does, and
        # there would be nothing to promote. tests/unit/test_shadow.py covers the trial with the choice.
        "FORECASTER_CHOICE__ENABLED": "false",
    }
    never = {f"FORECASTER_CHECKPOINTS__SHADOW_{k}_VALUES": "1000000000" for k in ("MIN", "MAX")}
    service = start("a", **shadow, **never)  # a trial that never decides
    third = len(rounds) // 3
    producer = stream(topics.bootstrap, topics.input, rounds[:third], seconds=4)
    broker.wait_for(lambda: _trial_active(service), timeout=30, what="the shadow trial")
    time.sleep(2)
    assert latest_version(root) == loaded.version  # on trial, not serving
    assert service.kill() == -9
    producer.join(60)
    service = start("a", **shadow, FORECASTER_CHECKPOINTS__SHADOW_MIN_VALUES="300")
    stream(topics.bootstrap, topics.input, rounds[third : 2 * third], seconds=3).join(60)
    broker.wait_for(lambda: latest_version(root) == challenger, timeout=60, what="the promotion")
    serving = ("forecaster_model_info", (("cell", "gru"), ("version", challenger)))
    broker.wait_for(lambda: service.metrics().get(serving) == 1, timeout=30, what="the swap to the winner")
    stream(topics.bootstrap, topics.input, rounds[2 * third :], seconds=2).join(60)
    forecasts = read_committed(topics.bootstrap, topics.output, len(frame), timeout=90)
    samples = service.metrics()
    assert service.terminate() == 0
    keys = Counter((f["series"], f["ts"]) for f in forecasts)
    assert set(keys) == set(zip(frame["series"], frame["ts"], strict=True)) and max(keys.values()) == 1
    by_version = Counter(f["model_version"] for f in forecasts)
    assert set(by_version) == {loaded.version, challenger}, by_version  # the champion's, then the winner's
    champion_only = frame.assign(key=list(zip(frame["series"], frame["ts"], strict=True)))
    made = {(f["series"], f["ts"]): f for f in forecasts}
    for name, group in champion_only.groupby("series", sort=False):
        expected = reference_forecast(loaded.model, group["value"].to_numpy(), loaded.scaling)
        for row, key in enumerate(group["key"]):
            if made[key]["model_version"] == loaded.version:
                np.testing.assert_allclose(
                    made[key]["forecast"], expected[row], rtol=1e-5, atol=1e-5, err_msg=name
                )
    decision = decision_of(root, challenger)
    assert (
        decision["decision"] == "promoted"
        and decision["by"] == "shadow"
        and decision["champion"] == loaded.version
    )
    assert all(step["z"] > 3 and step["count"] >= 300 for step in decision["detail"]["steps"])
    assert samples[("forecaster_promotions_total", (("by", "shadow"), ("decision", "promoted")))] == 1


@pytest.mark.parametrize("kafka_client", ["kafka-python"])
def test_shadow_rejects_a_worse_challenger_and_the_champion_keeps_serving(eos, broker, tmp_path):
    from forecaster.checkpoints.promotion import candidate_version, decision_of, propose
    from forecaster.checkpoints.store import latest_version

    topics, _, start = eos
    root = tmp_path / "checkpoints"
    champion_model = _last_value_model(load_checkpoint(root))
    champion = save_checkpoint(root, champion_model, Scaling.from_settings(Settings().scaling))
    promote(root, champion)
    loaded = load_checkpoint(root)
    worse = save_checkpoint(root, fresh_model(Settings(model=TINY_MODEL)), loaded.scaling)
    frame = generate(n_series=40, n_values=80, start_ms=START_MS, step_ms=60_000, seed=32)
    service = start(
        "a",
        FORECASTER_SERVICE__PROCESSING_GUARANTEE="at_least_once",
        FORECASTER_CHECKPOINTS__PROMOTION="shadow",
        FORECASTER_CHECKPOINTS__SHADOW_MIN_VALUES="100",
        FORECASTER_CHECKPOINTS__SHADOW_MAX_VALUES="600",
        FORECASTER_SERVICE__CHECKPOINT_POLL_SECONDS="0.2",
    )
    propose(root, worse)
    broker.wait_for(lambda: _trial_active(service), timeout=30, what="the shadow trial")
    stream(topics.bootstrap, topics.input, windowed_records(frame), seconds=3).join(60)
    broker.wait_for(lambda: decision_of(root, worse) is not None, timeout=60, what="the decision")
    forecasts = read_committed(topics.bootstrap, topics.output, len(frame), timeout=60)
    samples = service.metrics()
    assert service.terminate() == 0
    assert decision_of(root, worse)["decision"] == "rejected" and candidate_version(root) is None
    assert latest_version(root) == champion
    assert {f["model_version"] for f in forecasts} == {champion}
    assert samples[("forecaster_promotions_total", (("by", "shadow"), ("decision", "rejected")))] == 1
    assert not _trial_active(service) if service.proc.poll() is None else True
