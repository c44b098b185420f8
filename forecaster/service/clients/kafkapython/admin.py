"""The admin client on kafka-python: the cluster's brokers, topic descriptions and configs, topic creation
and deletion."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError

from forecaster.config import KafkaSettings
from forecaster.errors import KafkaClientError
from forecaster.service.clients.base import Admin, TopicInfo
from forecaster.service.clients.kafkapython.config import connection_options, translate

log = logging.getLogger(__name__)


class KafkaPythonAdmin(Admin):
    name = "kafka-python"

    def __init__(self, settings: KafkaSettings, timeout: float | None = None) -> None:
        extra = {} if timeout is None else {"bootstrap_timeout_ms": max(int(timeout * 1000), 1000)}
        try:
            self._a = KafkaAdminClient(**connection_options(settings), **extra)
        except KafkaError as exc:
            raise translate(exc, "create an admin client") from exc

    def brokers(self, timeout: float) -> int:
        try:
            return len(self._a.describe_cluster().get("brokers") or [])
        except KafkaError as exc:
            raise translate(exc, "describe the cluster") from exc

    def list_topics(self, timeout: float) -> set[str]:
        try:
            return set(self._a.list_topics())
        except KafkaError as exc:
            raise translate(exc, "list topics") from exc

    def describe(
        self, names: Sequence[str], config_keys: Sequence[str], timeout: float
    ) -> dict[str, TopicInfo]:
        try:
            counts = {}
            for topic in self._a.describe_topics(list(names)):
                if topic["error_code"] == UnknownTopicOrPartitionError.errno:
                    continue
                if topic["error_code"] != 0:
                    raise KafkaClientError(
                        "other", f"cannot describe topic {topic['name']}: error {topic['error_code']}"
                    )
                counts[topic["name"]] = len(topic["partitions"])
            configs: dict[str, dict[str, str]] = {name: {} for name in counts}
            if config_keys and counts:
                resources = [
                    ConfigResource(ConfigResourceType.TOPIC, name, {key: None for key in config_keys})
                    for name in counts
                ]
                described = self._a.describe_configs(resources, config_filter="all")["topic"]
                for name in counts:
                    entries = described.get(name, {})
                    configs[name] = {key: entries[key]["value"] for key in config_keys if key in entries}
        except KafkaError as exc:
            raise translate(exc, f"describe topics {', '.join(names)}") from exc
        return {name: TopicInfo(name, count, configs[name]) for name, count in counts.items()}

    def create(
        self, name: str, partitions: int, replication_factor: int, config: Mapping[str, str], timeout: float
    ) -> bool:
        request = {
            name: {
                "num_partitions": partitions,
                "replication_factor": replication_factor,
                "configs": {key: str(value) for key, value in config.items()},
            }
        }
        try:
            self._a.create_topics(request, timeout_ms=int(timeout * 1000))
        except TopicAlreadyExistsError:
            return False
        except KafkaError as exc:
            raise translate(exc, f"create topic {name}") from exc
        try:
            self._a.wait_for_topics([name], timeout_ms=int(timeout * 1000))
        except KafkaError as exc:
            raise translate(exc, f"wait for topic {name}") from exc
        return True

    def delete(self, names: Sequence[str], timeout: float) -> None:
        if names:
            try:
                self._a.delete_topics(list(names), timeout_ms=int(timeout * 1000))
            except KafkaError as exc:
                log.debug("delete topics %s: %r", names, exc)

    def close(self) -> None:
        self._a.close()
