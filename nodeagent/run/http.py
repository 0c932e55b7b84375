"""``/metrics`` and ``/healthz`` on ``metrics.listen``, served by prometheus-client.

prometheus-client's WSGI server (the standard library's HTTP server, a thread per connection)
serves its own metrics app on ``/metrics`` (text or OpenMetrics as the scraper asks, gzip when
accepted); ``/healthz`` answers 200 while the upstream image service answers, else 503 (the check
runs on the daemon's event loop; a loop that does not answer within ``HEALTHZ_TIMEOUT`` is a 503
too). ``/`` names the two; anything else is 404, a method other than GET/HEAD 405. Bounded: at most
``MAX_CONNECTIONS`` connections at once (more are closed on accept), each given
``READ_TIMEOUT`` seconds per read; the server's thread is stopped at shutdown.
"""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from nodeagent.run.metrics import Metrics
from nodeagent.util.log import get_logger

log = get_logger(__name__)

MAX_CONNECTIONS = 16
READ_TIMEOUT = 5.0
HEALTHZ_CACHE_SECONDS = 1.0  # a /healthz flood is not a CRI flood
HEALTHZ_TIMEOUT = 5.0
TEXT = "text/plain; charset=utf-8"

Health = Callable[[float], Coroutine[Any, Any, tuple[bool, str]]]  # max_age -> (answers, why not)
StartResponse = Callable[..., Any]
_Request = socket.socket | tuple[bytes, socket.socket]


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (all addresses)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics.listen: {listen!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class _Handler(WSGIRequestHandler):
    timeout = READ_TIMEOUT  # per socket read: a client that sends nothing does not hold a thread

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: scrapes every few seconds are not news."""


class _Server(ThreadingWSGIServer):
    """prometheus-client's thread-per-connection server with a bound on connections."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        """``HTTPServer.server_bind`` without its reverse DNS lookup of the address (``getfqdn``):
        on a node whose DNS is not up yet that would hold the daemon's start for seconds."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()

    def process_request(self, request: _Request, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the bound: closed at once, nothing read
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: _Request, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsEndpoint:
    def __init__(self, listen: str, metrics: Metrics, health: Health) -> None:
        self.listen = listen
        self.health = health
        self.address: str | None = None  # "host:port" actually bound
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Bind and serve (raises ``OSError`` when the address is taken, ``ValueError`` when
        ``metrics.listen`` is not host:port)."""
        host, port = parse_listen(self.listen)
        self._loop = asyncio.get_running_loop()
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("_BoundServer", (_Server,), {"address_family": family})
        self._server = make_server(host, port, self._app, server_class, handler_class=_Handler)
        bound: tuple[Any, ...] = tuple(self._server.server_address)
        h, p = str(bound[0]), int(bound[1])
        self.address = f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="nodeagent-metrics-http", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        await asyncio.to_thread(server.shutdown)  # serve_forever notices within half a second
        server.server_close()

    # --- the WSGI app (runs in the server's threads) ---------------------------------------------
    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return _respond(start_response, "405 Method Not Allowed", b"method not allowed\n", TEXT, head)
        if path == "/metrics":
            return self._metrics(dict(environ, REQUEST_METHOD="GET"), start_response, head)
        if path == "/healthz":
            ok, why = self._healthz()
            status = "200 OK" if ok else "503 Service Unavailable"
            body = "ok: upstream CRI answers\n" if ok else f"upstream CRI not answering: {why}\n"
            return _respond(start_response, status, body.encode(), TEXT, head)
        if path == "/":
            return _respond(start_response, "200 OK", b"nodeagent: /metrics /healthz\n", TEXT, head)
        return _respond(start_response, "404 Not Found", b"not found\n", TEXT, head)

    def _metrics(self, environ: dict[str, Any], start_response: StartResponse, head: bool) -> list[bytes]:
        got: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            got[:] = [status, headers]

        body = b"".join(self._metrics_app(environ, capture))
        status, headers = got
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [b"" if head else body]

    def _healthz(self) -> tuple[bool, str]:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self.health(HEALTHZ_CACHE_SECONDS), self._loop)
        try:
            ok, why = future.result(HEALTHZ_TIMEOUT)
            return bool(ok), str(why)
        except TimeoutError:
            future.cancel()
            return False, f"no answer from the daemon's event loop within {HEALTHZ_TIMEOUT:g}s"
        except Exception as e:  # the loop is closing (shutdown)
            return False, f"{type(e).__name__}: {e}"


def _respond(start_response: StartResponse, status: str, body: bytes, ctype: str, head: bool) -> list[bytes]:
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [b"" if head else body]
