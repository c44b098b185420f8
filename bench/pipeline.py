"""Pipeline benchmark through the real broker, for each Kafka client; prints one JSON object.

In one run, on fresh topics, the same synthetic input (``--series`` series, single-value records and
records of ``--window`` values):

- ``bare``: each client's ceiling. A child process consumes the input with the client and produces one
  record per consumed value (``consume -> produce``, offsets committed after the flush), nothing else.
- ``service``: ``forecaster serve`` as its own process, with each client (``kafka.client``) and each
  processing guarantee (``exactly_once``: forecasts, changelog and offsets in one transaction per commit
  interval, forecasts read with ``read_committed``; ``at_least_once``), one forecast record per value.

Throughput runs report values/s from the first send to the last output consumed, and CPU µs per value of
the relaying process (its user + system time over the run). Then ``latency``: single-value records offered
at fixed rates (``--rate``, default 1k and 10k values/s) through the service, each client and guarantee;
per value, the time from its send (its ``ts`` is the wall clock at send, ms) to its forecast produced (the
forecast record's broker timestamp) and to its forecast consumed here; p50 / p99 / max in ms. Exactly
once, a forecast is readable only once its transaction commits (``service.commit_interval_ms``).
``cores_busy``: over a latency run, the cores the whole machine kept busy (``of`` the cores it has) and
those the service used: whether a run was bound by this machine's CPU or by the service's.

The load generator and the reader of the outputs use confluent-kafka, so neither limits a run.

    python bench/pipeline.py --quick        # a few minutes
    python bench/pipeline.py                # the figures in docs/benchmarks.md

The broker is ``FORECASTER_KAFKA__BOOTSTRAP_SERVERS`` or ``--bootstrap`` (default 127.0.0.1:9092);
``deploy/kafka/start`` starts one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
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
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer
from confluent_kafka import TopicPartition as _TP

from forecaster.config import KafkaSettings, Settings
from forecaster.records import encode_input, encode_window
from forecaster.service.clients import (
    COMPACTED,
    ConsumerOptions,
    ProducerOptions,
    Rebalance,
    TopicSpec,
    ensure_topics,
    make_admin,
    make_consumer,
    make_producer,
)
from forecaster.tools.synthetic import SyntheticSource

ROOT = Path(__file__).resolve().parent.parent
GUARANTEES = ("exactly_once", "at_least_once")
CLIENTS = ("confluent", "kafka-python")
PEER_START_SECONDS = 8.0
START_MS = 1_700_000_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def produce(
    bootstrap: str,
    topic: str,
    n_series: int,
    n_values: int,
    window: int,
    rate: float,
    started,
    linger_ms: float = 0.0,
) -> None:
    """Child process: ``n_values`` synthetic values as records of ``window`` values, paced at ``rate``
    values/s (0: as fast as possible, batched for 5 ms). With a rate, each value's ts is the wall clock at
    its send, and the producer waits ``linger_ms`` to batch (0: a request per value when the broker keeps
    up)."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": linger_ms if rate else 5,
            "queue.buffering.max.messages": 2_000_000,
        }
    )

    def send(key: bytes, value: bytes) -> None:
        while True:
            try:
                producer.produce(topic, value, key)
                return
            except BufferError:
                producer.poll(0.01)

    source = SyntheticSource(n_series, seed=1)
    keys = [name.encode() for name in source.ids]
    last_ts = np.zeros(n_series, dtype=np.int64)
    ticks = -(-n_values // (n_series * window))
    sent = 0
    t0 = time.perf_counter()
    started.value = time.time()
    for tick in range(ticks):
        block = np.stack([v for _, v in source.ticks(window)], axis=1)  # (series, window)
        ts0 = START_MS + tick * window * 1000
        for i, name in enumerate(source.ids):
            if sent >= n_values:
                break
            if rate:
                ahead = t0 + sent / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
                now = max(int(time.time() * 1000), int(last_ts[i]) + 1)
                last_ts[i] = now
                send(keys[i], encode_input(name, now, float(block[i, 0])))
                producer.poll(0)
                sent += 1
            elif window == 1:
                send(keys[i], encode_input(name, ts0, float(block[i, 0])))
                sent += 1
            else:
                ts = list(range(ts0, ts0 + 1000 * window, 1000))
                send(keys[i], encode_window(name, ts, block[i].tolist()))
                sent += window
    producer.flush()


class Broker:
    def __init__(self, bootstrap: str, partitions: int) -> None:
        self.bootstrap = bootstrap
        self.partitions = partitions
        self.admin = make_admin(KafkaSettings(bootstrap_servers=bootstrap, client_id="bench"))
        self.created: list[str] = []

    def topic(self, prefix: str, compacted: bool = False) -> str:
        name = f"bench-{prefix}-{uuid.uuid4().hex[:8]}"
        config = dict(COMPACTED) if compacted else {}
        ensure_topics(self.admin, [TopicSpec(name, self.partitions, config=config)])
        self.created.append(name)
        return name

    def close(self) -> None:
        if self.created:
            with contextlib.suppress(Exception):  # best effort: unique names keep runs apart
                self.admin.delete(self.created, 30)
        self.admin.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, every core together (Linux /proc/stat)."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    tck = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / tck, sum(ticks) / tck


def bare_relay(bootstrap: str, client: str, source: str, target: str, count: int, cpu) -> None:
    """Child process: the client's consume -> produce loop, one output record per consumed value."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap, client=client)
    service = Settings(kafka=kafka).service  # the service's fetch settings for this client: same batches
    options = ConsumerOptions(
        group_id=f"bench-bare-{uuid.uuid4().hex[:8]}",
        fetch_wait_max_ms=service.fetch_wait_max_ms,
        fetch_min_bytes=service.fetch_min_bytes,
    )
    consumer = make_consumer(kafka, options)
    producer = make_producer(kafka, ProducerOptions(linger_ms=5))
    consumer.subscribe(source, Rebalance())
    started, seen = None, 0
    while seen < count:
        records = consumer.poll(2000, 0.1)
        if not records:
            continue
        started = started or time.process_time()
        for r in records:
            at = r.value.find(b'"values"')
            if at >= 0:  # a window: one output record per value
                n = r.value.count(b",", at, r.value.index(b"]", at)) + 1
                for _ in range(n):
                    producer.send(target, r.value[:32], r.key)
                seen += n
            else:
                producer.send(target, r.value, r.key)
                seen += 1
        producer.flush()
        consumer.commit({(r.topic, r.partition): r.offset + 1 for r in records})
    cpu.value = time.process_time() - (started or 0.0)  # from the first record on: no start-up
    consumer.close()
    producer.close(10)


def quix_peer(bootstrap: str, source: str, target: str, guarantee: str, state_dir: str) -> None:
    """Child process: a Quix Streams application doing the service's job: per-key state (a running mean,
    standing in for the recurrent state) and one forecast record per value, in ``guarantee``."""
    from quixstreams import Application

    app = Application(
        broker_address=bootstrap,
        consumer_group=f"bench-quix-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        processing_guarantee=guarantee.replace("_", "-"),
        commit_interval=0.1,
        state_dir=state_dir,
        loglevel="WARNING",
        consumer_extra_config={"fetch.wait.max.ms": 10},
    )
    sdf = app.dataframe(app.topic(source, value_deserializer="json", key_deserializer="string"))

    def forecast(record: dict, state) -> list[dict]:
        ts = record["ts"] if isinstance(record["ts"], list) else [record["ts"]]
        values = record.get("values") or [record["value"]]
        mean, out = state.get("mean"), []
        for when, value in zip(ts, values, strict=True):
            mean = value if mean is None else 0.9 * mean + 0.1 * value
            out.append({"series": record["series"], "ts": when, "forecast": [mean]})
        state.set("mean", mean)
        return out

    sdf = sdf.apply(forecast, stateful=True, expand=True)
    sdf.to_topic(app.topic(target, value_serializer="json", key_serializer="string"))
    app.run()


def consume(bootstrap: str, topic: str, count: int, timeout: float, keep_bodies: bool = False):
    """Read ``count`` records of ``topic`` from the beginning; (records seen, time of the last, bodies).
    Read committed: forecasts of exactly-once transactions count once they are committed."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 5,
        }
    )
    metadata = consumer.list_topics(topic, timeout=10)
    partitions = sorted(metadata.topics[topic].partitions)
    consumer.assign([_TP(topic, p, OFFSET_BEGINNING) for p in partitions])
    seen, last, bodies = 0, time.time(), []
    deadline = time.monotonic() + timeout
    while seen < count and time.monotonic() < deadline:
        # poll returns at the first record (consume would wait its whole timeout for a full batch, and
        # that wait would count as latency); what is queued behind it is taken without waiting
        first = consumer.poll(0.1)
        if first is None:
            continue
        messages = [first, *consumer.consume(num_messages=50_000, timeout=0)]
        now = time.time()
        for m in messages:
            if m.error() is not None:
                continue
            seen += 1
            last = now
            if keep_bodies:
                bodies.append((now, m.timestamp()[1], m.value()))
    consumer.close()
    return seen, last, bodies


def relay(
    args, broker: Broker, client: str, window: int, n_values: int, service: str | None, peer: bool = False
) -> dict:
    """One throughput run with ``client``: bare (``service`` None: the client's consume -> produce loop),
    through ``forecaster serve`` with that processing guarantee, or (``peer``) through the Quix Streams
    application in it; one output record per value."""
    source, target = broker.topic("in"), broker.topic("out")
    cpu = mp.Value("d", 0.0)
    if peer:
        proc = mp.Process(target=quix_peer, args=(args.bootstrap, source, target, service, args.log_dir))
        proc.start()
        time.sleep(PEER_START_SECONDS)  # imports and topic set-up are not counted
        pid, cpu_before = proc.pid, cpu_seconds(proc.pid)
    elif service:
        proc = start_service(args, broker, client, source, target, service)
        pid, cpu_before = proc.pid, cpu_seconds(proc.pid)
    else:
        proc = mp.Process(target=bare_relay, args=(args.bootstrap, client, source, target, n_values, cpu))
        proc.start()
        pid, cpu_before = proc.pid, 0.0
    try:
        started = mp.Value("d", 0.0)
        child = mp.Process(
            target=produce, args=(args.bootstrap, source, args.series, n_values, window, 0.0, started)
        )
        child.start()
        seen, last, _ = consume(args.bootstrap, target, n_values, timeout=args.timeout)
        child.join()
        seconds = last - started.value
        if service or peer:
            cpu_used = cpu_seconds(pid) - cpu_before
        else:
            proc.join(10)
            cpu_used = cpu.value
        return {
            "values": seen,
            "records_in": -(-n_values // window),
            "seconds": round(seconds, 3),
            "values_per_s": round(seen / seconds),
            "cpu_us_per_value": round(cpu_used / max(seen, 1) * 1e6, 1),
            "complete": seen >= n_values,
        }
    finally:
        if service and not peer:
            stop_service(proc)
        elif proc.is_alive():
            proc.kill()
            proc.join(10)


def latency(args, broker: Broker, client: str, rate: float, guarantee: str) -> dict:
    source, target = broker.topic("in"), broker.topic("out")
    proc = start_service(args, broker, client, source, target, guarantee)
    try:
        n_values = int(rate * args.latency_seconds)
        started = mp.Value("d", 0.0)
        child = mp.Process(
            target=produce,
            args=(args.bootstrap, source, args.series, n_values, 1, rate, started, args.producer_linger_ms),
        )
        # Where the CPU went while values flowed: was the machine saturated, and how much did the service get?
        (busy_before, whole_before), service_before = machine_cpu_seconds(), cpu_seconds(proc.pid)
        clock_before = time.monotonic()
        child.start()
        seen, _, bodies = consume(
            args.bootstrap, target, n_values, timeout=args.latency_seconds + args.timeout, keep_bodies=True
        )
        child.join()
        (busy, whole), elapsed = machine_cpu_seconds(), time.monotonic() - clock_before
        cores = {
            "machine": round((busy - busy_before) / elapsed, 2),
            "of": round((whole - whole_before) / elapsed, 1),  # the cores there are
            "service": round((cpu_seconds(proc.pid) - service_before) / elapsed, 2),
        }
        # the first 2 s: connections, first batches, and a fresh instance's first transactions (each
        # partition's first in a transaction was seen to take about 300 ms on a fresh topic)
        warmup = rate * 2.0
        consumed, produced = [], []
        for i, (arrived, forecast_ms, value) in enumerate(bodies):
            sent_ms = json.loads(value)["ts"]
            if i >= warmup:
                consumed.append(arrived * 1000 - sent_ms)
                produced.append(forecast_ms - sent_ms)
        c, p = np.array(consumed), np.array(produced)
        if os.environ.get("BENCH_DUMP"):  # every value's (sent, produced, consumed) for a closer look
            sent = [json.loads(v)["ts"] for _, _, v in bodies]
            np.save(
                os.environ["BENCH_DUMP"],
                np.array([(s, f, a * 1000) for s, (a, f, _) in zip(sent, bodies, strict=True)]),
            )
        return {
            "client": client,
            "guarantee": guarantee,
            "offered_values_per_s": rate,
            "seconds": args.latency_seconds,
            "values": seen,
            "measured_after_warmup": len(c),
            "complete": seen >= n_values,
            "to_forecast_consumed_ms": {"p50": pct(c, 50), "p99": pct(c, 99), "max": pct(c, 100)},
            "to_forecast_produced_ms": {"p50": pct(p, 50), "p99": pct(p, 99), "max": pct(p, 100)},
            "cores_busy": cores,
        }
    finally:
        stop_service(proc)


def pct(a: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(a, q)), 2) if len(a) else None


def start_service(
    args, broker: Broker, client: str, source: str, target: str, guarantee: str
) -> subprocess.Popen:
    port = free_port()
    env = {
        **os.environ,
        "FORECASTER_KAFKA__CLIENT": client,
        "FORECASTER_SERVICE__PROCESSING_GUARANTEE": guarantee,
        "FORECASTER_KAFKA__CHANGELOG_TOPIC": broker.topic("cl", compacted=True),
        "FORECASTER_KAFKA__BOOTSTRAP_SERVERS": args.bootstrap,
        "FORECASTER_KAFKA__INPUT_TOPIC": source,
        "FORECASTER_KAFKA__OUTPUT_TOPIC": target,
        "FORECASTER_KAFKA__DEADLETTER_TOPIC": broker.topic("dl"),
        "FORECASTER_KAFKA__GROUP_ID": f"bench-{uuid.uuid4().hex[:8]}",
        "FORECASTER_METRICS__HOST": "127.0.0.1",
        "FORECASTER_METRICS__PORT": str(port),
        "FORECASTER_CHECKPOINTS__DIR": args.checkpoints,
        "FORECASTER_LOG_LEVEL": "WARNING",
    }
    log = open(Path(args.log_dir) / f"serve-{source}.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(
        [sys.executable, *(os.environ.get("BENCH_SERVE") or "-m forecaster serve").split()],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"forecaster serve exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"forecaster serve not ready after 60 s; see {log.name}")


def stop_service(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, a few minutes")
    parser.add_argument(
        "--bootstrap", default=os.environ.get("FORECASTER_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    )
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--window", type=int, default=100, help="values per windowed record")
    parser.add_argument("--single-values", type=int, help="values of the single-value runs")
    parser.add_argument("--window-values", type=int, help="values of the windowed runs")
    parser.add_argument(
        "--rate",
        type=float,
        nargs="+",
        default=[1_000.0, 10_000.0],
        help="offered values/s of the latency runs",
    )
    parser.add_argument("--latency-seconds", type=float, help="length of the latency run")
    parser.add_argument(
        "--producer-linger-ms",
        type=float,
        default=0.0,
        help="the latency runs' producer batches this long (0: each value sent at once)",
    )
    parser.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS))
    parser.add_argument("--guarantees", nargs="+", choices=GUARANTEES, default=list(GUARANTEES))
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--no-peer", action="store_true", help="skip the Quix Streams peer (the bench extra)")
    parser.add_argument("--timeout", type=float, help="longest wait for one run's output (s)")
    parser.add_argument("--latency-only", action="store_true", help="only the fixed-rate latency runs")
    args = parser.parse_args()
    args.single_values = args.single_values or (20_000 if args.quick else 200_000)
    args.window_values = args.window_values or (100_000 if args.quick else 1_000_000)
    args.latency_seconds = args.latency_seconds or (8.0 if args.quick else 12.0)
    args.timeout = args.timeout or (30.0 if args.quick else 120.0)
    workdir = tempfile.mkdtemp(prefix="forecaster-bench-")
    args.checkpoints = str(Path(workdir) / "checkpoints")  # empty: the service runs a fresh model
    args.log_dir = workdir

    broker = Broker(args.bootstrap, args.partitions)
    kinds = {"single": (1, args.single_values), "windowed": (args.window, args.window_values)}
    bare, service, peer = {}, {}, {}
    try:
        if args.latency_only:
            args.no_peer = True
            kinds = {}
        bare = {
            c: {kind: relay(args, broker, c, w, n, service=None) for kind, (w, n) in kinds.items()}
            for c in args.clients
        }
        service = {
            c: {
                g: {kind: relay(args, broker, c, w, n, service=g) for kind, (w, n) in kinds.items()}
                for g in args.guarantees
            }
            for c in args.clients
        }
        peer = {}
        if not args.no_peer:
            peer = {
                g: {
                    kind: relay(args, broker, "confluent", w, n, service=g, peer=True)
                    for kind, (w, n) in kinds.items()
                }
                for g in args.guarantees
            }
        lat = [
            latency(args, broker, c, rate, g)
            for c in args.clients
            for g in args.guarantees
            for rate in args.rate
        ]
    finally:
        broker.close()
    settings = Settings()

    def vps(c: str, g: str, kind: str) -> int | None:
        return service.get(c, {}).get(g, {}).get(kind, {}).get("values_per_s")

    def p99(c: str, g: str, rate: float, to: str = "to_forecast_produced_ms") -> float | None:
        runs = [r for r in lat if (r["client"], r["guarantee"], r["offered_values_per_s"]) == (c, g, rate)]
        return runs[0][to]["p99"] if runs else None

    goals = {}
    if "confluent" in args.clients and set(GUARANTEES) <= set(args.guarantees) and not args.latency_only:
        eos_single, alo_single = (
            vps("confluent", "exactly_once", "single"),
            vps("confluent", "at_least_once", "single"),
        )
        goals = {
            "single_exactly_once_ge_60k": eos_single >= 60_000,
            "single_at_least_once_ge_0.6_bare_confluent": alo_single
            >= 0.6 * bare["confluent"]["single"]["values_per_s"],
            "windowed_exactly_once_ge_150k": vps("confluent", "exactly_once", "windowed") >= 150_000,
            "single_exactly_once_ge_4x_quix_peer": eos_single
            >= 4 * peer["exactly_once"]["single"]["values_per_s"]
            if peer
            else None,
            "p99_produced_le_25ms_at_1k_at_least_once": (p99("confluent", "at_least_once", 1_000.0) or 1e9)
            <= 25.0,
            "p99_readable_le_commit_interval_plus_50ms_at_1k_exactly_once": (
                p99("confluent", "exactly_once", 1_000.0, "to_forecast_consumed_ms") or 1e9
            )
            <= settings.service.commit_interval_ms + 50,
        }
    result = {
        "benchmark": "pipeline",
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "device": settings.state.device,
        },
        "model": settings.model.model_dump(),
        "series": args.series,
        "window": args.window,
        "commit_interval_ms": settings.service.commit_interval_ms,
        "linger_ms": settings.service.linger_ms,
        "fetch_wait_max_ms": settings.service.fetch_wait_max_ms,
        "fetch_min_bytes": settings.service.fetch_min_bytes,
        "latency_producer_linger_ms": args.producer_linger_ms,
        "bare": bare,
        "service": service,
        "quix_streams_peer": peer,
        "latency": lat,
        "goals": goals,
        "logs": workdir,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
