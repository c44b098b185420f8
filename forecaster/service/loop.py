"""The streaming service: poll -> decode -> engine -> produce -> commit.

Exactly once (the default, ``service.processing_guarantee``): each commit interval's forecasts, dead
letters, state changelog records and input offsets commit as one Kafka transaction
(``forecaster.service.exactly_once.committer``); partitions are restored from the changelog before they are consumed and
dropped when they leave (``forecaster.service.exactly_once.recovery``). At least once: input offsets are committed only after the
broker acknowledged the forecasts and dead letters of those records (flush, then commit); a replay after a
crash is harmless because the engine drops values not newer than their series' last timestamp (counted as
duplicates). ``stop()`` (SIGTERM/SIGINT in the CLI) lets the current batch finish, then commits and closes.

>>> from forecaster.config import Settings
>>> service = Service(Settings(metrics={"port": 0}), consumer=None, producer=None)  # clients built in start()
>>> service.ready()
False
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from kafka import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from forecaster.checkpoints.hotswap import ModelSwapper, initial_model
from forecaster.config import Settings
from forecaster.engine.engine import Engine, resolve_device
from forecaster.errors import InvalidRecord, KafkaSetupError, ProducerFenced
from forecaster.metrics import MetricsServer, SeriesLookup, ServiceMetrics
from forecaster.records import (
    Bounds,
    DecodedBatch,
    KafkaRecord,
    RecordDecoder,
    encode_dead_letter,
    encode_forecast_groups,
    encode_forecasts,
)
from forecaster.scaling import Scaling
from forecaster.service.at_least_once import AtLeastOnceCommitter
from forecaster.service.clients import (
    create_missing_topics,
    make_consumer,
    make_producer,
    wait_for_broker,
)
from forecaster.service.exactly_once.changelog import ensure_changelog
from forecaster.service.exactly_once.committer import TransactionalCommitter, is_fenced
from forecaster.service.exactly_once.parts import ExactlyOnce, consumer_options

log = logging.getLogger(__name__)

EXIT_FENCED = 3  # another instance took over this one's transactional id: a zombie stops


class Service:
    """One member of the consumer group: Kafka in, forecasts out. Collaborators are injectable.

    >>> from forecaster.config import Settings
        >>> Service(Settings(metrics={"port": 0}), consumer=None, producer=None).committer is None  # built in start()
        True
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        consumer: Any = None,
        producer: Any = None,
        metrics: ServiceMetrics | None = None,
        swapper: ModelSwapper | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.consumer = consumer
        self.producer = producer
        self.metrics = metrics or ServiceMetrics()
        self.swapper = swapper
        self.clock = clock
        positive = Scaling.from_settings(settings.scaling).positive or (
            engine is not None and engine.scaling.positive
        )
        self.decoder = RecordDecoder.from_settings(
            settings.service, clock=clock, positive=positive
        )  # log: > 0
        self.committer: AtLeastOnceCommitter | TransactionalCommitter | None = None
        self.exactly_once: ExactlyOnce | None = None
        self._stopping = threading.Event()
        self._fenced = False
        self._polling = False
        self._next_refresh = 0.0
        self._next_lag = 0.0
        self._server: MetricsServer | None = None

    # ---- the loop ------------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until ``stop()``; returns the exit status (0, or ``EXIT_FENCED`` for a zombie)."""
        self.start()
        try:
            while not self._stopping.is_set():
                self.process(self.poll())
                self.swap_model_if_ready()
                self.refresh_metrics()
        except (ProducerFenced, KafkaError) as exc:
            if not is_fenced(exc):
                raise
            log.error(
                "stopping: another instance took over transactional id %s, so this one is a zombie and"
                " exits (%r)",
                getattr(self.committer, "transactional_id", "?"),
                exc,
            )
            self._fenced = True
            if isinstance(self.committer, TransactionalCommitter):
                self.committer.fenced = True
            return EXIT_FENCED
        finally:
            self.close()
        return 0

    def process(self, records: Sequence[KafkaRecord]) -> None:
        """One batch: validate, dead-letter the bad, step the good, produce forecasts, commit when due."""
        batch = self.decoder.decode_batch(records)  # validation, before any state changes
        self.send_dead_letters(batch.invalid)
        self.send_forecasts(self.step(batch), batch)
        if self.committer.due():
            self.committer.commit()

    def poll(self) -> list[KafkaRecord]:
        """The next batch of records, all partitions together; notes the offsets to commit."""
        service = self.settings.service
        polled = self.consumer.poll(timeout_ms=service.poll_timeout_ms, max_records=service.max_poll_records)
        self._polling = True
        if self.exactly_once is not None and self.exactly_once.owner.catch_up():
            polled = {}  # state and positions went back to the last commit: these are consumed again
        self.committer.track(polled)
        records: list[KafkaRecord] = [record for part in polled.values() for record in part]
        self.metrics.records_consumed.inc(len(records))
        if records:
            self.metrics.batch_size.observe(len(records))
        return records

    def step(self, batch: DecodedBatch) -> Any:
        """The engine over the good values of the batch."""
        started = time.perf_counter()
        if self.exactly_once is not None:
            self.exactly_once.ledger.revive(batch.series)  # evicted series that came back resume
        out = self.engine.process(batch.series, batch.ts, batch.values)
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self.metrics.values_stepped.inc(len(out))
        self.metrics.values_duplicate.inc(out.duplicates)
        return out

    def send_forecasts(self, out: Any, batch: DecodedBatch) -> None:
        """Forecast records keyed by series id: one per stepped value, or one per input record."""
        if not len(out):
            return
        topic = self.settings.kafka.output_topic
        record = batch.record[out.index]  # (n,) which input record each forecast answers
        partition = np.array([r.partition for r in batch.records], dtype=np.int64)[record]
        offset = np.array([r.offset for r in batch.records], dtype=np.int64)[record]
        index = batch.index[out.index]  # (n,) position in the input record's window
        bounds = None if out.lower is None else Bounds(self.engine.intervals.labels, out.lower, out.upper)
        if self.settings.service.forecast_records == "window":
            keys, encoded = encode_forecast_groups(
                out.series, out.ts, out.version, out.forecasts, partition, offset, index, record, bounds
            )
        else:
            keys = out.series
            encoded = encode_forecasts(
                out.series, out.ts, out.version, out.forecasts, partition, offset, index, bounds
            )
        if self.exactly_once is not None:
            self.exactly_once.ledger.note(out.series, partition.tolist())  # each series' changelog partition
        send, in_flight = self.committer.producer.send, self.committer.in_flight
        for name, value in zip(keys, encoded, strict=True):
            in_flight.append(send(topic, key=name.encode(), value=value))
        created = np.array([r.timestamp for r in batch.records], dtype=np.float64)[record] / 1000.0
        latency = self.clock() - created[created >= 0]
        self.metrics.end_to_end_latency.observe_many(latency)
        self.metrics.forecasts_emitted.inc(len(out))

    def send_dead_letters(self, invalid: Sequence[tuple[KafkaRecord, InvalidRecord]]) -> None:
        """Each bad record to the dead-letter topic with its reason, counted; one log line per batch."""
        if not invalid:
            return
        topic = self.settings.kafka.deadletter_topic
        for record, error in invalid:
            self.committer.in_flight.append(
                self.committer.producer.send(topic, key=record.key, value=encode_dead_letter(record, error))
            )
            self.metrics.invalid(error.reason)
        examples = ", ".join(f"{e.reason} at {r.topic}[{r.partition}]@{r.offset}" for r, e in invalid[:3])
        log.warning("%d invalid record(s) sent to %s: %s", len(invalid), topic, examples)

    # ---- between batches -----------------------------------------------------------------------------

    def swap_model_if_ready(self) -> None:
        if self.swapper is None:
            return
        version = self.swapper.swap_if_ready(self.engine)
        if version is not None:
            self.metrics.set_model(version, self.engine.model.cell)

    def refresh_metrics(self, force: bool = False) -> None:
        """State figures and online error every ``refresh_seconds``; consumer lag every ``lag_interval_seconds``."""
        now, settings = time.monotonic(), self.settings.metrics
        if force or now >= self._next_refresh:
            self._next_refresh = now + settings.refresh_seconds
            engine = self.engine
            self.metrics.update_state(engine.resident, engine.evictions_total, engine.state_bytes)
            if self.exactly_once is not None:
                self.metrics.update_evicted(self.exactly_once.ledger.store.stats())
            self.metrics.online_error.update(engine.errors)
            self.metrics.coverage.update(engine.coverage)
            engine.evict_idle()
        if force or now >= self._next_lag:
            self._next_lag = now + settings.lag_interval_seconds
            self.metrics.set_lag(self.consumer_lag())

    def consumer_lag(self) -> dict[int, int]:
        """Records between the position and the end of each assigned partition (empty on broker trouble)."""
        assigned = list(self.consumer.assignment())
        if not assigned:
            return {}
        try:
            ends = self.consumer.end_offsets(assigned)
            return {
                tp.partition: max(0, ends[tp] - self.consumer.position(tp)) for tp in assigned if tp in ends
            }
        except KafkaError as exc:
            log.debug("consumer lag unavailable: %s", exc)
            return {}

    def ready(self) -> bool:
        """Polling with partitions assigned and restored (the ``/readyz`` answer)."""
        restoring = self.exactly_once is not None and bool(self.exactly_once.owner.to_restore)
        return (
            self._polling
            and not self._stopping.is_set()
            and bool(self.consumer.assignment())
            and not restoring
        )

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Topics, clients, model, metrics server and swapper, in that order."""
        settings, kafka = self.settings, self.settings.kafka
        exactly_once = settings.service.processing_guarantee == "exactly_once"
        if self.consumer is None or self.producer is None:
            wait_for_broker(kafka, timeout=kafka.request_timeout_ms / 1000.0)
        if kafka.auto_create_topics:
            created = create_missing_topics(
                kafka, (kafka.input_topic, kafka.output_topic, kafka.deadletter_topic)
            )
            if created:
                log.info("created topics %s", ", ".join(created))
        if exactly_once and (kafka.auto_create_topics or self.consumer is None):
            # compacted, as many partitions as the input, or a KafkaSetupError saying what differs
            ensure_changelog(kafka, kafka.input_topic, create=kafka.auto_create_topics)
        if self.engine is None:
            self.engine = build_engine(settings)
        if self.consumer is None:
            self.consumer = make_consumer(
                kafka,
                max_poll_records=settings.service.max_poll_records,
                session_timeout_ms=settings.service.session_timeout_ms,
                heartbeat_interval_ms=max(100, settings.service.session_timeout_ms // 3),
                **(consumer_options(settings) if exactly_once else {}),
            )
        if exactly_once:
            self.exactly_once = ExactlyOnce.build(
                settings, self.consumer, self.engine, self.metrics, producer=self.producer
            )
            self.committer = self.exactly_once.committer
            self.producer = self.committer.producer
            listener: Any = self.exactly_once.listener
        else:
            if self.producer is None:
                self.producer = make_producer(kafka, linger_ms=settings.service.linger_ms)
            self.committer = AtLeastOnceCommitter(
                self.consumer,
                self.producer,
                interval_ms=settings.service.commit_interval_ms,
                max_records=settings.service.commit_records,
                on_commit=lambda ok: ok and self.metrics.commits.inc(),
            )
            listener = _Rebalance(self)
        self._await_topic(kafka.input_topic, timeout=kafka.request_timeout_ms / 1000.0)
        self.consumer.subscribe([kafka.input_topic], listener=listener)
        self.metrics.set_model(self.engine.version, self.engine.model.cell)
        if self.swapper is None:
            self.swapper = ModelSwapper(
                settings.checkpoints.dir,
                self.engine.version,
                registry=self.metrics.registry,
                poll_seconds=settings.service.checkpoint_poll_seconds,
                device=self.engine.device,
                scaling=Scaling.from_settings(settings.scaling),
                window=settings.state.window,
                background_above=settings.service.background_rewarm_values,
            )
        self.swapper.start()
        if settings.metrics.port and self._server is None:
            series = None
            if settings.metrics.series_view_on:  # /series/<id>: answered by the engine between batches
                partitions = (
                    len(self.consumer.partitions_for_topic(kafka.input_topic) or ()) or kafka.partitions
                )
                series = SeriesLookup(self.engine, kafka.input_topic, partitions)
            self._server = MetricsServer(
                self.metrics.registry, settings.metrics.host, settings.metrics.port, self.ready, series=series
            )
            self._server.start()
            log.info("metrics on http://%s:%d/metrics", settings.metrics.host, self._server.port)
        log.info("serving %s -> %s (group %s)", kafka.input_topic, kafka.output_topic, kafka.group_id)

    def _await_topic(self, topic: str, timeout: float) -> None:
        """Join the group only once the input topic's partitions are known: a member that joins before
        sees no partitions, and would not look again until the next metadata refresh (minutes)."""
        deadline = time.monotonic() + timeout
        while not self.consumer.partitions_for_topic(topic):
            if time.monotonic() > deadline:
                raise KafkaSetupError(f"topic {topic} does not exist (or has no partitions) on the broker")
            time.sleep(0.1)

    def stop(self) -> None:
        """Ask the loop to finish the current batch and close (safe from a signal handler)."""
        self._stopping.set()

    def close(self) -> None:
        """Final flush and commit, then close the clients; the metrics server goes last."""
        self._stopping.set()
        timeout = self.settings.service.close_timeout_seconds
        try:
            if self.committer is not None and not self._fenced:
                self.committer.commit()
                self.refresh_metrics(force=True)
        finally:
            self._polling = False
            if self.swapper is not None:
                self.swapper.stop()
            if self.consumer is not None:
                self.consumer.close(autocommit=False)  # the listener commits (nothing left) and drops
            if self.exactly_once is not None:
                self.exactly_once.close(timeout)
            elif self.producer is not None:
                self.producer.close(timeout=timeout)
            if self._server is not None:
                self._server.stop()
                self._server = None
        log.info("stopped")


class _Rebalance(ConsumerRebalanceListener):
    """Commit what was processed before partitions move, so the next owner does not replay it."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        if revoked:
            self.service.committer.commit(wait=False)

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))
        self.service._next_lag = 0.0


def build_engine(settings: Settings) -> Engine:
    """The engine over the model the service starts with (``LATEST`` checkpoint, or a fresh ``init``)."""
    device = resolve_device(settings.state.device)
    model, version = initial_model(settings, device)
    return Engine.from_settings(model, settings, version=version, device=device)
