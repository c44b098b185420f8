"""``forecaster serve`` against the real broker, as a real process: forecasts, dead letters, restarts, metrics."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, defaultdict

import numpy as np
import pandas as pd
from streams import AT_LEAST_ONCE, START_MS, records_of

from forecaster.checkpoints.hotswap import fresh_model
from forecaster.engine.choice import Choice
from forecaster.engine.engine import reference_forecast
from forecaster.engine.intervals import Intervals, reference_intervals
from forecaster.metrics import kafka_partition
from forecaster.records import REASONS
from forecaster.scaling import Scaling
from forecaster.tools.synthetic import generate

NEVER_COMMIT = {
    "FORECASTER_SERVICE__COMMIT_INTERVAL_MS": str(10**9),
    "FORECASTER_SERVICE__COMMIT_RECORDS": str(10**9),
}
CHOICE = Choice()  # the service's default per-series choice
FAST_REJOIN = {"FORECASTER_SERVICE__SESSION_TIMEOUT_MS": "6000"}
# The restart tests below are about the at-least-once mode (exactly once: tests/integration/test_exactly_once.py).


def forecasts_by_series(records) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for record in records:
        body = record.json()
        assert record.key == body["series"].encode()
        out[body["series"]].append(body)
    return out


def test_end_to_end_forecasts_equal_the_reference(topics, serve, broker):
    frame = generate(n_series=12, n_values=30, start_ms=START_MS, step_ms=60_000, seed=3)
    windowed = {f"series-{i}" for i in range(0, 12, 3)}
    service = serve().start()
    n_records = broker.send(topics.input, records_of(frame, windowed))

    forecasts = broker.read(topics.output, count=len(frame), timeout=30)
    assert len(forecasts) == len(frame)
    time.sleep(0.5)  # nothing more arrives: exactly one forecast per value
    assert len(broker.read(topics.output)) == len(frame)

    settings = topics.settings()
    model, scaling = fresh_model(settings), Scaling.from_settings(settings.scaling)
    inputs = {(r.partition, r.offset): r.json() for r in broker.read(topics.input, count=n_records)}
    for name, bodies in forecasts_by_series(forecasts).items():
        expected_frame = frame[frame["series"] == name]
        bodies.sort(key=lambda b: b["ts"])
        assert [b["ts"] for b in bodies] == expected_frame["ts"].tolist()
        assert {b["model_version"] for b in bodies} == {"init"}
        expected = reference_forecast(  # (T, horizon), each step the model's or its naive pick
            model, expected_frame["value"].to_numpy(), scaling, CHOICE, settings.state.window
        )
        np.testing.assert_allclose(np.array([b["forecast"] for b in bodies]), expected, rtol=1e-6, atol=1e-5)
        # the intervals are those of the calibrator over this series alone, fed the forecasts emitted
        emitted = np.array([b["forecast"] for b in bodies], dtype=np.float32)
        lower, upper = reference_intervals(emitted, expected_frame["value"].to_numpy(), Intervals(), scaling)
        for side, bounds in (("lower", lower), ("upper", upper)):
            got = np.array([[b[side][level] for level in ("80", "95")] for b in bodies], float)  # (T, L, H)
            np.testing.assert_allclose(got, bounds, rtol=1e-5, atol=1e-5)
        for body in bodies:  # the input coordinates point at the record holding that value
            source = inputs[(body["input"]["partition"], body["input"]["offset"])]
            assert source["series"] == name
            if name in windowed:
                assert source["ts"][body["index"]] == body["ts"]
            else:
                assert "index" not in body and source["ts"] == body["ts"]
    assert service.terminate() == 0


# One malformed record per reason (keys: None unless the case is about the key).
BAD = [
    (None, b"\xff\xfe\x00garbage", "not_utf8"),
    (None, b"{this is not json", "not_json"),
    (None, b'{"series": "x", "series": "y", "ts": 1, "value": 1}', "duplicate_key"),
    (None, b"[1, 2, 3]", "not_object"),
    (None, b'{"schema": 99, "series": "x", "ts": 1, "value": 1}', "unknown_schema"),
    (None, b'{"series": "x", "ts": 1, "value": 1, "colour": "red"}', "unknown_field"),
    (None, b'{"ts": 1700000000000, "value": 1}', "missing_series"),
    (None, b'{"series": 42, "ts": 1, "value": 1}', "bad_series"),
    (None, json.dumps({"series": "x" * 300, "ts": 1, "value": 1}).encode(), "series_too_long"),
    (b"other", b'{"series": "x", "ts": 1, "value": 1}', "key_mismatch"),
    (None, b'{"series": "x", "ts": 1}', "missing_value"),
    (None, b'{"series": "x", "ts": 1, "value": "twelve"}', "bad_value"),
    (None, b'{"series": "x", "ts": 1, "value": NaN}', "non_finite"),
    (None, b'{"series": "x", "ts": "last tuesday", "value": 1}', "bad_ts"),
    (None, b'{"series": "x", "ts": 99999999999999999, "value": 1}', "ts_out_of_range"),
    (None, b'{"series": "x", "ts": [1, 2, 3], "values": [1, 2]}', "length_mismatch"),
    (
        None,
        json.dumps({"series": "x", "ts": list(range(1, 20_002)), "values": [1.0] * 20_001}).encode(),
        "window_too_large",
    ),
    (None, b'{"series": "x", "ts": [], "values": []}', "empty_window"),
    (None, b'{"series": "x", "ts": 1700000000000, "value": -4}', "not_positive"),  # under log scaling
    (None, b'{"series": "x", "ts": 1700000000000, "value": 1e300}', "out_of_range"),
]


def test_every_bad_record_is_dead_lettered_and_good_ones_are_unaffected(topics, serve, broker):
    assert {reason for _, _, reason in BAD} == set(REASONS)
    frame = generate(n_series=4, n_values=10, start_ms=START_MS, seed=5)
    good = records_of(frame, windowed={"series-1"}, window=3)
    mixed = []  # a bad record after every good one, the same batches hold both
    for i, record in enumerate(good):
        mixed.append(record)
        if i < len(BAD):
            mixed.append(BAD[i][:2])
    mixed += [b[:2] for b in BAD[len(good) :]]
    service = serve(
        FORECASTER_SCALING__KIND="log"
    ).start()  # every reason reachable; the synthetic values are > 0
    broker.send(topics.input, mixed)

    dead = broker.read(topics.deadletter, count=len(BAD), timeout=30)
    forecasts = broker.read(topics.output, count=len(frame), timeout=30)
    expected_reason = {raw: reason for _, raw, reason in BAD}
    assert len(dead) == len(BAD)
    for record in dead:
        body = record.json()
        raw = base64.b64decode(body["raw"])
        assert body["reason"] == expected_reason[raw], body["detail"]
        assert body["topic"] == topics.input and body["detail"]
        assert record.key == next(key for key, value, _ in BAD if value == raw)
    assert sorted(body["reason"] for body in (r.json() for r in dead)) == sorted(REASONS)

    assert len(forecasts) == len(frame)
    got = {(b["series"], b["ts"]) for b in (r.json() for r in forecasts)}
    assert got == set(zip(frame["series"], frame["ts"], strict=True))
    assert service.http("/readyz")[0] == 200  # still up and serving
    samples = service.metrics()
    for reason in REASONS:
        assert samples[("forecaster_records_invalid_total", (("reason", reason),))] == 1
    assert service.terminate() == 0


def produce_slowly(topics, broker, records, pause: float = 0.002) -> threading.Thread:
    def run() -> None:
        for lo in range(0, len(records), 20):
            broker.send(topics.input, records[lo : lo + 20])
            time.sleep(pause * 20)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def stream_and_stop(topics, serve, broker, stop: str) -> tuple[list, pd.DataFrame, int]:
    """Stream values, stop the service mid-stream (``terminate`` or ``kill``), restart it, let it finish.

    Offsets are committed only on a stop or a rebalance (commit interval and count set out of reach), so
    what a kill -9 leaves to replay is known: the first run's forecasts of records at or past the offsets
    committed when it died. Returns (all forecasts, the values, how many forecasts must be replays).
    """
    frame = generate(n_series=10, n_values=60, start_ms=START_MS, seed=7)
    records = records_of(frame)
    first = serve(**NEVER_COMMIT, **FAST_REJOIN, **AT_LEAST_ONCE).start()
    producer = produce_slowly(topics, broker, records, pause=0.01)  # outlasts the first forecasts
    broker.wait_for(lambda: len(broker.read(topics.output, timeout=5)) >= 100, what="first forecasts")
    code = first.terminate() if stop == "terminate" else first.kill()
    assert producer.is_alive(), "the stream should still be running when the service stops"
    assert code == (0 if stop == "terminate" else -9), first.tail()
    committed = broker.committed(topics.input, topics.group)
    first_run = [r.json()["input"] for r in broker.read(topics.output)]
    assert 0 < len(first_run) < len(frame)
    replays = sum(1 for i in first_run if i["offset"] >= committed[i["partition"]])
    second = serve(**NEVER_COMMIT, **FAST_REJOIN, **AT_LEAST_ONCE).start()
    producer.join(60)
    forecasts = broker.read(topics.output, count=len(frame) + replays, timeout=40)
    assert second.terminate() == 0
    return forecasts, frame, replays


def test_restart_after_sigterm_loses_nothing_and_duplicates_nothing(topics, serve, broker):
    forecasts, frame, replays = stream_and_stop(topics, serve, broker, "terminate")
    assert replays == 0  # the graceful stop committed everything it had done
    per_value = Counter((b["series"], b["ts"]) for b in (r.json() for r in forecasts))
    assert set(per_value) == set(zip(frame["series"], frame["ts"], strict=True))  # nothing lost
    assert set(per_value.values()) == {1}


def test_restart_after_kill_9_loses_nothing_and_replays_the_uncommitted(topics, serve, broker):
    forecasts, frame, replays = stream_and_stop(topics, serve, broker, "kill")
    assert replays > 0  # kill -9 committed nothing at the end
    per_value = Counter((b["series"], b["ts"]) for b in (r.json() for r in forecasts))
    assert set(per_value) == set(zip(frame["series"], frame["ts"], strict=True))  # nothing lost
    duplicates = sum(n - 1 for n in per_value.values())
    print(f"kill -9: {duplicates} duplicate forecasts of {len(frame)} values (at least once)")
    assert duplicates == replays  # exactly the uncommitted records were replayed, once
    assert max(per_value.values()) == 2


def test_metrics_after_a_run(topics, serve, broker):
    frame = generate(n_series=6, n_values=20, start_ms=START_MS, seed=9)
    good = records_of(frame, windowed={"series-0"}, window=5)
    bad = [(None, b"nope"), (None, b'{"series": "a", "ts": 1, "value": Infinity}')]
    service = serve().start()
    broker.send(topics.input, good + bad)
    broker.read(topics.output, count=len(frame), timeout=30)
    broker.send(topics.input, good[:10])  # a replay: harmless, counted as duplicates
    n_replayed = sum(len(json.loads(v).get("values", [0])) for _, v in good[:10])

    def metric(name: str, **labels: str) -> float | None:
        return service.metrics().get((name, tuple(sorted(labels.items()))))

    consumed = len(good) + len(bad) + 10
    broker.wait_for(
        lambda: metric("forecaster_records_consumed_total") == consumed, what="all records consumed"
    )
    broker.wait_for(
        lambda: metric("forecaster_values_duplicate_total") == n_replayed, what="duplicates counted"
    )
    broker.wait_for(
        lambda: all(metric("forecaster_consumer_lag", partition=str(p)) == 0 for p in range(3)), what="lag 0"
    )
    broker.wait_for(lambda: (metric("forecaster_series_resident") or 0) == 6, what="resident series")
    assert metric("forecaster_forecasts_emitted_total") == len(frame)
    assert metric("forecaster_values_stepped_total") == len(frame)
    assert metric("forecaster_records_invalid_total", reason="not_json") == 1
    assert metric("forecaster_records_invalid_total", reason="non_finite") == 1
    assert metric("forecaster_batch_size_count") >= 1
    assert metric("forecaster_batch_size_sum") == consumed
    assert metric("forecaster_step_seconds_count") >= 1
    assert metric("forecaster_end_to_end_latency_seconds_count") == len(frame)
    assert metric("forecaster_end_to_end_latency_seconds_bucket", le="+Inf") == len(frame)
    assert 0 < metric("forecaster_end_to_end_latency_seconds_sum") < 60 * len(frame)
    errors = metric("forecaster_forecast_abs_error_count", model_version="init")
    assert errors == len(frame) - 6  # every value but the first of each series is scored
    assert metric("forecaster_forecast_abs_error_sum", model_version="init") > 0
    assert metric("forecaster_forecast_squared_error_count", model_version="init") == errors
    assert metric("forecaster_forecast_squared_error_sum", model_version="init") > 0
    inside = metric("forecaster_interval_inside_total", model_version="init", level="95", step="h1")
    scored = metric("forecaster_interval_scored_total", model_version="init", level="95", step="h1")
    assert scored == len(frame) - 6 * 4 and 0 <= inside <= scored  # past each series' first 4 values
    assert metric("forecaster_interval_width_total", model_version="init", level="80", step="h3") > 0
    assert metric("forecaster_state_bytes") > 0
    assert metric("forecaster_state_evictions_total") == 0
    assert metric("forecaster_model_info", version="init", cell="gru") == 1
    assert metric("forecaster_model_swaps_total", result="ok") == 0
    assert not any("series-" in str(labels) for _, labels in service.metrics())  # no series id as a label
    assert metric("forecaster_values_clipped_total") == 0
    # an hour after the last value: a later period whatever the series' spacing (1 ms on would be the same
    # period of a series on a time grid, a counted duplicate)
    glitch = {"series": "series-3", "ts": int(frame["ts"].max()) + 3_600_000, "value": 1e29}
    broker.send(topics.input, [(b"series-3", json.dumps(glitch).encode())])  # after 20 values near 120
    broker.wait_for(lambda: metric("forecaster_values_clipped_total") == 1, what="the glitch clipped")
    bodies = [json.loads(r.value) for r in broker.read(topics.output, count=len(frame) + 1, timeout=30)]
    (after,) = [b for b in bodies if b["series"] == "series-3" and b["ts"] == glitch["ts"]]
    assert max(abs(f) for f in after["forecast"]) < 1e6  # not 1e26
    assert service.http("/healthz")[0] == 200
    assert service.terminate() == 0


def test_window_forecast_records_one_per_input_record_equal_the_reference(topics, serve, broker):
    frame = generate(n_series=4, n_values=21, start_ms=START_MS, step_ms=60_000, seed=5)
    windowed = {"series-0", "series-1"}
    serve(FORECASTER_SERVICE__FORECAST_RECORDS="window").start()
    n_records = broker.send(topics.input, records_of(frame, windowed, window=7))

    records = broker.read(topics.output, count=n_records, timeout=30)
    assert len(records) == n_records  # one forecast record per input record
    settings = topics.settings()
    model, scaling = fresh_model(settings), Scaling.from_settings(settings.scaling)
    for name, bodies in forecasts_by_series(records).items():
        bodies.sort(key=lambda b: b["ts"][0])
        ts = [t for b in bodies for t in b["ts"]]
        forecasts = np.array([f for b in bodies for f in b["forecasts"]])
        expected_frame = frame[frame["series"] == name]
        assert ts == expected_frame["ts"].tolist()
        assert all(len(b["ts"]) == (7 if name in windowed else 1) for b in bodies)
        assert all(b["index"] == (list(range(7)) if name in windowed else [-1]) for b in bodies)
        expected = reference_forecast(
            model, expected_frame["value"].to_numpy(), scaling, CHOICE, settings.state.window
        )
        np.testing.assert_allclose(forecasts, expected, rtol=1e-6, atol=1e-5)
        lower, _ = reference_intervals(
            forecasts.astype(np.float32), expected_frame["value"].to_numpy(), Intervals(), scaling
        )
        got = np.array([b["lower"]["95"] for b in bodies], float).reshape(len(ts), -1)  # (T, H); null: NaN
        np.testing.assert_allclose(got, lower[:, 1], rtol=1e-5, atol=1e-5)


def test_series_view_shows_the_engines_state_while_serving(topics, serve, broker):
    """/series/<id> of a running service: the values it stepped, its last forecast record, its partition."""
    frame = generate(n_series=4, n_values=40, start_ms=START_MS, step_ms=60_000, seed=5)
    service = serve(FORECASTER_STATE__WINDOW="16").start()
    broker.send(topics.input, records_of(frame, windowed=set()))
    forecasts = forecasts_by_series(broker.read(topics.output, count=len(frame), timeout=30))
    port = service.metrics_port

    def get(path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    for name in ("series-0", "series-3"):
        status, state = get(f"/series/{name}")
        expected = frame[frame["series"] == name].sort_values("ts")
        assert status == 200 and state["count"] == len(expected) and state["window"] == 16
        np.testing.assert_allclose(state["values"], expected["value"].to_numpy()[-16:], rtol=1e-6)
        last = max(forecasts[name], key=lambda body: body["ts"])
        assert state["last_ts"] == last["ts"] == int(expected["ts"].iloc[-1])
        np.testing.assert_allclose(state["forecast"], last["forecast"], rtol=1e-6, atol=1e-6)
        assert state["model_version"] == last["model_version"] == "init"
        assert last["input"]["partition"] == kafka_partition(name, 3)  # where the producer put the key
    status, absent = get("/series/" + urllib.parse.quote("no such/series", safe=""))
    assert status == 404 and absent["partitions"] == 3
    assert absent["partition"] == kafka_partition("no such/series", 3)
    assert service.terminate() == 0
