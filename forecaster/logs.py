"""Logging of the Kafka clients: their lines through Python's logging, each kind at most once a while.

While a broker is away both clients say so again and again (librdkafka a ``FAIL`` line per connect attempt,
though 2.12 holds most of its repeats back itself; kafka-python one ``No node available`` per
metadata refresh, many a second); the service reports a lost broker
once, from its own checks. ``Repeats`` passes a given line of a client at most once per ``interval``
seconds and tells how many it held back. librdkafka's lines go through Python's logging too
(``forecaster.librdkafka``, handed to confluent-kafka as its ``logger``) instead of straight to stderr.

>>> import io
>>> stream = io.StringIO()
>>> handler = logging.StreamHandler(stream)
>>> handler.addFilter(Repeats(interval=60.0, clock=iter([0.0, 1.0, 2.0, 61.0]).__next__))
>>> demo = logging.getLogger("kafka.demo"); demo.addHandler(handler); demo.propagate = False
>>> for _ in range(4):
...     demo.warning("No node available for metadata refresh")
>>> print(stream.getvalue().strip())
No node available for metadata refresh
No node available for metadata refresh (2 more like this in 61 s)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

CLIENT_LOGGERS = ("kafka", "forecaster.librdkafka")


class Repeats(logging.Filter):
    """Passes each (logger, message template) of ``loggers`` at most once per ``interval`` seconds; the
    next one passed says how many were held back. Lines of other loggers always pass."""

    def __init__(
        self,
        interval: float = 30.0,
        loggers: tuple[str, ...] = CLIENT_LOGGERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.interval = interval
        self.loggers = loggers
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[float, float, int]] = {}  # -> (first, last passed, held)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.loggers):
            return True
        key = (record.name, _template(record))
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[1] < self.interval:
            self._seen[key] = (seen[0], seen[1], seen[2] + 1)
            return False
        if seen is not None and seen[2]:
            record.msg = f"{record.getMessage()} ({seen[2]} more like this in {now - seen[0]:.0f} s)"
            record.args = None
        if len(self._seen) > 1000:  # many distinct lines: forget them rather than grow
            self._seen.clear()
        self._seen[key] = (now, now, 0)
        return True


def _template(record: logging.LogRecord) -> str:
    """The message without what varies between repeats (a librdkafka line's timing, e.g. "after 0ms")."""
    text = record.msg if isinstance(record.msg, str) else str(record.msg)
    if record.name == "forecaster.librdkafka" and record.args:
        text = str(record.args[-1]).split(" (after ")[0]
    return text


def install(handlers: list[logging.Handler] | None = None, interval: float = 30.0) -> None:
    """Add one ``Repeats`` filter to each of ``handlers`` (default: the root logger's)."""
    for handler in logging.getLogger().handlers if handlers is None else handlers:
        if not any(isinstance(f, Repeats) for f in handler.filters):
            handler.addFilter(Repeats(interval))


def librdkafka_logger() -> logging.Logger:
    """confluent-kafka's ``logger`` property: librdkafka's lines (``log(level, "%s [%s] %s", facility,
    client, text)``) into ``forecaster.librdkafka``, where ``Repeats`` holds back a broker's repeats."""
    return logging.getLogger("forecaster.librdkafka")
