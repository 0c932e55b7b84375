"""Network endpoints that misbehave on purpose, for mirror-health, prefetch and timeout tests.

- ``free_port()``: an ephemeral 127.0.0.1 port that was free a moment ago.
- ``RefusedPort``: a port that is bound but not listening, so connects get RST (ECONNREFUSED)
  for as long as the object is open (nobody else can take the port meanwhile).
- ``HungServer``: accepts TCP connections and never sends a byte (models a wedged mirror).
- ``ThrottleProxy``: a TCP proxy in front of ``upstream`` that limits each connection to
  ``rate`` bytes/s from upstream to client (models a registry with limited per-connection throughput),
  and optionally all connections together to ``total_rate`` (the registry's or the link's total).

All are context managers and threads only; ``close()`` stops them and closes every socket.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType
from typing import Self


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class _Closable:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Endpoint(_Closable):
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"


class RefusedPort(_Endpoint):
    def __init__(self, host: str = "127.0.0.1") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((host, 0))
        self.host = host
        self.port = self._sock.getsockname()[1]

    def close(self) -> None:
        self._sock.close()


class _Listener(_Endpoint):
    """A listening socket on an ephemeral port and a thread handing each connection to ``_accepted``."""

    def __init__(self, host: str, name: str) -> None:
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind((host, 0))
        self._lsock.listen(64)
        self._lsock.settimeout(0.2)
        self.host = host
        self.port = self._lsock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"{name}-{self.port}", daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._accepted(conn)

    def _accepted(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _stop_listening(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._lsock.close()


class HungServer(_Listener):
    """Accepts connections, reads and discards what arrives, never answers."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host, "hung")
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._thread.start()

    def _accepted(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self._conns.append(conn)
        self.accepted += 1
        for c in list(self._conns):  # drain so the peer's writes never block on us
            with contextlib.suppress(OSError):
                c.recv(65536)

    def close(self) -> None:
        self._stop_listening()
        for c in self._conns:
            c.close()


class ThrottleProxy(_Listener):
    """TCP proxy to ``upstream`` ("host:port"), at most ``rate`` bytes/s per connection downstream and,
    with ``total_rate``, at most that many bytes/s over all connections. Pacing never banks credit:
    a keep-alive connection that sat idle gets no burst afterwards."""

    def __init__(
        self,
        upstream: str,
        rate: int,
        host: str = "127.0.0.1",
        chunk: int = 16384,
        total_rate: int | None = None,
    ) -> None:
        if rate <= 0 or (total_rate is not None and total_rate <= 0):
            raise ValueError("rate must be > 0 bytes/s")
        super().__init__(host, "throttle")
        uh, _, up = upstream.rpartition(":")
        self.upstream = (uh, int(up))
        self.rate = rate
        self.chunk = max(1, min(chunk, rate // 10 or 1))
        self.total_rate = total_rate
        self._total_next = 0.0  # when the shared link is free again (monotonic)
        self.connections = 0
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._thread.start()

    def _accepted(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self.connections += 1
            self._socks += [client, upstream]
        for src, dst, limited in ((client, upstream, False), (upstream, client, True)):
            t = threading.Thread(target=self._pump, args=(src, dst, limited), daemon=True)
            self._threads.append(t)
            t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, limited: bool) -> None:
        free_at = 0.0  # when this connection may send again
        try:
            while not self._stop.is_set():
                data = src.recv(self.chunk if limited else 65536)
                if not data:
                    break
                dst.sendall(data)
                if limited:
                    now = time.monotonic()
                    free_at = max(free_at, now) + len(data) / self.rate
                    until = free_at
                    with self._lock:
                        self.bytes_down += len(data)
                        if self.total_rate:
                            self._total_next = max(self._total_next, now) + len(data) / self.total_rate
                            until = max(until, self._total_next)
                    if until > now:
                        self._stop.wait(until - now)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop_listening()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(timeout=5)
