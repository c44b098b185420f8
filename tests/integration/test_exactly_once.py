"""Exactly once against the real broker, with real ``forecaster serve`` processes: scaling 1 -> 2 -> 3 -> 1,
zombies fenced, refused changelog records, the changelog topic, shadow promotion (kill -9 at random points,
a broker restart and churn: test_exactly_once_recovery.py; the helpers: exactly_once.py).

Each test streams windowed records, reads the forecasts with ``read_committed`` and checks that every
value has exactly one forecast, equal (1e-5) to the full-sequence forward pass of the same checkpoint over
that series (what an uninterrupted run produces: invariant 1), so any lost, duplicated or wrongly
restored state shows.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter

import numpy as np
import pytest
from exactly_once import (
    SERVED,
    START_MS,
    TINY_MODEL,
    _last_value_model,
    _trial_active,
    changelog_partitions,
    check_exactly_once,
    has_committed_state,
    read_committed,
    send_frame,
    stream,
    windowed_records,
)
from kafka import KafkaProducer

from forecaster.checkpoints.hotswap import fresh_model
from forecaster.checkpoints.store import load_checkpoint, promote, save_checkpoint
from forecaster.config import Settings
from forecaster.engine.engine import reference_forecast
from forecaster.scaling import Scaling
from forecaster.service.clients import COMPACTED
from forecaster.service.exactly_once import changelog
from forecaster.tools.synthetic import generate

pytestmark = pytest.mark.slow


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
    code = first.proc.wait(120)  # generous: on a loaded machine the zombie's next transaction comes late
    first.log.close()
    assert code == 3, first.tail()  # EXIT_FENCED: a zombie stops and says why
    assert "zombie" in first.log_path.read_text()
    producer.join(60)
    forecasts = read_committed(topics.bootstrap, topics.output, len(frame), timeout=60)
    assert second.terminate() == 0
    check_exactly_once(forecasts, frame, loaded.model, loaded.scaling)


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
