"""Recovery after kill -9 as a function of resident series, through the real broker; prints one JSON object.

For each size N (default 10k and 100k series; ``--quick``: 1k and 10k): fresh topics; ``forecaster serve``
(exactly once, the default model: GRU hidden 64, 2 layers, window 256) takes one windowed record of
``--values`` values per series, so N series are resident and N changelog records committed; the forecasts
are read back (``read_committed``); then kill -9 and start the same instance again. Measured:

- ``kill_to_ready_s``: from the kill to ``/readyz`` answering 200 again (process start, model, joining the
  group after the dead member's session expired, restore of every partition);
- ``restore_s``: the restore itself (``forecaster_restore_seconds``: committed offsets, changelog read to
  its end, snapshots loaded), with the changelog records read and series restored;
- ``first_forecast_s``: from the kill to the forecast of a value sent right after it, and whether that
  forecast continues the series (equal to a service that never stopped: it is checked against the
  forecasts of a reference engine fed the same values in-process).

The baseline in the same run is N = 0 (nothing to restore). The broker is
``FORECASTER_KAFKA__BOOTSTRAP_SERVERS`` or ``--bootstrap`` (default 127.0.0.1:9092).

    python bench/recovery.py --quick      # about two minutes
    python bench/recovery.py              # the figures in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from prometheus_client.parser import text_string_to_metric_families

from forecaster.checkpoints.hotswap import fresh_model
from forecaster.checkpoints.store import load_checkpoint, promote, save_checkpoint
from forecaster.config import Settings
from forecaster.engine.engine import Engine
from forecaster.records import encode_window
from forecaster.scaling import Scaling
from forecaster.service.clients import COMPACTED

ROOT = Path(__file__).resolve().parent.parent
START_MS = 1_700_000_000_000
SESSION_TIMEOUT_MS = 6000  # the broker's minimum: the dead member's partitions free up soonest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """Topics, checkpoint and one ``forecaster serve`` instance for one size."""

    def __init__(self, args, admin: KafkaAdminClient, checkpoints: str, workdir: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.args, self.admin, self.workdir = args, admin, workdir
        self.names = {k: f"bench-rec-{k}-{tag}" for k in ("input", "output", "deadletter", "changelog")}
        admin.create_topics(
            [
                NewTopic(self.names["input"], args.partitions, 1),
                NewTopic(self.names["output"], args.partitions, 1),
                NewTopic(self.names["deadletter"], 1, 1),
                NewTopic(self.names["changelog"], args.partitions, 1, topic_configs=dict(COMPACTED)),
            ]
        )
        self.port = free_port()
        self.env = {
            **os.environ,
            "FORECASTER_KAFKA__BOOTSTRAP_SERVERS": args.bootstrap,
            **{f"FORECASTER_KAFKA__{k.upper()}_TOPIC": v for k, v in self.names.items()},
            "FORECASTER_KAFKA__GROUP_ID": f"bench-rec-{tag}",
            "FORECASTER_KAFKA__AUTO_CREATE_TOPICS": "false",
            "FORECASTER_SERVICE__INSTANCE_ID": "bench",
            "FORECASTER_SERVICE__SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
            "FORECASTER_STATE__MAX_SERIES": str(max(1_000_000, 2 * args.largest)),
            "FORECASTER_CHECKPOINTS__DIR": checkpoints,
            "FORECASTER_METRICS__HOST": "127.0.0.1",
            "FORECASTER_METRICS__PORT": str(self.port),
            "FORECASTER_LOG_LEVEL": "INFO",
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(Path(self.workdir) / f"{self.names['input']}.log", "ab")  # noqa: SIM115 - with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forecaster", "serve"], env=self.env, cwd=ROOT, stdout=log, stderr=log
        )

    def wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"forecaster serve exited with {self.proc.returncode}; see {self.workdir}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        return time.monotonic()
            except OSError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"forecaster serve not ready after {timeout} s; see {self.workdir}")

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.admin.delete_topics(list(self.names.values()))


def send(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=512 * 1024)
    for key, value in records:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def read_forecasts(
    bootstrap: str, topic: str, count: int, timeout: float, start: dict[int, int] | None = None
) -> list[dict]:
    """``count`` forecasts (``read_committed``) from the beginning, or from ``start`` offsets."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_wait_ms=20,
    )
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    for tp in tps if start else ():
        consumer.seek(tp, start[tp.partition])
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        for part in consumer.poll(timeout_ms=200, max_records=50_000).values():
            out.extend(json.loads(r.value) for r in part)
    consumer.close()
    return out


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, isolation_level="read_committed")
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
    ends = {tp.partition: offset for tp, offset in consumer.end_offsets(tps).items()}
    consumer.close()
    return ends


def measure(args, admin, checkpoints: str, workdir: str, n_series: int, reference) -> dict:
    """Fill N series, kill -9, restart; the figures of the module docstring."""
    run = Run(args, admin, checkpoints, workdir)
    rng = np.random.default_rng(n_series)
    names = [f"s{i}" for i in range(max(n_series, 1))]
    try:
        run.start()
        run.wait_ready(120)
        fill_started = time.monotonic()
        values = rng.normal(100.0, 10.0, (len(names), args.values))
        ts = [START_MS + 60_000 * k for k in range(args.values)]
        if n_series:
            records = [
                (n.encode(), encode_window(n, ts, v.tolist())) for n, v in zip(names, values, strict=True)
            ]
            send(args.bootstrap, run.names["input"], records)
            got = read_forecasts(args.bootstrap, run.names["output"], n_series * args.values, args.timeout)
            if len(got) < n_series * args.values:
                raise SystemExit(f"only {len(got)} of {n_series * args.values} forecasts; see {workdir}")
        fill_s = time.monotonic() - fill_started
        deadline = time.monotonic() + 10  # the gauge is refreshed every metrics.refresh_seconds
        while (
            resident := run.metric("forecaster_series_resident")
        ) < n_series and time.monotonic() < deadline:
            time.sleep(0.2)
        ends = end_offsets(args.bootstrap, run.names["output"])
        # kill -9 at rest (everything committed), then the same instance again.
        killed = time.monotonic()
        run.proc.kill()
        run.proc.wait()
        run.start()
        ready = run.wait_ready(args.timeout)
        restore_s = run.metric("forecaster_restore_seconds_sum")
        restored = run.metric("forecaster_series_restored_total")
        # The first value after the restart: does it continue the series?
        probe, probe_ts = names[0], START_MS + 60_000 * args.values
        send(
            args.bootstrap, run.names["input"], [(probe.encode(), encode_window(probe, [probe_ts], [123.0]))]
        )
        after = read_forecasts(args.bootstrap, run.names["output"], 1, args.timeout, start=ends)
        first_forecast = time.monotonic()
        probe_forecast = [f for f in after if f["series"] == probe and f["ts"] == probe_ts]
        history = np.append(values[0], 123.0) if n_series else np.array([123.0])
        want = reference(history)[-1]
        continues = bool(probe_forecast) and bool(np.allclose(probe_forecast[0]["forecast"], want, atol=1e-4))
        return {
            "series": n_series,
            "resident_before_kill": int(resident),
            "fill_s": round(fill_s, 2),
            "kill_to_ready_s": round(ready - killed, 2),
            "restore_s": round(restore_s, 3),
            "series_restored": int(restored),
            "first_forecast_s": round(first_forecast - killed, 2),
            "continues_exactly": continues,
        }
    finally:
        run.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 10k series")
    parser.add_argument("--sizes", type=int, nargs="+", help="resident series per run (default 10k 100k)")
    parser.add_argument("--values", type=int, default=8, help="values per series before the kill")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=600.0, help="longest wait for one step (s)")
    parser.add_argument(
        "--bootstrap", default=os.environ.get("FORECASTER_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    )
    args = parser.parse_args()
    sizes = args.sizes or ([1_000, 10_000] if args.quick else [10_000, 100_000])
    args.largest = max(sizes)
    workdir = tempfile.mkdtemp(prefix="forecaster-bench-recovery-")
    settings = Settings()
    checkpoints = str(Path(workdir) / "checkpoints")
    promote(
        checkpoints,
        save_checkpoint(checkpoints, fresh_model(settings), Scaling.from_settings(settings.scaling)),
    )
    loaded = load_checkpoint(checkpoints)
    engine_args = {"window": settings.state.window, "scaling": loaded.scaling}

    def reference(values: np.ndarray) -> np.ndarray:
        """What an uninterrupted service forecasts after each value (the same engine, in-process)."""
        engine = Engine(loaded.model, version=loaded.version, **engine_args)
        ts = START_MS + 60_000 * np.arange(len(values))
        return engine.process(["r"] * len(values), ts, values).forecasts

    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap, client_id="bench-recovery")
    try:
        runs = [measure(args, admin, checkpoints, workdir, n, reference) for n in [0, *sizes]]
    finally:
        admin.close()
    print(
        json.dumps(
            {
                "benchmark": "recovery",
                "quick": args.quick,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "device": "cpu"},
                "model": settings.model.model_dump(),
                "window": settings.state.window,
                "values_per_series": args.values,
                "partitions": args.partitions,
                "session_timeout_ms": SESSION_TIMEOUT_MS,
                "runs": runs,
                "logs": workdir,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
