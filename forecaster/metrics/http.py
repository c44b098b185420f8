"""The HTTP endpoint: ``/metrics`` (prometheus_client's WSGI app: gzip, OpenMetrics when the scraper asks
for it), ``/healthz``, ``/readyz`` and, with a series lookup, ``/series/<id>`` and ``/series/<id>/view``.

A small threaded WSGI server (``wsgiref`` with ``ThreadingMixIn``, as prometheus_client serves) on its own
daemon thread; requests never run on the service's loop thread.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import unquote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from forecaster.metrics.series import Lookup, NotResident, series_json, series_page

TEXT = "text/plain; charset=utf-8"
SERIES_OFF = (
    b"the series view is off on this instance (it is on by default only on a loopback bind):"
    b" FORECASTER_METRICS__SERIES_VIEW=true turns it on\n"
)


class MetricsServer:
    """``/metrics``, ``/healthz`` (``healthy()``: 200, else 503), ``/readyz`` (``ready()``: 200, else 503) and,
    given ``series`` (a ``forecaster.metrics.series.SeriesLookup``), the series routes.

    ``port=0`` picks a free port (read ``server.port``).

    >>> from prometheus_client import CollectorRegistry
    >>> server = MetricsServer(CollectorRegistry(), host="127.0.0.1", port=0, ready=lambda: False).start()
    >>> server.port > 0
    True
    >>> server.stop()
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = "0.0.0.0",
        port: int = 9108,
        ready: Callable[[], bool] | None = None,
        *,
        healthy: Callable[[], bool] | None = None,
        series: Lookup | None = None,
    ) -> None:
        self.registry = registry
        self.app = MetricsApp(registry, ready=ready, healthy=healthy, series=series)
        server_class = _Server6 if ":" in host else _Server
        self._server = make_server(host, port, self.app, server_class=server_class, handler_class=_Handler)
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> Callable[[], bool]:
        return self.app.ready

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="forecaster-metrics", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)


class MetricsApp:
    """The WSGI application behind ``MetricsServer`` (usable under any WSGI server)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool] | None = None,
        healthy: Callable[[], bool] | None = None,
        series: Lookup | None = None,
    ) -> None:
        self.metrics = make_wsgi_app(registry)
        self.ready = ready or _always
        self.healthy = healthy or _always
        self.series = series

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # The path as sent (still percent-encoded): a series id may hold "/" (sent as %2F).
        path = environ.get("RAW_URI", environ.get("PATH_INFO", "")).split("?", 1)[0]
        if path == "/metrics":
            return self.metrics(environ, start_response)
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            return _answer(start_response, 405, b"use GET\n", TEXT, [("Allow", "GET, HEAD")])
        if path == "/healthz":
            ok = bool(self.healthy())
            return _answer(start_response, 200 if ok else 503, b"ok\n" if ok else b"not healthy\n")
        if path == "/readyz":
            ok = bool(self.ready())
            return _answer(start_response, 200 if ok else 503, b"ready\n" if ok else b"not ready\n")
        if path.startswith("/series/"):
            return self._series(path[len("/series/") :], start_response)
        return _answer(start_response, 404, b"not found\n")

    def _series(self, rest: str, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if self.series is None:
            return _answer(start_response, 404, SERIES_OFF)
        page = rest.endswith("/view")
        encoded = rest[: -len("/view")] if page else rest
        try:
            series = unquote(encoded, errors="strict")
        except UnicodeDecodeError:
            return _answer(start_response, 400, b"a series id is UTF-8, percent-encoded\n")
        if not encoded or "/" in encoded:
            return _answer(
                start_response, 400, b"use /series/<id> or /series/<id>/view (a / in an id: %2F)\n"
            )
        try:
            found = self.series(series)
        except TimeoutError as exc:
            body = f"busy: {exc}; try again\n".encode()
            return _answer(start_response, 503, body, TEXT, [("Retry-After", "1")])
        status = 404 if isinstance(found, NotResident) else 200
        if page:
            return _answer(
                start_response, status, series_page(found), "text/html; charset=utf-8", _PAGE_HEADERS
            )
        return _answer(start_response, status, series_json(found), "application/json", _NO_STORE)


_NO_STORE = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
# The page runs no script and loads nothing: say so, so that an id that slipped through could not either.
_PAGE_HEADERS = [*_NO_STORE, ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")]


def _answer(
    start_response: Callable[..., Any],
    status: int,
    body: bytes,
    content_type: str = TEXT,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    start_response(
        f"{status} {HTTPStatus(status).phrase}",
        [("Content-Type", content_type), ("Content-Length", str(len(body))), *(headers or [])],
    )
    return [body]


def _always() -> bool:
    return True


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow client never holds up the process's exit


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(WSGIRequestHandler):
    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        environ["RAW_URI"] = self.path  # wsgiref's PATH_INFO is already percent-decoded
        return environ

    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line each
        pass
