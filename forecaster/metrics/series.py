"""``/series/<id>`` and ``/series/<id>/view``: one series' recent values and last forecast, as JSON and as a
small HTML page with a server-side SVG chart (no script, nothing fetched: it works offline).

A series this instance does not hold answers 404 with the input partition its key goes to (Kafka's
default partitioner: murmur2 of the key bytes, as the Java client, kafka-python and librdkafka's
``murmur2_random`` compute it), so the reader knows which instance to ask. Series ids are escaped
wherever they are written: JSON (``json.dumps``), HTML and SVG (``html.escape``), URLs (percent-encoded).

>>> kafka_partition("s1", 6)
3
>>> murmur2(b"21"), murmur2(b"foobar")   # the vectors of Kafka's UtilsTest.testMurmur2
(-973932308, -790332482)
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from forecaster.engine.view import SeriesState, ask_series

# ---- where a key goes ------------------------------------------------------------------------------


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), as a signed 32-bit int."""
    m, r, mask = 0x5BD1E995, 24, 0xFFFFFFFF
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    end = length - length % 4
    for i in range(0, end, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & mask
        k ^= k >> r
        k = (k * m) & mask
        h = (h * m) & mask
        h ^= k
    rest = length % 4
    if rest == 3:
        h ^= data[end + 2] << 16
    if rest >= 2:
        h ^= data[end + 1] << 8
    if rest >= 1:
        h ^= data[end]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def positive(value: int) -> int:
    """Kafka's ``Utils.toPositive``: the sign bit cleared."""
    return value & 0x7FFFFFFF


def kafka_partition(series: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives the key ``series`` (UTF-8) among ``partitions``."""
    return positive(murmur2(series.encode())) % partitions


# ---- the lookup the HTTP server calls ----------------------------------------------------------------


@dataclass(frozen=True)
class NotResident:
    """A series this instance holds no state for, and the input partition its key goes to."""

    series: str
    topic: str
    partition: int
    partitions: int


class SeriesLookup:
    """``lookup(series) -> SeriesState | NotResident`` for the HTTP server's threads: the engine answers
    between two batches (``forecaster.engine.view.ask_series``); ``TimeoutError`` when it does not within
    ``timeout`` seconds.

    >>> from forecaster.model import RecurrentForecaster
    >>> from forecaster.engine import Engine
    >>> engine = Engine(RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2))
    >>> lookup = SeriesLookup(engine, topic="ts.input", partitions=6, timeout=0.01)
    >>> lookup("nowhere")   # nothing steps the engine here
    Traceback (most recent call last):
    ...
    TimeoutError: the engine did not reach a batch boundary within 0.01 s
    """

    def __init__(self, engine: object, topic: str, partitions: int, timeout: float = 2.0) -> None:
        self.engine = engine
        self.topic = topic
        self.partitions = max(1, partitions)
        self.timeout = timeout

    def __call__(self, series: str) -> SeriesState | NotResident:
        state = ask_series(self.engine, series, self.timeout)  # type: ignore[arg-type]
        if state is not None:
            return state
        return NotResident(series, self.topic, kafka_partition(series, self.partitions), self.partitions)


Lookup = Callable[[str], "SeriesState | NotResident"]


# ---- JSON ----------------------------------------------------------------------------------------


def series_json(found: SeriesState | NotResident) -> bytes:
    """The JSON body of ``/series/<id>`` (or of its 404): the state, with ``forecast_times`` the target
    time of each step (ISO 8601; null for a series without a period, whose steps are its next values)."""
    if isinstance(found, NotResident):
        body = {
            "series": found.series,
            "error": "not resident on this instance",
            "topic": found.topic,
            "partition": found.partition,
            "partitions": found.partitions,
        }
    else:
        times = [_iso(t) for t in target_times(found)] if found.period_ms > 0 else None
        body = {
            **asdict(found),
            "last_time": _iso(found.last_ts),
            "horizon": len(found.forecast),
            "forecast_times": times,
        }
    text = json.dumps(body, allow_nan=False)
    # <, > and & as \u escapes (still the same JSON): the body stays inert wherever it is pasted.
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def target_times(found: SeriesState) -> list[int]:
    """Epoch ms of each forecast step, ``last_ts + k * period_ms`` (k = 1..H); empty without a period."""
    if found.period_ms <= 0:
        return []
    return [found.last_ts + k * found.period_ms for k in range(1, len(found.forecast) + 1)]


def _iso(ts_ms: int) -> str | None:
    try:
        return datetime.fromtimestamp(ts_ms / 1000.0, UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return None


# ---- HTML + SVG ----------------------------------------------------------------------------------

WIDTH, HEIGHT, PAD = 760, 300, 48
TICKS = 5  # time labels on the x axis of a series with a period

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 18px; margin: 0 0 4px; }} p {{ margin: 4px 0 12px; color: #555; }}
.value {{ fill: #1f77b4; }} .forecast {{ fill: #d62728; }}
.imputed {{ fill: #fff; stroke: #1f77b4; stroke-width: 1; }}
.history {{ fill: none; stroke: #1f77b4; stroke-width: 1.5; }}
.ahead {{ fill: none; stroke: #d62728; stroke-width: 1.5; stroke-dasharray: 4 3; }}
.band {{ fill: #d62728; fill-opacity: 0.12; stroke: none; }}
.axis {{ stroke: #999; }} .now {{ stroke: #bbb; stroke-dasharray: 2 2; }} .tick {{ stroke: #999; }}
text {{ font: 11px system-ui, sans-serif; fill: #555; }}
</style></head>
<body>
<h1>{heading}</h1>
<p>{summary} &middot; <a href="{json_url}">JSON</a></p>
{chart}
</body></html>
"""


def series_page(found: SeriesState | NotResident) -> bytes:
    """The HTML page of ``/series/<id>/view`` (or of its 404)."""
    name = html.escape(found.series, quote=True)
    json_url = html.escape("/series/" + quote(found.series, safe=""), quote=True)
    if isinstance(found, NotResident):
        summary = (
            f"not resident on this instance; its key goes to partition {found.partition} of"
            f" {html.escape(found.topic)} ({found.partitions} partitions): ask the instance that owns it"
        )
        return _PAGE.format(title=name, heading=name, summary=summary, json_url=json_url, chart="").encode()
    n, h = len(found.values), len(found.forecast)
    summary = (
        f"{n} retained value{'s' if n != 1 else ''} (of {found.count} stepped; window {found.window})"
        f" &middot; last at {html.escape(_iso(found.last_ts) or str(found.last_ts))}"
        f" &middot; forecast of the next {h} step{'s' if h != 1 else ''} by model"
        f" {html.escape(found.model_version)}{_naive_steps(found.sources)} &middot; {_grid_text(found)}"
    )
    chart = _chart(found)
    return _PAGE.format(title=name, heading=name, summary=summary, json_url=json_url, chart=chart).encode()


def _grid_text(found: SeriesState) -> str:
    """What a step is for this series: a period (and how many retained values filled missing ones), or,
    without a period, its next value."""
    if found.period_ms > 0:
        from forecaster.tools.replay import duration  # the page's only use of it: not at the service's start

        filled = sum(found.imputed or [])
        gaps = f"; {filled} of the retained values filled missing periods (hollow)" if filled else ""
        return f"a step is one period of {duration(found.period_ms)}{gaps}"
    if found.grid == "learning":
        return "learning its period from its first values: until then steps are values, not periods"
    return "no period (its spacing is not stable): steps are values, not periods"


def _naive_steps(sources: list[str] | None) -> str:
    """The steps this series takes from a naive forecast (per-series choice), for the page's summary."""
    naive = {}
    for step, source in enumerate(sources or [], start=1):
        if source != "model":
            naive.setdefault(source.replace("_", " "), []).append(str(step))
    return "".join(f", steps {', '.join(steps)} from the {name}" for name, steps in naive.items())


def _bands(found: SeriesState) -> list[tuple[str, list[float], list[float]]]:
    """The prediction intervals of the forecast, widest first: ``(level, lower, upper)`` per level, from the
    state's ``lower`` and ``upper`` ((levels, H) lists) and ``levels``; none when the state has none."""
    lower, upper = getattr(found, "lower", None), getattr(found, "upper", None)
    if not lower or not upper:
        return []
    levels = list(getattr(found, "levels", None) or [str(i) for i in range(len(lower))])
    bands = list(zip(levels, lower, upper, strict=True))
    return sorted(bands, key=lambda band: -_width(band[1], band[2]))


def _width(lower: list[float], upper: list[float]) -> float:
    return sum(u - lo for lo, u in zip(lower, upper, strict=True) if math.isfinite(u - lo))


def _chart(found: SeriesState) -> str:
    """History (blue, steps -n+1..0) and forecast (red, steps 1..H, in its interval bands) on one SVG, a
    circle per point (hollow: a value that filled a missing period); the x axis in time for a series with a
    period (the ring holds one value per period), else in steps."""
    values, forecast = found.values, found.forecast
    bands = _bands(found)
    xs = list(range(-len(values) + 1, 1)) + list(range(1, len(forecast) + 1))
    ys = [v for v in values + forecast if math.isfinite(v)]
    ys += [v for _, lower, upper in bands for v in lower + upper if math.isfinite(v)]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 1.0, hi + 1.0
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0, 1)
    x_hi = max(x_hi, x_lo + 1)

    def px(step: int) -> float:
        return PAD + (step - x_lo) / (x_hi - x_lo) * (WIDTH - 2 * PAD)

    def py(value: float) -> float:
        return HEIGHT - PAD + (lo - value) / (hi - lo) * (HEIGHT - 2 * PAD)

    def points(steps: list[int], ys_: list[float]) -> list[tuple[float, float]]:
        return [(px(s), py(v)) for s, v in zip(steps, ys_, strict=True) if math.isfinite(v)]

    imputed = found.imputed if found.imputed and len(found.imputed) == len(values) else [False] * len(values)
    history = points(xs[: len(values)], values)
    # The forecast line starts at the newest value, so the two read as one curve.
    ahead = points(xs[len(values) :], forecast)
    line = history[-1:] + ahead
    label = html.escape(found.series, quote=True)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}"'
        f' viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{label}">',
        f"<title>{label}</title>",
        f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}"/>',
        f'<line class="axis" x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}"/>',
        f'<line class="now" x1="{px(0):.1f}" y1="{PAD}" x2="{px(0):.1f}" y2="{HEIGHT - PAD}"/>',
        f'<text x="{PAD - 6}" y="{py(hi) + 4:.1f}" text-anchor="end">{_number(hi)}</text>',
        f'<text x="{PAD - 6}" y="{py(lo) + 4:.1f}" text-anchor="end">{_number(lo)}</text>',
    ]
    parts += _time_axis(found, x_lo, x_hi, px) if found.period_ms > 0 else _step_axis(x_lo, x_hi, px)
    for level, lower, upper in bands:  # widest first, so the narrower ones lie on top
        edge = points(xs[len(values) :], upper) + points(xs[len(values) :], lower)[::-1]
        if len(edge) > 2:
            parts.append(
                f'<polygon class="band" data-level="{html.escape(str(level))}" points="{_path(edge)}"/>'
            )
    if len(history) > 1:
        parts.append(f'<polyline class="history" points="{_path(history)}"/>')
    if len(line) > 1:
        parts.append(f'<polyline class="ahead" points="{_path(line)}"/>')
    marks = [m for v, m in zip(values, imputed, strict=True) if math.isfinite(v)]
    parts += [
        f'<circle class="{"imputed" if m else "value"}" cx="{x:.1f}" cy="{y:.1f}" r="2"/>'
        for (x, y), m in zip(history, marks, strict=True)
    ]
    parts += [f'<circle class="forecast" cx="{x:.1f}" cy="{y:.1f}" r="2.5"/>' for x, y in ahead]
    parts.append("</svg>")
    return "\n".join(parts)


def _step_axis(x_lo: int, x_hi: int, px: Callable[[int], float]) -> list[str]:
    """x labels of a series without a period: steps, 0 the last value."""
    return [
        f'<text x="{px(x_lo):.1f}" y="{HEIGHT - PAD + 16}" text-anchor="middle">{x_lo}</text>',
        f'<text x="{px(0) - 4:.1f}" y="{HEIGHT - PAD + 16}" text-anchor="end">0 (last value)</text>',
        f'<text x="{px(x_hi):.1f}" y="{HEIGHT - PAD + 16}" text-anchor="start">+{x_hi}</text>',
        f'<text x="{WIDTH / 2:.0f}" y="{HEIGHT - 8}" text-anchor="middle">steps, each the next value'
        " (no period; blue: retained values, red: forecast)</text>",
    ]


def _time_axis(found: SeriesState, x_lo: int, x_hi: int, px: Callable[[int], float]) -> list[str]:
    """x labels of a series with a period: the time of ``TICKS`` evenly spaced steps (step s is at
    ``last_ts + s * period_ms``), each with a tick; its epoch ms in ``data-ts``."""
    span = x_hi - x_lo
    steps = sorted({x_lo + round(i * span / (TICKS - 1)) for i in range(TICKS)})
    parts = []
    for step in steps:
        when = found.last_ts + step * found.period_ms
        x = px(step)
        parts += [
            f'<line class="tick" x1="{x:.1f}" y1="{HEIGHT - PAD}" x2="{x:.1f}" y2="{HEIGHT - PAD + 4}"/>',
            f'<text class="time" x="{x:.1f}" y="{HEIGHT - PAD + 16}" text-anchor="middle"'
            f' data-ts="{when}">{html.escape(_time_label(when, found.period_ms))}</text>',
        ]
    parts.append(
        f'<text x="{WIDTH / 2:.0f}" y="{HEIGHT - 8}" text-anchor="middle">time, UTC'
        " (blue: retained values, red: forecast and its intervals)</text>"
    )
    return parts


def _time_label(ts_ms: int, period_ms: int) -> str:
    """A date as fine as the period needs: the month of monthly data, the day of daily data, else the time."""
    if period_ms >= 28 * 86_400_000:
        fmt = "%Y-%m"
    elif period_ms % 86_400_000 == 0:
        fmt = "%Y-%m-%d"
    elif period_ms % 60_000 == 0:
        fmt = "%m-%d %H:%M"
    else:
        fmt = "%H:%M:%S"
    try:
        return datetime.fromtimestamp(ts_ms / 1000.0, UTC).strftime(fmt)
    except (OverflowError, OSError, ValueError):
        return str(ts_ms)


def _path(points: list[tuple[float, float]]) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in points)


def _number(value: float) -> str:
    return f"{value:.4g}"
