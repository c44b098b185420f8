"""/series/<id> and /series/<id>/view: the engine's state of one series, read between batches, escaped."""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from forecaster.config import MetricsSettings
from forecaster.engine import Engine, ask_series, series_state
from forecaster.engine.view import SeriesState
from forecaster.metrics import MetricsServer, SeriesLookup, kafka_partition
from forecaster.metrics.series import murmur2
from forecaster.model import RecurrentForecaster

WINDOW, HORIZON = 8, 3
HOUR = 3_600_000


class Loop:
    """Steps the engine on its own thread, as the service's loop does: the batches ``feed`` hands it, and
    empty ones when there is nothing (an idle poll)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batches: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                batch, done = self.batches.get(timeout=0.005)
            except queue.Empty:
                self.engine.process([], [], [])
                continue
            done.put(self.engine.process(*batch))

    def feed(self, series: list[str], ts: list[int], values: list[float]):
        done: queue.Queue = queue.Queue()
        self.batches.put(((series, ts, values), done))
        return done.get(timeout=10)


@pytest.fixture
def engine() -> Engine:
    return Engine(RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=HORIZON), window=WINDOW)


@pytest.fixture
def served(engine: Engine) -> Iterator[tuple[MetricsServer, Loop]]:
    loop = Loop(engine)
    loop.thread.start()
    lookup = SeriesLookup(engine, topic="ts.input", partitions=6, timeout=5.0)
    server = MetricsServer(CollectorRegistry(), host="127.0.0.1", port=0, series=lookup).start()
    try:
        yield server, loop
    finally:
        server.stop()
        loop.stopping.set()
        loop.thread.join(5)


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def url(series: str, view: bool = False) -> str:
    return "/series/" + urllib.parse.quote(series, safe="") + ("/view" if view else "")


def test_json_is_the_engines_state_of_the_series(engine: Engine, served) -> None:
    server, loop = served
    values = [float(v) for v in np.sin(np.arange(11)) * 10 + 20]
    out = loop.feed(["a"] * 11 + ["b"], list(range(1000, 12000, 1000)) + [5], values + [1.0])
    status, headers, body = get(server.port, url("a"))
    assert status == 200 and headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    assert answer["series"] == "a" and answer["model_version"] == engine.version
    assert answer["values"] == pytest.approx(values[-WINDOW:], abs=1e-5)  # the ring keeps the last W
    assert answer["count"] == 11 and answer["window"] == WINDOW
    assert answer["last_ts"] == 11000 and answer["last_time"] == "1970-01-01T00:00:11Z"
    last = [i for i, name in enumerate(out.series) if name == "a"][-1]
    assert answer["forecast"] == pytest.approx(out.forecasts[last].tolist(), abs=1e-6)
    assert answer["horizon"] == HORIZON
    assert json.loads(get(server.port, url("b"))[2])["values"] == [1.0]


def test_with_the_per_series_choice_the_view_names_where_each_step_comes_from() -> None:
    from forecaster.engine.choice import Choice
    from forecaster.metrics.series import series_page

    # Seeded: an unlucky random net can forecast a flat series' value to float32's last digit (a tie).
    torch.manual_seed(0)
    engine = Engine(
        RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=HORIZON),
        window=WINDOW,
        choice=Choice(min_errors=4),
    )
    assert series_state(engine, "a") is None
    for t in range(30):  # a flat series: the last value is exact, the untrained model is not
        out = engine.process(["a", "b"], [t, t], [7.0, 7.0 + (t % 2)])
    state = series_state(engine, "a")
    assert state.sources == ["last_value"] * HORIZON
    assert state.forecast == pytest.approx([7.0] * HORIZON) and out.forecasts[0].tolist() == [7.0] * HORIZON
    assert "steps 1, 2, 3 from the last value" in series_page(state).decode()
    assert Engine(RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=HORIZON)).choice is None
    plain = Engine(RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=HORIZON))
    plain.process(["a"], [1], [7.0])
    assert series_state(plain, "a").sources is None


def test_a_series_not_resident_gets_404_naming_its_partition(served) -> None:
    server, _ = served
    status, _, body = get(server.port, url("nowhere"))
    answer = json.loads(body)
    assert status == 404 and answer["partition"] == kafka_partition("nowhere", 6)
    assert answer["partitions"] == 6 and answer["topic"] == "ts.input"
    status, _, page = get(server.port, url("nowhere", view=True))
    assert status == 404 and f"partition {answer['partition']} of ts.input" in page.decode()


def test_partitions_follow_kafkas_murmur2() -> None:
    # Kafka's UtilsTest.testMurmur2 vectors (the Java client's, and kafka-python's, default partitioner).
    vectors = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536}
    vectors |= {b"a-little-bit-longer-string": -1486304829, b"abc": 479470107}
    vectors |= {b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}
    for key, expected in vectors.items():
        assert murmur2(key) == expected, key
    partitioner = pytest.importorskip("kafka.partitioner.default")
    for key in ["s1", "é/ü", "x" * 37, ""]:
        assert kafka_partition(key, 7) == (partitioner.murmur2(key.encode()) & 0x7FFFFFFF) % 7


def test_ids_are_escaped_in_json_html_svg_and_urls(engine: Engine, served) -> None:
    server, loop = served
    nasty = '<script>alert("x")</script>/&\'é'
    loop.feed([nasty, nasty], [1, 2], [1.0, 2.0])
    status, _, body = get(server.port, url(nasty))
    assert status == 200 and json.loads(body)["series"] == nasty
    assert b"<" not in body and b"&" not in body  # \u escapes: inert wherever the body is pasted
    status, headers, page = get(server.port, url(nasty, view=True))
    text = page.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "<script" not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;/&amp;&#x27;é" in text
    assert (
        f'href="{url(nasty)}"' in text.replace("&amp;", "&")
        and "default-src 'none'" in headers["Content-Security-Policy"]
    )
    # A raw "/" in the path is not part of an id: /series/a/b is refused, /series/a%2Fb is the series "a/b".
    assert get(server.port, "/series/a/b")[0] == 400
    assert get(server.port, "/series/%ff")[0] == 400


def test_the_page_has_a_point_per_value_and_per_forecast_step(engine: Engine, served) -> None:
    server, loop = served
    loop.feed(["p"] * 5, [1, 2, 3, 4, 5], [3.0, 1.0, 4.0, 1.0, 5.0])
    page = get(server.port, url("p", view=True))[2].decode()
    assert len(re.findall(r'<circle class="value"', page)) == 5
    assert len(re.findall(r'<circle class="forecast"', page)) == HORIZON
    assert "5 retained values (of 5 stepped; window 8)" in page


def test_reads_wait_for_a_batch_boundary_and_time_out_without_a_loop(engine: Engine) -> None:
    engine.process(["a"], [1], [2.0])
    with pytest.raises(TimeoutError):
        ask_series(engine, "a", timeout=0.05)  # nothing steps the engine
    assert not engine.asks  # the request given up is withdrawn
    answers = []
    asker = threading.Thread(target=lambda: answers.append(ask_series(engine, "a", timeout=10)))
    asker.start()
    while not engine.asks:
        pass
    engine.process(["a"], [2], [3.0])  # answered at the start of this batch, before its values
    asker.join(10)
    assert answers[0].values == [2.0] and answers[0].count == 1
    assert series_state(engine, "a").values == [2.0, 3.0]


def test_a_busy_loop_answers_503(engine: Engine) -> None:
    lookup = SeriesLookup(engine, topic="t", partitions=1, timeout=0.05)
    server = MetricsServer(CollectorRegistry(), host="127.0.0.1", port=0, series=lookup).start()
    try:
        status, headers, body = get(server.port, url("a"))
        assert status == 503 and headers["Retry-After"] == "1" and b"batch boundary" in body
    finally:
        server.stop()


def test_without_a_lookup_the_series_routes_say_how_to_turn_them_on() -> None:
    server = MetricsServer(CollectorRegistry(), host="127.0.0.1", port=0).start()
    try:
        status, _, body = get(server.port, url("a"))
        assert status == 404 and b"FORECASTER_METRICS__SERIES_VIEW=true" in body
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("host", "setting", "on"),
    [
        ("127.0.0.1", None, True),
        ("localhost", None, True),
        ("::1", None, True),
        ("0.0.0.0", None, False),
        ("10.1.2.3", None, False),
        ("0.0.0.0", True, True),
        ("127.0.0.1", False, False),
    ],
)
def test_series_view_is_off_by_default_on_non_loopback_binds(host: str, setting, on: bool) -> None:
    assert MetricsSettings(host=host, series_view=setting).series_view_on is on


# --- the page in a real browser ------------------------------------------------------------------------


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no headless browser: apt-get install chromium")


def headless(*args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium(engine: Engine, served, tmp_path) -> None:
    server, loop = served
    name = "room <1>/temp"
    values = [float(v) for v in 20 + 5 * np.sin(np.arange(30) / 3)]
    out = loop.feed(
        [name] * 30, [HOUR * t for t in range(30)], values
    )  # hourly: the series learns its period
    page = f"http://127.0.0.1:{server.port}{url(name, view=True)}"
    dom = headless("--dump-dom", page)
    assert dom.returncode == 0, dom.stderr
    # The DOM the browser built: the title escaped, one circle per retained value and per forecast step.
    assert "<h1>room &lt;1&gt;/temp</h1>" in dom.stdout
    assert len(re.findall(r'<circle class="value"', dom.stdout)) == WINDOW
    assert len(re.findall(r'<circle class="forecast"', dom.stdout)) == HORIZON
    # A time axis: the last value came at 29 h (01-02 05:00 UTC), the last step is 3 h later.
    assert time_labels(dom.stdout)[-1] == "01-02 08:00" and "a step is one period of 1h" in dom.stdout
    # The JSON the page links to is the engine's state.
    answer = json.loads(get(server.port, url(name))[2])
    assert answer["values"] == pytest.approx(values[-WINDOW:], abs=1e-5)
    assert answer["forecast"] == pytest.approx(out.forecasts[-1].tolist(), abs=1e-6)
    shot = tmp_path / "series.png"
    result = headless(f"--screenshot={shot}", "--window-size=820,420", page)
    assert result.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_time_axis_and_the_interval_bands_are_in_the_browsers_dom() -> None:
    lower, upper = [[9.0, 8.0, 7.0], [9.5, 9.0, 8.5]], [[13.0, 14.0, 15.0], [12.5, 13.0, 13.5]]
    state = Banded(**asdict(daily_state()), lower=lower, upper=upper, levels=["95", "80"])
    server = MetricsServer(CollectorRegistry(), host="127.0.0.1", port=0, series=lambda name: state).start()
    try:
        dom = headless("--dump-dom", f"http://127.0.0.1:{server.port}{url('h', view=True)}")
    finally:
        server.stop()
    assert dom.returncode == 0, dom.stderr
    assert time_labels(dom.stdout) == ["2024-02-29", "2024-03-02", "2024-03-04", "2024-03-05", "2024-03-07"]
    bands = re.findall(r'<polygon class="band" data-level="(\d+)"', dom.stdout)
    assert bands == ["95", "80"]  # the widest first, the narrower on top
    assert len(re.findall(r'<circle class="imputed"', dom.stdout)) == 1


# --- the time axis ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Banded(SeriesState):
    """A state with the forecast's intervals, as the page draws them when the engine's state has them."""

    lower: list[list[float]] | None = None
    upper: list[list[float]] | None = None
    levels: list[str] | None = None


def time_labels(page: str) -> list[str]:
    return re.findall(r'<text class="time"[^>]*>([^<]*)</text>', page)


def daily_state(period_ms: int = 86_400_000, grid: str = "period") -> SeriesState:
    """Five daily values up to 2024-03-04 (the third filled a missing day), a forecast of three days."""
    last = 1_709_510_400_000  # 2024-03-04T00:00:00Z
    return SeriesState(
        series="h",
        values=[10.0, 11.0, 12.0, 11.0, 10.0],
        last_ts=last,
        count=5,
        window=WINDOW,
        forecast=[11.0, 12.0, 11.0],
        model_version="v1",
        period_ms=period_ms,
        grid=grid,
        imputed=[False, False, True, False, False],
    )


def test_a_series_with_a_period_gets_dates_and_target_times() -> None:
    from forecaster.metrics.series import series_json, series_page

    state = daily_state()
    page = series_page(state).decode()
    # Steps -4..0 are the retained days, 1..3 the forecast's: 2024-02-29 .. 2024-03-07.
    assert time_labels(page) == ["2024-02-29", "2024-03-02", "2024-03-04", "2024-03-05", "2024-03-07"]
    assert "a step is one period of 1d; 1 of the retained values filled missing periods" in page
    assert len(re.findall(r'<circle class="value"', page)) == 4 and '<circle class="imputed"' in page
    assert "polygon" not in page  # no intervals in the state: no bands
    body = json.loads(series_json(state))
    assert body["forecast_times"] == ["2024-03-05T00:00:00Z", "2024-03-06T00:00:00Z", "2024-03-07T00:00:00Z"]
    assert body["period_ms"] == 86_400_000


@pytest.mark.parametrize(
    ("grid", "says"),
    [
        ("none", "no period (its spacing is not stable): steps are values, not periods"),
        ("learning", "learning its period from its first values: until then steps are values, not periods"),
    ],
)
def test_a_series_without_a_period_says_steps_are_values(grid: str, says: str) -> None:
    from forecaster.metrics.series import series_json, series_page

    state = daily_state(period_ms=0, grid=grid)
    page = series_page(state).decode()
    assert says in page and "0 (last value)" in page and not time_labels(page)
    assert json.loads(series_json(state))["forecast_times"] is None


def test_bands_are_drawn_per_level_widest_first() -> None:
    from forecaster.metrics.series import series_page

    lower, upper = [[9.5, 9.0, 8.5], [9.0, 8.0, 7.0]], [[12.5, 13.0, 13.5], [13.0, 14.0, 15.0]]
    state = Banded(**asdict(daily_state()), lower=lower, upper=upper, levels=["80", "95"])
    page = series_page(state).decode()
    assert re.findall(r'<polygon class="band" data-level="(\d+)"', page) == ["95", "80"]
    assert "15" in page  # the y range holds the widest band
