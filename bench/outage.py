"""A broker outage, timed: readiness, recovery, and nothing lost or doubled; prints one JSON object.

For each client (``--clients``, default both): a broker of its own (``deploy/kafka/start`` on other
ports, its own data), fresh topics, a published checkpoint and ``forecaster serve`` with the default
settings (exactly once; session 10 s, reconnect back-off at most 1 s). A producer sends one value per
series every ``--every-s`` seconds, stamped with the time it was made; a reader follows the output
(``read_committed``); a probe asks ``/readyz`` every 0.2 s. After ``--warm-s`` seconds the broker is
stopped for ``--outage-s`` seconds, then started again. Measured, per client:

- ``ready_drop_s``: from the stop to ``/readyz`` answering other than 200 (goal: within 10 s);
- ``ready_back_s``: from the broker answering again to ``/readyz`` 200 (goal: within 10 s);
- ``resume_s``: from the broker answering again to the first forecast of a value made after that
  (goal: within 10 s);
- ``values``, ``forecasts``, ``missing``, ``duplicated``: every value sent has exactly one forecast.

    python bench/outage.py              # both clients, a 30 s outage (about 3 minutes)
    python bench/outage.py --clients confluent --outage-s 60
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forecaster.checkpoints.hotswap import fresh_model  # noqa: E402
from forecaster.checkpoints.store import promote, save_checkpoint  # noqa: E402
from forecaster.config import KafkaSettings, Settings  # noqa: E402
from forecaster.scaling import Scaling  # noqa: E402
from forecaster.service.clients import (  # noqa: E402
    ConsumerOptions,
    ProducerOptions,
    TopicPartition,
    TopicSpec,
    ensure_topics,
    make_consumer,
    make_producer,
    wait_for_broker,
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Broker:
    """``deploy/kafka/start`` / ``stop`` on ``port``, with its data under ``data``."""

    def __init__(self, port: int, data: Path) -> None:
        self.address = f"127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "KAFKA_PORT": str(port),
            "KAFKA_CONTROLLER_PORT": str(port + 1),
            "KAFKA_DATA_DIR": str(data),
        }

    def run(self, name: str, *args: str) -> None:
        done = subprocess.run(
            [str(ROOT / "deploy" / "kafka" / name), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"deploy/kafka/{name} failed: {done.stderr.strip()}")

    def answers(self) -> bool:
        try:
            wait_for_broker(
                KafkaSettings(bootstrap_servers=self.address, request_timeout_ms=2000), timeout=1.0
            )
            return True
        except Exception:  # noqa: BLE001 - any failure means not yet
            return False


def run_client(client: str, args: argparse.Namespace, workdir: Path) -> dict:
    broker = Broker(args.port, workdir / f"kafka-{client}")
    broker.run("start")
    kafka = KafkaSettings(bootstrap_servers=broker.address, client=client)
    wait_for_broker(kafka, timeout=60)
    topics = {
        "INPUT": "outage-in",
        "OUTPUT": "outage-out",
        "DEADLETTER": "outage-dl",
        "CHANGELOG": "outage-cl",
    }
    ensure_topics(
        kafka,
        [TopicSpec(topics["INPUT"], 6), TopicSpec(topics["OUTPUT"], 6), TopicSpec(topics["DEADLETTER"], 1)],
    )
    checkpoints = workdir / f"checkpoints-{client}"
    settings = Settings(model={"hidden_size": 16, "num_layers": 1, "horizon": 3})
    promote(
        checkpoints,
        save_checkpoint(checkpoints, fresh_model(settings), Scaling.from_settings(settings.scaling)),
    )
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FORECASTER_")},
        "FORECASTER_KAFKA__CLIENT": client,
        "FORECASTER_KAFKA__BOOTSTRAP_SERVERS": broker.address,
        **{f"FORECASTER_KAFKA__{k}_TOPIC": v for k, v in topics.items()},
        "FORECASTER_KAFKA__GROUP_ID": f"outage-{client}",
        "FORECASTER_CHECKPOINTS__DIR": str(checkpoints),
        "FORECASTER_MODEL__HIDDEN_SIZE": "16",
        "FORECASTER_MODEL__NUM_LAYERS": "1",
        "FORECASTER_MODEL__HORIZON": "3",
        "FORECASTER_METRICS__PORT": str(port),
        "FORECASTER_STATE__SPILL_DIR": str(workdir / f"spill-{client}"),
    }
    log = open(workdir / f"serve-{client}.log", "w")  # noqa: SIM115 - closed after the run
    serve = subprocess.Popen(
        [sys.executable, "-m", "forecaster", "serve"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )
    events: dict[str, float] = {}
    ready: list[tuple[float, bool]] = []
    arrivals: list[tuple[float, float, str, int]] = []  # (arrived, made, series, ts)
    sent: list[tuple[str, int]] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
                    ok = answer.status == 200
            except Exception:  # noqa: BLE001 - 503 raises too
                ok = False
            ready.append((time.monotonic(), ok))
            time.sleep(0.2)

    def produce() -> None:
        producer = make_producer(kafka, ProducerOptions(linger_ms=5))
        t = 0
        while not stop.is_set():
            t += 1
            ts = int(time.time() * 1000)  # when the value was made: its forecast tells it back
            for i in range(args.series):
                name = f"s{i}"
                body = orjson.dumps({"series": name, "ts": ts, "value": float(i + (t % 24))})
                producer.send(topics["INPUT"], body, name.encode())
                sent.append((name, ts))
            time.sleep(args.every_s)
        producer.flush(120)
        producer.close(10)

    def read() -> None:
        consumer = make_consumer(kafka, ConsumerOptions(group_id=None, isolation_level="read_committed"))
        consumer.assign({TopicPartition(topics["OUTPUT"], p): 0 for p in range(6)})
        while not stop.is_set() or len(arrivals) < len(sent):
            for record in consumer.poll(10_000, 0.2):
                body = orjson.loads(record.value)
                arrivals.append((time.monotonic(), body["ts"] / 1000.0, body["series"], body["ts"]))
            if stop.is_set() and time.monotonic() > events.get("drain_deadline", float("inf")):
                break
        consumer.close()

    threads = [threading.Thread(target=f, daemon=True) for f in (probe, produce, read)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 90
    while not (ready and ready[-1][1]) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(args.warm_s)
    events["stop"] = time.monotonic()
    broker.run("stop")
    time.sleep(args.outage_s)
    events["start"] = time.monotonic()
    broker.run("start")
    while not broker.answers():
        time.sleep(0.2)
    events["up"] = time.monotonic()
    up_wall = time.time() - (time.monotonic() - events["up"])
    time.sleep(args.after_s)
    stop.set()
    events["drain_deadline"] = time.monotonic() + 120
    threads[1].join(150)
    threads[2].join(150)
    serve.terminate()
    code = serve.wait(120)
    log.close()
    broker.run("stop", "--wipe")
    first = lambda pairs, after, want: next((t - after for t, ok in pairs if t >= after and ok == want), None)  # noqa: E731
    resumed = [arrived for arrived, made, _, _ in arrivals if made >= up_wall]
    keys = Counter((series, ts) for _, _, series, ts in arrivals)
    expected = set(sent)
    return {
        "ready_drop_s": first(ready, events["stop"], False),
        "ready_back_s": first(ready, events["up"], True),
        "resume_s": (min(resumed) - events["up"]) if resumed else None,
        "broker_start_s": events["up"] - events["start"],
        "values": len(expected),
        "forecasts": len(arrivals),
        "missing": len(expected - set(keys)),
        "duplicated": sum(1 for n in keys.values() if n > 1),
        "exit_code": code,
    }


def main() -> int:
    logging.getLogger("forecaster.librdkafka").setLevel(logging.CRITICAL)  # the clients' lines while away
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", default="confluent,kafka-python")
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--warm-s", type=float, default=10.0)
    parser.add_argument("--after-s", type=float, default=30.0)
    parser.add_argument("--series", type=int, default=50)
    parser.add_argument("--every-s", type=float, default=0.2)
    parser.add_argument("--port", type=int, default=19592)
    parser.add_argument("--keep", help="keep the brokers' data and the service logs in this folder")
    args = parser.parse_args()
    report = {
        "outage_s": args.outage_s,
        "series": args.series,
        "values_per_s": args.series / args.every_s,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "clients": {},
    }
    with tempfile.TemporaryDirectory(prefix="forecaster-outage-") as workdir:
        where = Path(args.keep or workdir)
        where.mkdir(parents=True, exist_ok=True)
        for client in args.clients.split(","):
            print(f"[bench] {client}", file=sys.stderr, flush=True)
            report["clients"][client] = run_client(client, args, where)
    report["goals"] = {
        client: {
            "ready_drop_within_10s": r["ready_drop_s"] is not None and r["ready_drop_s"] <= 10,
            "ready_back_within_10s": r["ready_back_s"] is not None and r["ready_back_s"] <= 10,
            "resume_within_10s": r["resume_s"] is not None and r["resume_s"] <= 10,
            "exactly_once": r["missing"] == 0 and r["duplicated"] == 0,
        }
        for client, r in report["clients"].items()
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
