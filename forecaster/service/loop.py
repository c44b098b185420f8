"""The streaming loop: poll -> decode -> engine -> produce -> commit, apart from its wiring.

``forecaster.service.build`` turns ``Settings`` into the parts (clients, engine, swapper, committer,
recovery); this module only runs them. Both guarantees run the same loop: the committer is one of two
kinds (``AtLeastOnceCommitter``: flush, then offsets; ``ExactlyOnceCommitter``: output, state changelog
and offsets in one transaction) and recovery is the exactly-once ``PartitionOwner`` (restore on assign,
reset after a failed transaction) or at least once's ``NoRecovery``. ``stop()`` (SIGTERM/SIGINT in the
CLI) lets the current batch finish, then commits and closes.

>>> Service.run.__doc__.split(";")[0]
'Serve until ``stop()``'
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from forecaster.config import Settings
from forecaster.engine.engine import Engine
from forecaster.errors import InvalidRecord, KafkaClientError, KafkaSetupError, ProducerFenced
from forecaster.metrics import MetricsServer, SeriesLookup, ServiceMetrics
from forecaster.records import (
    Bounds,
    DecodedBatch,
    KafkaRecord,
    RecordDecoder,
    dead_letter_max_bytes,
    encode_dead_letter,
    encode_forecast_groups,
    encode_forecasts,
)
from forecaster.service.clients import Consumer, Rebalance, TopicPartition
from forecaster.service.committer import Committer, is_fenced
from forecaster.service.health import Health
from forecaster.service.trial import Trial

log = logging.getLogger(__name__)

EXIT_FENCED = 3  # another instance took over this one's transactional id: a zombie stops
# A batch is processed in chunks of about this many input bytes (one chunk for most single-value batches;
# windowed records are split so that the time budget is checked between chunks).
CHUNK_BYTES = 1 << 20


def chunk_ends(records: Sequence[KafkaRecord], size: int) -> list[int]:
    """Where chunks of about ``size`` bytes of values end (at least one record each).

    >>> from types import SimpleNamespace as R
    >>> chunk_ends([R(value=b"x" * 600)] * 5, 1000)
    [2, 4, 5]
    """
    ends, held = [], 0
    for i, record in enumerate(records):
        held += len(record.value) if record.value else 0
        if held >= size:
            ends.append(i + 1)
            held = 0
    if not ends or ends[-1] != len(records):
        ends.append(len(records))
    return ends


class Service:
    """One member of the consumer group: Kafka in, forecasts out. Built by
    ``forecaster.service.build.build_service(settings)``; every part is injected.

    ``recovery`` has ``required``, ``rewinding``, ``run()``, ``rebalance`` (a ``Rebalance``) and
    ``close()``; ``ledger`` has ``note(series, partitions)`` and ``revive(series)``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine,
        consumer: Consumer,
        committer: Committer,
        recovery: Any,
        ledger: Any,
        swapper: Any,
        metrics: ServiceMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.consumer = consumer
        self.committer = committer
        self.recovery = recovery
        self.ledger = ledger
        self.swapper = swapper
        self.metrics = metrics or ServiceMetrics()
        self.trial = Trial(settings, engine, swapper, self.metrics.registry)
        self.clock = clock
        self.timer = time.perf_counter  # the batch time budget's clock
        self.decoder = RecordDecoder.from_settings(
            settings.service, clock=clock, positive=engine.scaling.positive
        )  # log scaling: values must be > 0
        # Not ready once the loop has not turned for 5 s (or two batch budgets): it waits on the broker.
        turn = max(5.0, 2.0 * settings.service.max_batch_ms / 1000.0)
        self.health = Health(settings.service.stall_seconds, turn_seconds=turn)
        self.health.restoring = lambda: bool(getattr(self.recovery, "to_restore", ()))
        self.rebalance = Rebalance(self._assigned, self._revoked, self._lost)
        self._stopping = threading.Event()
        self._fenced = False
        self._next_refresh = 0.0
        self._next_lag = 0.0
        self._polled = self._polled_at_lag = 0  # records polled in all, and when the lag was last taken
        self._server: MetricsServer | None = None

    # ---- the loop ------------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until ``stop()``; returns the exit status (0, or ``EXIT_FENCED`` for a zombie)."""
        self.start()
        try:
            while not self._stopping.is_set():
                if self.recovery.required:
                    self.recovery.run()
                    continue
                self.process(self.poll())
                self.swap_model_if_ready()
                self.refresh()
        except ProducerFenced as exc:
            log.error(
                "stopping: another instance took over transactional id %s, so this one is a zombie and"
                " exits (%s)",
                getattr(self.committer, "transactional_id", "?"),
                exc,
            )
            self._fenced = True
            return EXIT_FENCED
        finally:
            self.close()
        return 0

    def poll(self) -> list[KafkaRecord]:
        """The next batch of records, all partitions together."""
        service = self.settings.service
        started = time.monotonic()
        records = self.consumer.poll(service.max_poll_records, service.poll_timeout_ms / 1000.0)
        took = time.monotonic() - started
        if took > max(service.session_timeout_ms / 1000.0, 2.0 * service.poll_timeout_ms / 1000.0 + 1.0):
            # A poll of poll_timeout_ms that took longer than the session: the process was stopped or
            # starved meanwhile (heartbeats too). Said here whatever the client reports next (a lost
            # assignment, or only a rebalance).
            log.warning(
                "this member was stopped or starved for %.0f s, past its session timeout (%d ms): the group"
                " has probably moved its partitions; it takes part in the next rebalance",
                took,
                service.session_timeout_ms,
            )
        self.health.turned()
        if self.recovery.rewinding:
            return []  # a transaction failed meanwhile: positions go back to the last commit
        self.health.consumed(len(records))
        self._polled += len(records)
        return records

    def process(self, records: Sequence[KafkaRecord]) -> None:
        """One batch, in chunks of about ``CHUNK_BYTES``; past ``service.max_batch_ms`` the records left
        are put back (read again by the next poll), so a batch of large windows cannot hold the loop."""
        budget = self.settings.service.max_batch_ms / 1000.0
        started, lo = self.timer(), 0
        for hi in chunk_ends(records, CHUNK_BYTES):
            if lo and self.timer() - started >= budget:
                self.put_back(records[lo:])
                break
            self.process_chunk(records[lo:hi])
            lo = hi
        if self.committer.due():
            self.committer.commit(wait=False)

    def process_chunk(self, records: Sequence[KafkaRecord]) -> None:
        """Validate, dead-letter the bad, step the good, produce forecasts."""
        self.committer.track(records)  # their offsets commit with their output
        self.metrics.records_consumed.inc(len(records))
        if records:
            self.metrics.batch_size.observe(len(records))
        batch = self.decoder.decode_batch(records)  # validation, before any state changes
        self.send_dead_letters(batch.invalid)
        self.send_forecasts(self.step(batch), batch)

    def put_back(self, records: Sequence[KafkaRecord]) -> None:
        """Seek each partition back to the first of ``records`` (polled, not processed)."""
        first: dict[tuple[str, int], int] = {}
        for record in records:
            first.setdefault((record.topic, record.partition), record.offset)
        for (topic, partition), offset in first.items():
            self.consumer.seek(TopicPartition(topic, partition), offset)
        log.debug("batch over its time budget: %d records put back", len(records))

    def step(self, batch: DecodedBatch) -> Any:
        """The engine over the good values of the batch."""
        started = time.perf_counter()
        self.ledger.revive(batch.series)  # evicted series that came back resume
        self.trial.before(batch.series)  # shadow promotion: the challenger holds what the champion holds
        out = self.engine.process(batch.series, batch.ts, batch.values)
        self.trial.observe(batch.series, batch.ts, batch.values, out)  # stepped and scored, never sent
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self.metrics.values_stepped.inc(len(out))
        self.metrics.values_duplicate.inc(out.duplicates)
        self.metrics.values_clipped.inc(out.clipped)
        self.metrics.values_imputed.inc(out.imputed)
        self.metrics.gaps_restarted.inc(out.restarts)
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
                out.series,
                out.ts,
                out.version,
                out.forecasts,
                partition,
                offset,
                index,
                record,
                bounds,
                out.step_ms,
            )
        else:
            keys = out.series
            encoded = encode_forecasts(
                out.series, out.ts, out.version, out.forecasts, partition, offset, index, bounds, out.step_ms
            )
        self.ledger.note(out.series, partition.tolist())  # each series' changelog partition
        self.committer.send_many(topic, encoded, [name.encode() for name in keys])
        created = np.array([r.timestamp for r in batch.records], dtype=np.float64)[record] / 1000.0
        latency = self.clock() - created[created >= 0]
        self.metrics.end_to_end_latency.observe_many(latency)
        self.metrics.forecasts_emitted.inc(len(out))

    def send_dead_letters(self, invalid: Sequence[tuple[KafkaRecord, InvalidRecord]]) -> None:
        """Each bad record to the dead-letter topic with its reason, counted; one log line per batch."""
        if not invalid:
            return
        topic = self.settings.kafka.deadletter_topic
        limit = self.committer.producer.message_max_bytes
        for record, error in invalid:
            # cut to fit the producer's limit: the dead letter of a record near the input's limit fits
            value = encode_dead_letter(record, error, dead_letter_max_bytes(limit, record.key))
            self.committer.send(topic, value, record.key)
            self.metrics.invalid(error.reason)
        examples = ", ".join(f"{e.reason} at {r.topic}[{r.partition}]@{r.offset}" for r, e in invalid[:3])
        log.warning("%d invalid record(s) sent to %s: %s", len(invalid), topic, examples)

    # ---- between batches -----------------------------------------------------------------------------

    def swap_model_if_ready(self) -> None:
        version = self.swapper.swap_if_ready(self.engine)
        if version is not None:
            self.metrics.set_model(version, self.engine.model.cell)
        self.trial.tend(version)  # shadow promotion: start, decide or end a trial

    def refresh(self, force: bool = False) -> None:
        """State figures, online error and idle evictions every ``refresh_seconds``; consumer lag and the
        stall check every ``lag_interval_seconds``."""
        now, settings = time.monotonic(), self.settings.metrics
        if force or now >= self._next_refresh:
            self._next_refresh = now + settings.refresh_seconds
            engine = self.engine
            engine.evict_idle()  # exactly once: the committer writes them to the changelog when due
            self.metrics.update_state(engine.resident, engine.evictions_total, engine.state_bytes)
            self.metrics.update_choice(engine.choice_sources())
            self.metrics.update_periods(engine.period_counts())
            self.metrics.update_evicted(self.ledger.store.stats())
            self.metrics.online_error.update(engine.errors)
            self.metrics.coverage.update(engine.coverage)
            self.trial.refresh()
        if force or now >= self._next_lag:
            self._next_lag = now + settings.lag_interval_seconds
            lag = self.consumer_lag()
            self.health.lag(None if lag is None else sum(lag.values()))
            self.metrics.set_lag(lag or {})
            if not self._stopping.is_set():
                self.check_stall()

    def consumer_lag(self) -> dict[int, int] | None:
        """Records between the position and the end of each assigned partition (None: no answer)."""
        assigned = self.consumer.assignment()
        if not assigned:
            return {}
        timeout = min(2.0, self.settings.kafka.request_timeout_ms / 1000.0)
        # The ends the client's fetches saw cost no request; the broker is asked when the client cannot
        # tell, or when they show lag and nothing was consumed since the last look (a stall, or records of
        # transactions still open, which read_committed cannot consume yet: the broker's answer tells).
        idle, self._polled_at_lag = self._polled == self._polled_at_lag, self._polled
        try:
            at = self.consumer.position(assigned)
            ends = self.consumer.fetched_ends(assigned)
            if len(ends) < len(assigned) or idle and any(ends[tp] > at.get(tp, 0) for tp in assigned):
                ends = self.consumer.end_offsets(assigned, timeout)
            unknown = [tp for tp in assigned if tp not in at]  # nothing consumed since assigned
            if unknown:
                at.update(
                    {tp: offset or 0 for tp, offset in self.consumer.committed(unknown, timeout).items()}
                )
        except KafkaClientError as exc:
            log.debug("consumer lag unavailable: %s", exc)
            return None
        return {tp[1]: max(0, ends[tp] - at.get(tp, 0)) for tp in assigned if tp in ends}

    def check_stall(self) -> None:
        """A stalled member says so once, is counted, fails ``/healthz`` and rejoins the group."""
        why = self.health.check()
        if why is None:
            return
        if self.health.stall(why):
            self.metrics.stalls.inc()
            log.error(
                "stalled: this member %s; /healthz reports unhealthy until it consumes again, and it"
                " leaves the group and joins again now",
                why,
            )
        self.rejoin()

    def rejoin(self) -> None:
        """Leave the group and join again; what was held counts as lost (exactly once: the open
        transaction is aborted and those partitions restore from the changelog when assigned again)."""
        held = self.consumer.assignment()
        if held:
            self.recovery.rebalance.on_lost(held)
            self.health.lost(held)
        self.consumer.unsubscribe()
        self.consumer.subscribe(self.settings.kafka.input_topic, self.rebalance)

    def ready(self) -> bool:
        """The ``/readyz`` answer (see ``forecaster.service.health``)."""
        return self.health.ready()

    def healthy(self) -> bool:
        """The ``/healthz`` answer."""
        return self.health.healthy()

    # ---- the group -------------------------------------------------------------------------------------

    def _assigned(self, tps: list[TopicPartition]) -> None:
        if tps:
            log.info("assigned partitions %s", sorted(tp[1] for tp in tps))
        self.recovery.rebalance.on_assign(tps)
        self.health.assigned(tps)
        self._next_lag = 0.0

    def _revoked(self, tps: list[TopicPartition]) -> None:
        self.recovery.rebalance.on_revoke(tps)
        self.health.revoked(tps)

    def _lost(self, tps: list[TopicPartition]) -> None:
        log.warning(
            "lost partitions %s: the group went on without this member (its session expired or the broker"
            " dropped it); their uncommitted work is given up, and the member joins the group again",
            sorted(tp[1] for tp in tps),
        )
        self.recovery.rebalance.on_lost(tps)
        self.health.lost(tps)

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Metrics endpoint, input topic known, subscribe, model watcher."""
        settings, kafka = self.settings, self.settings.kafka
        if settings.metrics.port and self._server is None:
            series = None
            if settings.metrics.series_view_on:  # /series/<id>: answered by the engine between batches
                timeout = kafka.request_timeout_ms / 1000.0
                partitions = len(self.consumer.partitions_for(kafka.input_topic, timeout)) or kafka.partitions
                series = SeriesLookup(self.engine, kafka.input_topic, partitions)
            self._server = MetricsServer(
                self.metrics.registry,
                settings.metrics.host,
                settings.metrics.port,
                self.ready,
                healthy=self.healthy,
                series=series,
            )
            self._server.start()
            log.info("metrics on http://%s:%d/metrics", settings.metrics.host, self._server.port)
        # Join the group only once the input topic's partitions are known: a member that joins before
        # sees no partitions, and would not look again until the next metadata refresh (minutes).
        if not self.consumer.partitions_for(kafka.input_topic, kafka.request_timeout_ms / 1000.0):
            raise KafkaSetupError(
                f"topic {kafka.input_topic} does not exist (or has no partitions) on the broker"
            )
        self.consumer.subscribe(kafka.input_topic, self.rebalance)
        self.metrics.set_model(self.engine.version, self.engine.model.cell)
        self.swapper.start()
        log.info(
            "serving %s -> %s (group %s, %s, %s)",
            kafka.input_topic,
            kafka.output_topic,
            kafka.group_id,
            settings.service.processing_guarantee.replace("_", " "),
            self.consumer.name,
        )

    def stop(self) -> None:
        """Ask the loop to finish the current batch and close (safe from a signal handler)."""
        self._stopping.set()
        self.health.stopping = True

    def close(self) -> None:
        """Final commit, then close the clients; the metrics server goes last."""
        self.stop()
        timeout = self.settings.service.close_timeout_seconds
        try:
            if not self._fenced:
                self.committer.commit()
                self.refresh(force=True)
        finally:
            self.health.polling = False
            self.swapper.stop()
            try:
                self.consumer.close()  # leaving the group revokes: the committer has nothing left to commit
            except (
                Exception
            ) as exc:  # a zombie's revoke may meet its fenced producer (wrapped by the library)
                if not (self._fenced or is_fenced(exc)):
                    raise
                self._fenced = True
                log.debug("closing the consumer of a fenced instance: %r", exc)
            self.committer.close(timeout)
            self.recovery.close()
            if self._server is not None:
                self._server.stop()
                self._server = None
        log.info("stopped")
