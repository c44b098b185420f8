"""The Kafka service: the loop (poll, engine, produce, commit), its wiring, the clients, the committers."""

from forecaster.service.build import build_service
from forecaster.service.loop import Service

__all__ = ["Service", "build_service"]
