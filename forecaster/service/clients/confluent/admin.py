"""The admin client on confluent-kafka: cluster metadata, topic descriptions and configs, topic creation and
deletion."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from forecaster.config import KafkaSettings
from forecaster.service.clients.base import Admin, TopicInfo
from forecaster.service.clients.confluent.config import _Connection, connection_config, translate

log = logging.getLogger(__name__)


class ConfluentAdmin(Admin):
    name = "confluent"

    def __init__(self, settings: KafkaSettings, timeout: float | None = None) -> None:
        self.connection = _Connection("admin")
        try:
            self._a = AdminClient({**connection_config(settings), **self.connection.callbacks()})
        except KafkaException as exc:
            raise translate(exc, "create an admin client") from exc

    def _metadata(self, timeout: float) -> Any:
        try:
            return self._a.list_topics(timeout=timeout)
        except KafkaException as exc:
            self._a.poll(0)  # serve the error callback: it may say why (credentials, certificate)
            raise translate(exc, "read the cluster metadata") from exc

    def brokers(self, timeout: float) -> int:
        return len(self._metadata(timeout).brokers)

    def list_topics(self, timeout: float) -> set[str]:
        return set(self._metadata(timeout).topics)

    def describe(
        self, names: Sequence[str], config_keys: Sequence[str], timeout: float
    ) -> dict[str, TopicInfo]:
        metadata = self._metadata(timeout)
        found = {
            name: len(metadata.topics[name].partitions)
            for name in names
            if name in metadata.topics and metadata.topics[name].error is None
        }
        configs: dict[str, dict[str, str]] = {name: {} for name in found}
        if config_keys and found:
            futures = self._a.describe_configs(
                [ConfigResource(ConfigResource.Type.TOPIC, name) for name in found], request_timeout=timeout
            )
            for resource, future in futures.items():
                try:
                    entries = future.result()
                except KafkaException as exc:
                    raise translate(exc, f"describe the configs of {resource.name}") from exc
                configs[resource.name] = {
                    key: entries[key].value
                    for key in config_keys
                    if key in entries and entries[key].value is not None
                }
        return {name: TopicInfo(name, count, configs[name]) for name, count in found.items()}

    def create(
        self, name: str, partitions: int, replication_factor: int, config: Mapping[str, str], timeout: float
    ) -> bool:
        topic = NewTopic(name, partitions, replication_factor, config={k: str(v) for k, v in config.items()})
        future = self._a.create_topics([topic], operation_timeout=timeout, request_timeout=timeout)[name]
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                return False
            raise translate(exc, f"create topic {name}") from exc
        deadline = time.monotonic() + timeout  # visible in the metadata before anyone uses it
        while time.monotonic() < deadline:
            topic_metadata = self._metadata(timeout).topics.get(name)
            if topic_metadata is not None and topic_metadata.error is None and topic_metadata.partitions:
                break
            time.sleep(0.05)
        return True

    def delete(self, names: Sequence[str], timeout: float) -> None:
        if not names:
            return
        for name, future in self._a.delete_topics(list(names), operation_timeout=timeout).items():
            try:
                future.result()
            except KafkaException as exc:
                log.debug("delete topic %s: %r", name, exc)

    def close(self) -> None:
        """Nothing to close (the admin client's threads end with the object)."""
