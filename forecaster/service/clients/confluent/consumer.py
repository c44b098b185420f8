"""The consumer on confluent-kafka: group membership and rebalance callbacks, polling, seeking, offsets and
commits (a commit that does not wait is answered through ``poll``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID, KafkaError, KafkaException
from confluent_kafka import Consumer as _Consumer
from confluent_kafka import TopicPartition as _TP

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaClientError
from forecaster.service.clients.base import Consumer, ConsumerOptions, Rebalance, Record, TopicPartition
from forecaster.service.clients.confluent.config import _Connection, connection_config, translate

log = logging.getLogger(__name__)


def _tps(tps: Sequence[TopicPartition]) -> list[_TP]:
    return [_TP(tp[0], tp[1]) for tp in tps]


class ConfluentConsumer(Consumer):
    name = "confluent"

    def __init__(self, settings: KafkaSettings, options: ConsumerOptions) -> None:
        self.connection = _Connection(f"consumer {options.group_id or 'reader'}")
        config = {
            **connection_config(settings, options.client_id),
            # librdkafka wants a group id even for a reader; a reader never joins or commits.
            "group.id": options.group_id or f"{settings.client_id}-reader",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": options.auto_offset_reset,
            "isolation.level": options.isolation_level,
            "session.timeout.ms": options.session_timeout_ms,
            "heartbeat.interval.ms": options.heartbeat_interval_ms
            or max(100, options.session_timeout_ms // 3),
            "max.poll.interval.ms": options.max_poll_interval_ms,
            "fetch.wait.max.ms": options.fetch_wait_max_ms,
            "fetch.min.bytes": options.fetch_min_bytes,
            "max.partition.fetch.bytes": options.max_partition_fetch_bytes,
            "fetch.max.bytes": options.fetch_max_bytes,
            "receive.message.max.bytes": options.fetch_max_bytes + (1 << 20),
            "partition.assignment.strategy": "cooperative-sticky" if options.cooperative else "range",
            "on_commit": self._answered,
            **self.connection.callbacks(logged=options.group_id is not None),
        }
        try:
            self._c = _Consumer(config)
        except KafkaException as exc:
            raise translate(exc, "create a consumer") from exc
        self._rebalance = Rebalance()
        self.cooperative = options.cooperative

    def subscribe(self, topic: str, rebalance: Rebalance) -> None:
        self._rebalance = rebalance
        self._topic = topic

        def assigned(consumer: Any, parts: list[_TP]) -> None:
            # Assign first, so that what the callback does (pause) applies to assigned partitions.
            if self.cooperative:
                consumer.incremental_assign(parts)
            else:
                consumer.assign(parts)
            rebalance.on_assign([TopicPartition(p.topic, p.partition) for p in parts])

        def revoked(consumer: Any, parts: list[_TP]) -> None:
            rebalance.on_revoke([TopicPartition(p.topic, p.partition) for p in parts])

        def lost(consumer: Any, parts: list[_TP]) -> None:
            rebalance.on_lost([TopicPartition(p.topic, p.partition) for p in parts])

        self._c.subscribe([topic], on_assign=assigned, on_revoke=revoked, on_lost=lost)

    def unsubscribe(self) -> None:
        self._c.unsubscribe()

    def assign(self, start: Mapping[TopicPartition, int | None]) -> None:
        self._c.assign(
            [
                _TP(tp[0], tp[1], OFFSET_BEGINNING if offset is None else offset)
                for tp, offset in start.items()
            ]
        )

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition) for p in self._c.assignment()]

    def group_metadata(self) -> Any:
        return self._c.consumer_group_metadata()

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        # Wait for the first message only, then take what is already fetched: ``consume`` alone would
        # wait the whole timeout for a full batch, which is latency when traffic is light.
        try:
            first = self._c.poll(timeout)
            if first is None:
                return []
            messages = [first]
            if max_records > 1:
                messages += self._c.consume(num_messages=max_records - 1, timeout=0)
        except KafkaException as exc:
            raise translate(exc, "poll") from exc
        out = []
        for m in messages:
            error = m.error()
            if error is not None:
                self.connection.error(error)
                continue
            out.append(Record(m.topic(), m.partition(), m.offset(), m.timestamp()[1], m.key(), m.value()))
        if out:
            self.connection.up()
        return out

    def pause(self, tps: Sequence[TopicPartition]) -> None:
        if tps:
            self._c.pause(_tps(tps))

    def resume(self, tps: Sequence[TopicPartition]) -> None:
        if tps:
            self._c.resume(_tps(tps))

    def seek(self, tp: TopicPartition, offset: int | None) -> None:
        target = _TP(tp[0], tp[1], OFFSET_BEGINNING if offset is None else offset)
        try:
            self._c.seek(target)
        except KafkaException:
            # A partition whose fetcher has not started yet (just assigned, paused) cannot seek: assign
            # it again at the offset instead (local to this member; the group assignment is unchanged).
            self._c.incremental_unassign([_TP(tp[0], tp[1])])
            self._c.incremental_assign([target])

    def position(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {
            TopicPartition(p.topic, p.partition): p.offset
            for p in self._c.position(_tps(tps))
            if p.offset >= 0
        }

    def committed(self, tps: Sequence[TopicPartition], timeout: float) -> dict[TopicPartition, int | None]:
        try:
            parts = self._c.committed(_tps(tps), timeout=timeout)
        except KafkaException as exc:
            raise translate(exc, "read committed offsets") from exc
        return {
            TopicPartition(p.topic, p.partition): (
                None if p.offset == OFFSET_INVALID or p.offset < 0 else p.offset
            )
            for p in parts
        }

    def _watermarks(
        self, tps: Sequence[TopicPartition], timeout: float, high: bool
    ) -> dict[TopicPartition, int]:
        out = {}
        for tp in tps:
            try:
                low_high = self._c.get_watermark_offsets(_TP(tp[0], tp[1]), timeout=timeout, cached=False)
            except KafkaException as exc:
                raise translate(exc, f"read the offsets of {tp[0]}[{tp[1]}]") from exc
            if low_high is None:
                raise KafkaClientError("timeout", f"no offsets for {tp[0]}[{tp[1]}] within {timeout:g} s")
            out[TopicPartition(tp[0], tp[1])] = low_high[1] if high else low_high[0]
        self.connection.up()
        return out

    def fetched_ends(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """librdkafka's high watermark of each partition from its latest fetch response (no request; a
        request would queue behind the fetch the broker holds, up to ``fetch.wait.max.ms`` each). Empty
        while librdkafka reports the brokers down (until a request is answered again)."""
        if self.connection.down:
            return {}
        out = {}
        for tp in tps:
            _, high = self._c.get_watermark_offsets(_TP(tp[0], tp[1]), cached=True)
            if high >= 0:
                out[TopicPartition(tp[0], tp[1])] = high
        return out

    def end_offsets(self, tps: Sequence[TopicPartition], timeout: float) -> dict[TopicPartition, int]:
        return self._watermarks(tps, timeout, high=True)

    def beginning_offsets(self, tps: Sequence[TopicPartition], timeout: float) -> dict[TopicPartition, int]:
        return self._watermarks(tps, timeout, high=False)

    def partitions_for(self, topic: str, timeout: float) -> list[int]:
        try:
            metadata = self._c.list_topics(topic, timeout=timeout)
        except KafkaException as exc:
            raise translate(exc, f"read the metadata of {topic}") from exc
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            return []
        return sorted(found.partitions)

    def commit(self, offsets: Mapping[TopicPartition, int], wait: bool = True) -> None:
        parts = [_TP(tp[0], tp[1], offset) for tp, offset in offsets.items()]
        try:
            self._c.commit(offsets=parts, asynchronous=not wait)
        except KafkaException as exc:
            raise translate(exc, "commit offsets") from exc

    def _answered(self, error: KafkaError | None, parts: list[_TP]) -> None:
        """librdkafka's answer to a commit that did not wait (served by ``poll``)."""
        failed = error is not None or any(p.error is not None for p in parts or ())
        detail = error.str() if error is not None else "; ".join(str(p.error) for p in parts if p.error)
        self.commit_answered(not failed, detail if failed else "")

    def close(self) -> None:
        try:
            self._c.close()
        except (KafkaException, RuntimeError) as exc:
            log.debug("closing the consumer: %r", exc)
