"""Metrics: names, the bulk histogram, the online error summaries, and the HTTP endpoints."""

from __future__ import annotations

import gzip
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from forecaster.metrics import LATENCY_BUCKETS, BulkHistogram, MetricsServer, ServiceMetrics, TrainerMetrics


def stats(count, sum_abs, sum_sq):
    return SimpleNamespace(count=count, sum_abs=sum_abs, sum_sq=sum_sq)


def test_a_fresh_registry_by_default_never_the_global_one():
    before = set(REGISTRY._names_to_collectors)
    a, b = ServiceMetrics(), ServiceMetrics()  # two instances would collide on one shared registry
    assert a.registry is not b.registry and a.registry is not REGISTRY
    assert set(REGISTRY._names_to_collectors) == before


def test_latency_buckets_span_100us_to_10s_with_the_25ms_goal():
    assert min(LATENCY_BUCKETS) == pytest.approx(1e-4) and max(LATENCY_BUCKETS) == pytest.approx(10.0)
    assert 0.025 in LATENCY_BUCKETS and list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)


def test_bulk_histogram_matches_counting_by_hand():
    registry = CollectorRegistry()
    h = BulkHistogram("x_seconds", "x", buckets=(0.1, 1.0, 10.0), registry=registry)
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 20, 1000)
    values[:3] = [0.1, 1.0, 10.0]  # values on a bound belong to that bound (le is inclusive)
    h.observe_many(values[:500])
    h.observe_many(values[500:])
    for bound in (0.1, 1.0, 10.0):
        assert registry.get_sample_value("x_seconds_bucket", {"le": str(bound)}) == np.sum(values <= bound)
    assert registry.get_sample_value("x_seconds_bucket", {"le": "+Inf"}) == 1000
    assert registry.get_sample_value("x_seconds_count") == 1000
    assert registry.get_sample_value("x_seconds_sum") == pytest.approx(values.sum())


def test_online_error_adds_engine_deltas_per_version_and_survives_a_reset():
    m = ServiceMetrics(CollectorRegistry())
    m.online_error.update({"v1": stats(2, 3.0, 5.0)})
    m.online_error.update({"v1": stats(5, 4.0, 9.0), "v2": stats(1, 0.5, 0.25)})
    m.online_error.update({"v1": stats(1, 1.0, 1.0)})  # a new engine counts from zero again
    get = m.registry.get_sample_value
    assert get("forecaster_forecast_abs_error_count", {"model_version": "v1"}) == 6
    assert get("forecaster_forecast_abs_error_sum", {"model_version": "v1"}) == 5.0
    assert get("forecaster_forecast_squared_error_sum", {"model_version": "v1"}) == 10.0
    assert get("forecaster_forecast_squared_error_count", {"model_version": "v2"}) == 1
    assert get("forecaster_forecast_abs_error_sum", {"model_version": "v2"}) == 0.5


def test_model_info_names_only_the_current_model():
    m = ServiceMetrics(CollectorRegistry())
    m.set_model("init", "gru")
    m.set_model("v2", "gru")
    assert m.registry.get_sample_value("forecaster_model_info", {"version": "v2", "cell": "gru"}) == 1
    assert m.registry.get_sample_value("forecaster_model_info", {"version": "init", "cell": "gru"}) is None


def test_state_figures_and_evictions_from_a_cumulative_count():
    m = ServiceMetrics(CollectorRegistry())
    m.update_state(resident=10, evictions_total=3, state_bytes=4096)
    m.update_state(resident=8, evictions_total=5, state_bytes=4096)
    get = m.registry.get_sample_value
    assert get("forecaster_series_resident") == 8
    assert get("forecaster_state_evictions_total") == 5
    assert get("forecaster_state_bytes") == 4096


def test_lag_keeps_only_assigned_partitions():
    m = ServiceMetrics(CollectorRegistry())
    m.set_lag({0: 5, 1: 0})
    m.set_lag({1: 7})
    assert m.registry.get_sample_value("forecaster_consumer_lag", {"partition": "1"}) == 7
    assert m.registry.get_sample_value("forecaster_consumer_lag", {"partition": "0"}) is None


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_http_endpoints():
    m = ServiceMetrics(CollectorRegistry())
    m.records_consumed.inc(7)
    ready = {"now": False}
    server = MetricsServer(m.registry, host="127.0.0.1", port=0, ready=lambda: ready["now"]).start()
    try:
        status, body = fetch(server.port, "/metrics")
        assert status == 200 and "forecaster_records_consumed_total 7.0" in body
        assert fetch(server.port, "/healthz")[0] == 200
        assert fetch(server.port, "/readyz")[0] == 503
        ready["now"] = True
        assert fetch(server.port, "/readyz")[0] == 200
        assert fetch(server.port, "/nope")[0] == 404
    finally:
        server.stop()


def test_metrics_through_prometheus_clients_wsgi_app_gzip_and_openmetrics():
    m = ServiceMetrics(CollectorRegistry())
    m.records_consumed.inc(2)
    server = MetricsServer(m.registry, host="127.0.0.1", port=0).start()
    try:
        base = f"http://127.0.0.1:{server.port}/metrics"
        request = urllib.request.Request(base, headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.headers["Content-Encoding"] == "gzip"
            assert b"forecaster_records_consumed_total 2.0" in gzip.decompress(answer.read())
        request = urllib.request.Request(
            base, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
            body = answer.read().decode()
            assert "forecaster_records_consumed_total 2.0" in body and body.endswith("# EOF\n")
        with urllib.request.urlopen(base, timeout=5) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain")
    finally:
        server.stop()


def test_process_and_platform_collectors_are_on_the_injected_registry():
    registry = CollectorRegistry()
    ServiceMetrics(registry)
    TrainerMetrics(registry)  # a second owner of the same registry does not register them twice
    assert registry.get_sample_value("process_resident_memory_bytes") > 0
    assert registry.get_sample_value("process_cpu_seconds_total") >= 0
    assert any(metric.name == "python_info" for metric in registry.collect())
    trainer = TrainerMetrics(CollectorRegistry())
    assert trainer.registry.get_sample_value("process_open_fds") > 0


def test_healthz_follows_the_healthy_callable():
    healthy = {"now": True}
    server = MetricsServer(
        CollectorRegistry(), host="127.0.0.1", port=0, healthy=lambda: healthy["now"]
    ).start()
    try:
        assert fetch(server.port, "/healthz") == (200, "ok\n")
        assert fetch(server.port, "/readyz")[0] == 200  # no ready callable: ready
        healthy["now"] = False
        assert fetch(server.port, "/healthz") == (503, "not healthy\n")
    finally:
        server.stop()
