"""The process and platform collectors of prometheus_client, on an injected registry."""

from __future__ import annotations

from contextlib import suppress

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector


def register_process_collectors(registry: CollectorRegistry) -> None:
    """``process_*`` (CPU seconds, resident memory, open fds, start time) and ``python_info`` on ``registry``;
    a registry that has them already keeps the ones it has.

    >>> registry = CollectorRegistry()
    >>> register_process_collectors(registry); register_process_collectors(registry)
    >>> registry.get_sample_value("process_resident_memory_bytes") > 0
    True
    """
    for collector in (ProcessCollector, PlatformCollector):
        with suppress(ValueError):  # "Duplicated timeseries": registered before on this registry
            collector(registry=registry)
