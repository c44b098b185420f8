"""The consumer on kafka-python: group membership through a rebalance listener, polling, seeking, offsets and
commits (a commit from inside the listener does not wait)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka import TopicPartition as _TP
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from forecaster.config import KafkaSettings
from forecaster.service.clients.base import Consumer, ConsumerOptions, Rebalance, Record, TopicPartition
from forecaster.service.clients.kafkapython.config import connection_options, translate


def _tps(tps: Sequence[TopicPartition]) -> list[_TP]:
    return [_TP(tp[0], tp[1]) for tp in tps]


class _Listener(ConsumerRebalanceListener):
    def __init__(self, owner: KafkaPythonConsumer, rebalance: Rebalance) -> None:
        self.owner = owner
        self.rebalance = rebalance

    def _call(self, callback: Callable[[list[TopicPartition]], None], tps: Any) -> None:
        self.owner.in_rebalance = True
        try:
            callback([TopicPartition(tp.topic, tp.partition) for tp in tps])
        finally:
            self.owner.in_rebalance = False

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._call(self.rebalance.on_revoke, revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self._call(self.rebalance.on_assign, assigned)

    def on_partitions_lost(self, lost: Any) -> None:
        self._call(self.rebalance.on_lost, lost)


class KafkaPythonConsumer(Consumer):
    name = "kafka-python"

    def __init__(self, settings: KafkaSettings, options: ConsumerOptions) -> None:
        kwargs: dict[str, Any] = {
            **connection_options(settings, options.client_id),
            "group_id": options.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": options.auto_offset_reset,
            "isolation_level": options.isolation_level,
            "session_timeout_ms": options.session_timeout_ms,
            "heartbeat_interval_ms": options.heartbeat_interval_ms
            or max(100, options.session_timeout_ms // 3),
            "max_poll_interval_ms": options.max_poll_interval_ms,
            "fetch_max_wait_ms": options.fetch_wait_max_ms,
            "fetch_min_bytes": options.fetch_min_bytes,
            "max_partition_fetch_bytes": options.max_partition_fetch_bytes,
            "fetch_max_bytes": options.fetch_max_bytes,
        }
        if options.group_id is not None and options.cooperative:
            kwargs["partition_assignment_strategy"] = [CooperativeStickyAssignor()]
        try:
            self._c = KafkaConsumer(**kwargs)
        except KafkaError as exc:
            raise translate(exc, "create a consumer") from exc
        self.in_rebalance = False  # a commit from inside the listener must not wait (see ``commit``)

    def subscribe(self, topic: str, rebalance: Rebalance) -> None:
        self._c.subscribe([topic], listener=_Listener(self, rebalance))

    def unsubscribe(self) -> None:
        self._c.unsubscribe()

    def assign(self, start: Mapping[TopicPartition, int | None]) -> None:
        self._c.assign(_tps(list(start)))
        for tp, offset in start.items():
            self.seek(tp, offset)

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition) for tp in self._c.assignment()]

    def group_metadata(self) -> Any:
        return self._c.group_metadata()

    def generation(self) -> int | None:
        return getattr(self._c.group_metadata(), "generation_id", None)

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        try:
            polled = self._c.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        except KafkaError as exc:
            raise translate(exc, "poll") from exc
        # kafka-python's ConsumerRecord has the attributes of ``Record``: no copy.
        return [record for part in polled.values() for record in part]

    def pause(self, tps: Sequence[TopicPartition]) -> None:
        if tps:
            self._c.pause(*_tps(tps))

    def resume(self, tps: Sequence[TopicPartition]) -> None:
        if tps:
            self._c.resume(*_tps(tps))

    def seek(self, tp: TopicPartition, offset: int | None) -> None:
        if offset is None:
            self._c.seek_to_beginning(_TP(tp[0], tp[1]))
        else:
            self._c.seek(_TP(tp[0], tp[1]), offset)

    def position(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        try:
            return {TopicPartition(tp[0], tp[1]): self._c.position(_TP(tp[0], tp[1])) for tp in tps}
        except KafkaError as exc:
            raise translate(exc, "read positions") from exc

    def committed(self, tps: Sequence[TopicPartition], timeout: float) -> dict[TopicPartition, int | None]:
        try:
            return {TopicPartition(tp[0], tp[1]): self._c.committed(_TP(tp[0], tp[1])) for tp in tps}
        except KafkaError as exc:
            raise translate(exc, "read committed offsets") from exc

    def end_offsets(self, tps: Sequence[TopicPartition], timeout: float) -> dict[TopicPartition, int]:
        return self._offsets(self._c.end_offsets, tps, "end")

    def beginning_offsets(self, tps: Sequence[TopicPartition], timeout: float) -> dict[TopicPartition, int]:
        return self._offsets(self._c.beginning_offsets, tps, "beginning")

    @staticmethod
    def _offsets(
        ask: Callable[[Any], dict], tps: Sequence[TopicPartition], which: str
    ) -> dict[TopicPartition, int]:
        try:
            found = ask(_tps(tps))
        except KafkaError as exc:
            raise translate(exc, f"read {which} offsets") from exc
        return {TopicPartition(tp.topic, tp.partition): offset for tp, offset in found.items()}

    def partitions_for(self, topic: str, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:  # None until the metadata of the topic arrived
            found = self._c.partitions_for_topic(topic)
            if found or time.monotonic() >= deadline:
                return sorted(found or [])
            time.sleep(0.1)

    def commit(self, offsets: Mapping[TopicPartition, int], wait: bool = True) -> None:
        stored = {_TP(tp[0], tp[1]): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
        if not wait or self.in_rebalance:  # the listener runs inside poll: a blocking commit is not allowed
            self._c.commit_async(stored, callback=self._answered)
            return
        try:
            self._c.commit(stored)
        except KafkaError as exc:
            raise translate(exc, "commit offsets") from exc

    def _answered(self, offsets: Any, result: Any) -> None:
        failed = isinstance(result, Exception)
        self.commit_answered(not failed, repr(result) if failed else "")

    def close(self) -> None:
        self._c.close(autocommit=False)
