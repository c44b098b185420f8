"""Churn soak against the real broker: does the service's memory stay flat while series come and go?

``forecaster serve`` (exactly once) runs as a subprocess on fresh topics. Every second a producer sends one
windowed record (``--values`` values) for each active series; ``--new-per-s`` new series ids arrive each
second and each stays active ``--active-s`` seconds, then goes idle for good, so the state table evicts
idle series (``--ttl-s``) and, above ``--max-series``, the least recently seen ones. Some series come back
for one record long after their eviction (``--returning-per-s``): they resume from the evicted store.

Every ``--sample-s`` seconds the soak records the service's RSS (``/proc/<pid>/status``) and from its
``/metrics``: state bytes, resident and evicted series (in memory and on disk), evicted bytes, consumer
lag (summed over partitions) and the end-to-end latency of the interval (record timestamp to forecast
handed to the producer: mean and p99 from the histogram's buckets). It prints one JSON object with the
samples and the growth: RSS at the last sample against the first sample of the last half, in % and as a
least-squares slope over the last half in MB/h, and against the first sample after the warm-up
(the first third of the run, at most 10 minutes).

The baseline runs in the same soak, side by side on its own topics with the same traffic:
``--baseline unbounded`` (default) is this tree with every evicted snapshot kept in memory
(``state.evicted_memory_bytes`` unlimited, what the service did before the evicted store); ``--baseline
tree:PATH`` runs ``forecaster serve`` from another source tree (e.g. a checkout of main);
``--baseline none`` runs only the bounded service.

    python bench/soak.py --quick     # 3 minutes
    python bench/soak.py             # 30 minutes
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
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from prometheus_client.parser import text_string_to_metric_families

from forecaster.records import encode_window
from forecaster.service.clients import COMPACTED

ROOT = Path(__file__).resolve().parent.parent
UNLIMITED = 1 << 62


class Service:
    """Topics and one ``forecaster serve`` process, with what the soak samples from it."""

    def __init__(
        self, label: str, args, admin: KafkaAdminClient, workdir: Path, env: dict[str, str], tree: Path = ROOT
    ) -> None:
        tag = uuid.uuid4().hex[:8]
        self.label, self.admin, self.workdir, self.tree = label, admin, workdir, tree
        self.topics = {k: f"soak-{label}-{k}-{tag}" for k in ("input", "output", "deadletter", "changelog")}
        admin.create_topics(
            [
                NewTopic(self.topics["input"], args.partitions, 1),
                NewTopic(self.topics["output"], args.partitions, 1),
                NewTopic(self.topics["deadletter"], 1, 1),
                NewTopic(self.topics["changelog"], args.partitions, 1, topic_configs=dict(COMPACTED)),
            ]
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.env = {
            **os.environ,
            "FORECASTER_KAFKA__BOOTSTRAP_SERVERS": args.bootstrap,
            **{f"FORECASTER_KAFKA__{k.upper()}_TOPIC": v for k, v in self.topics.items()},
            "FORECASTER_KAFKA__GROUP_ID": f"soak-{label}-{tag}",
            "FORECASTER_KAFKA__AUTO_CREATE_TOPICS": "false",
            "FORECASTER_SERVICE__PROCESSING_GUARANTEE": "exactly_once",
            "FORECASTER_SERVICE__INSTANCE_ID": f"soak-{label}",
            "FORECASTER_SERVICE__FORECAST_RECORDS": "window",
            "FORECASTER_STATE__DEVICE": "cpu",
            "FORECASTER_STATE__MAX_SERIES": str(args.max_series),
            "FORECASTER_STATE__TTL_SECONDS": str(args.ttl_s),
            "FORECASTER_STATE__SPILL_DIR": str(workdir / "spill"),
            "FORECASTER_CHECKPOINTS__DIR": str(workdir / "checkpoints"),  # none: the untrained model
            "FORECASTER_METRICS__HOST": "127.0.0.1",
            "FORECASTER_METRICS__PORT": str(self.port),
            "OMP_NUM_THREADS": "1",
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self._last: dict[str, float] = {}

    def start(self, timeout: float) -> None:
        log = open(self.workdir / f"{self.label}.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forecaster", "serve"], env=self.env, cwd=self.tree, stdout=log, stderr=log
        )
        deadline = time.monotonic() + timeout
        while self._get("/readyz") is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.label}: forecaster serve did not become ready; see {self.workdir}")
            time.sleep(0.2)

    def _get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as answer:
                return answer.read().decode() if answer.status == 200 else None
        except OSError:
            return None

    def sample(self, elapsed: float) -> dict[str, float]:
        """RSS and the /metrics figures now; latency over the interval since the previous sample."""
        text = self._get("/metrics") or ""
        m: dict[str, float] = {}
        buckets: dict[float, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "forecaster_end_to_end_latency_seconds_bucket":
                    buckets[float(s.labels["le"])] = s.value
                elif s.name in ("forecaster_evicted_series", "forecaster_evicted_bytes"):
                    m[f"{s.name}_{s.labels['where']}"] = s.value
                else:
                    m[s.name] = m.get(s.name, 0.0) + s.value  # lag: summed over partitions
        latency_sum = m.get("forecaster_end_to_end_latency_seconds_sum", 0.0)
        latency_count = m.get("forecaster_end_to_end_latency_seconds_count", 0.0)
        d_count = latency_count - self._last.get("count", 0.0)
        d_buckets = {le: v - self._last.get(le, 0.0) for le, v in buckets.items()}
        p99 = next((le for le in sorted(d_buckets) if d_buckets[le] >= 0.99 * d_count), None)
        mean = (latency_sum - self._last.get("sum", 0.0)) / d_count if d_count > 0 else None
        self._last = {"count": latency_count, "sum": latency_sum, **buckets}
        return {
            "t_s": round(elapsed, 1),
            "rss_mb": round(rss_bytes(self.proc.pid) / 2**20, 1),
            "state_bytes": m.get("forecaster_state_bytes", 0.0),
            "resident": m.get("forecaster_series_resident", 0.0),
            "evicted_memory": m.get("forecaster_evicted_series_memory", 0.0),
            "evicted_disk": m.get("forecaster_evicted_series_disk", 0.0),
            "evicted_memory_bytes": m.get("forecaster_evicted_bytes_memory", 0.0),
            "evicted_disk_bytes": m.get("forecaster_evicted_bytes_disk", 0.0),
            "evictions_total": m.get("forecaster_state_evictions_total", 0.0),
            "lag": m.get("forecaster_consumer_lag", 0.0),
            "values_stepped": m.get("forecaster_values_stepped_total", 0.0),
            "latency_mean_ms": None if mean is None else round(mean * 1000, 1),
            "latency_p99_le_ms": None if p99 is None or d_count <= 0 else round(p99 * 1000, 1),
        }

    def stop(self) -> int | None:
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                code = self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.admin.delete_topics(list(self.topics.values()))
        return code


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Traffic(threading.Thread):
    """Churning series to every input topic, one tick per second (see the module docstring)."""

    def __init__(self, args, topics: list[str]) -> None:
        super().__init__(daemon=True)
        self.args, self.topics = args, topics
        self.stop = threading.Event()
        self.values_sent = 0
        self.series_started = 0
        self.returned = 0

    def run(self) -> None:
        args, rng = self.args, np.random.default_rng(7)
        producer = KafkaProducer(bootstrap_servers=args.bootstrap, linger_ms=20, batch_size=256 * 1024)
        active: list[tuple[int, float]] = []  # (series number, active until)
        gone: list[tuple[int, float]] = []  # (series number, idle since)
        ts_of: dict[int, int] = {}
        next_tick = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            for _ in range(args.new_per_s):
                active.append((self.series_started, now + args.active_s))
                self.series_started += 1
            gone += [(n, now) for n, until in active if until <= now]
            active = [(n, until) for n, until in active if until > now]
            long_gone = [n for n, since in gone if now - since > args.ttl_s + 10]
            back = [int(n) for n in rng.choice(long_gone, min(len(long_gone), args.returning_per_s), False)]
            self.returned += len(back)
            wall_ms = int(time.time() * 1000)
            for n in [a for a, _ in active] + back:
                first = max(ts_of.get(n, 0) + 1, wall_ms - args.values)
                ts = list(range(first, first + args.values))
                ts_of[n] = ts[-1]
                name = f"soak-{n}"
                value = encode_window(name, ts, (100.0 + rng.normal(0.0, 5.0, args.values)).tolist())
                for topic in self.topics:
                    producer.send(topic, key=name.encode(), value=value)
                self.values_sent += args.values
            producer.flush()
            next_tick += 1.0
            self.stop.wait(max(0.0, next_tick - time.monotonic()))
        producer.close()


def growth(samples: list[dict], warmup_s: float) -> dict[str, float | None]:
    """RSS growth over the last half (last sample vs the first of the last half; slope) and since warm-up."""
    if len(samples) < 4:
        return {}
    end_t = samples[-1]["t_s"]
    half = [s for s in samples if s["t_s"] >= end_t / 2]
    after = [s for s in samples if s["t_s"] >= warmup_s] or samples
    t = np.array([s["t_s"] for s in half]) / 3600.0
    rss = np.array([s["rss_mb"] for s in half])
    slope = float(np.polyfit(t, rss, 1)[0]) if len(half) >= 2 else None
    return {
        "rss_first_after_warmup_mb": after[0]["rss_mb"],
        "rss_first_of_last_half_mb": half[0]["rss_mb"],
        "rss_last_mb": samples[-1]["rss_mb"],
        "rss_growth_last_half_pct": round(100.0 * (rss[-1] / rss[0] - 1.0), 2),
        "rss_slope_last_half_mb_per_h": None if slope is None else round(slope, 1),
        "rss_growth_since_warmup_pct": round(100.0 * (samples[-1]["rss_mb"] / after[0]["rss_mb"] - 1.0), 2),
        "rss_max_mb": max(s["rss_mb"] for s in samples),
        "evicted_series_last": samples[-1]["evicted_memory"] + samples[-1]["evicted_disk"],
        "lag_last": samples[-1]["lag"],
        "latency_mean_ms_median": _median([s["latency_mean_ms"] for s in half]),
        "latency_p99_le_ms_median": _median([s["latency_p99_le_ms"] for s in half]),
    }


def _median(values: list) -> float | None:
    found = [v for v in values if v is not None]
    return float(np.median(found)) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 minutes instead of 30")
    parser.add_argument("--minutes", type=float, help="length of the soak (default 30; --quick 3)")
    parser.add_argument("--new-per-s", type=int, default=30, help="new series ids per second")
    parser.add_argument("--active-s", type=float, default=10.0, help="seconds a series stays active")
    parser.add_argument("--returning-per-s", type=int, default=3, help="long-evicted series back per second")
    parser.add_argument("--values", type=int, default=2, help="values per record (one record/series/s)")
    parser.add_argument("--ttl-s", type=float, default=15.0, help="state.ttl_seconds")
    parser.add_argument("--max-series", type=int, default=600, help="state.max_series")
    parser.add_argument(
        "--budget-bytes", type=int, default=4 << 20, help="state.evicted_memory_bytes (bounded service)"
    )
    parser.add_argument("--baseline", default="unbounded", help="unbounded | tree:PATH | none")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument(
        "--bootstrap", default=os.environ.get("FORECASTER_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    )
    parser.add_argument("--all-samples", action="store_true", help="print every sample, not one in six")
    args = parser.parse_args()
    minutes = args.minutes or (3.0 if args.quick else 30.0)
    warmup_s = min(600.0, minutes * 60.0 / 3.0)
    workdir = Path(tempfile.mkdtemp(prefix="forecaster-bench-soak-"))
    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap, client_id="bench-soak")
    bounded = {"FORECASTER_STATE__EVICTED_MEMORY_BYTES": str(args.budget_bytes)}
    modes: dict[str, tuple[dict[str, str], Path]] = {"bounded": (bounded, ROOT)}
    if args.baseline == "unbounded":
        modes["unbounded"] = ({"FORECASTER_STATE__EVICTED_MEMORY_BYTES": str(UNLIMITED)}, ROOT)
    elif args.baseline.startswith("tree:"):  # python -m imports from its working folder: run it there
        tree = Path(args.baseline[5:]).resolve()
        modes["baseline_tree"] = ({"PYTHONPATH": str(tree)}, tree)
    elif args.baseline != "none":
        raise SystemExit(f"--baseline {args.baseline!r}: unbounded, tree:PATH or none")
    services = [Service(label, args, admin, workdir, env, tree) for label, (env, tree) in modes.items()]
    samples: dict[str, list[dict]] = {s.label: [] for s in services}
    traffic = Traffic(args, [s.topics["input"] for s in services])
    exits: dict[str, int | None] = {}
    try:
        for service in services:
            service.start(timeout=120)
        started = time.monotonic()
        traffic.start()
        while (elapsed := time.monotonic() - started) < minutes * 60.0:
            time.sleep(args.sample_s - (elapsed % args.sample_s))
            for service in services:
                if service.proc.poll() is not None:
                    raise SystemExit(f"{service.label}: forecaster serve exited; see {workdir}")
                samples[service.label].append(service.sample(time.monotonic() - started))
        traffic.stop.set()
        traffic.join(30)
    finally:
        for service in services:
            exits[service.label] = service.stop()
        admin.close()
    keep = 1 if args.all_samples else 6
    print(
        json.dumps(
            {
                "benchmark": "soak",
                "minutes": minutes,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "device": "cpu"},
                "traffic": {
                    "new_series_per_s": args.new_per_s,
                    "active_s": args.active_s,
                    "returning_per_s": args.returning_per_s,
                    "values_per_record": args.values,
                    "series_started": traffic.series_started,
                    "series_returned": traffic.returned,
                    "values_sent_per_service": traffic.values_sent,
                },
                "settings": {
                    "ttl_s": args.ttl_s,
                    "max_series": args.max_series,
                    "budget_bytes": args.budget_bytes,
                },
                "warmup_s": warmup_s,
                "growth": {label: growth(s, warmup_s) for label, s in samples.items()},
                "exit_codes": exits,
                "samples": {label: s[::keep] + s[-1:] for label, s in samples.items()},
                "logs": str(workdir),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
