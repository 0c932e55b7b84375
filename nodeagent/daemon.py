"""``nodeagent run``: the long-running daemon.

    daemon = Daemon(config, paths)
    daemon.add_worker("eviction", evictor.run)             # async fn, supervised (restarted on crash)
    daemon.add_pull_listener(on_pull)                       # called with a PullRecord after every pull
    daemon.add_status_hook("eviction", evictor.status)      # -> dict, a section of the status file
    daemon.set_pull_wrapper(mirror_health.run_with_failover)
    exit_code = asyncio.run(daemon.run())

It serves the CRI image proxy (``cri.proxySocket``), the Prometheus endpoint (``metrics.listen``:
``/metrics`` and ``/healthz``), runs the named workers, keeps ``Paths.daemon_status_file`` current
(what ``nodeagent status`` reads), and talks to systemd: READY=1 once serving, WATCHDOG=1 while
the event loop is alive (when WatchdogSec is set), STOPPING=1 on SIGTERM. Under socket activation
(``systemd/nodeagent.socket``) the proxy serves the listening socket systemd passed (``LISTEN_FDS``)
and never removes it, so connections made while the daemon restarts wait in its backlog; started
by hand it binds ``cri.proxySocket`` itself. SIGTERM/SIGINT drain in-flight calls for at most
``drain_seconds`` and return exit code 0. An unreachable upstream never stops the daemon: the
proxy answers UNAVAILABLE, /healthz says 503, metrics keep being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
import os
import signal
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from nodeagent import __version__
from nodeagent.atomicio import write_atomic
from nodeagent.config.model import Config
from nodeagent.lastused import LastUsed
from nodeagent.log import event, get_logger
from nodeagent.metrics import Metrics
from nodeagent.paths import Paths
from nodeagent.proxy.records import PullRecord
from nodeagent.proxy.slots import PullSlots
from nodeagent.sd_daemon import (
    listen_fds,
    same_socket_path,
    sd_notify,
    socket_path,
    take_unix_listener,
    watchdog_interval,
)

log = get_logger(__name__)

DRAIN_SECONDS = 10.0
STATUS_INTERVAL = 15.0  # heartbeat of the status file; `nodeagent status` calls it stale after 6x
STATUS_DEBOUNCE = 1.0  # a change is written within this long (pull bursts make one write)
HEALTH_INTERVAL = 15.0  # idle-time upstream probe; proxied calls update the state as they happen
HEALTH_TIMEOUT = 2.0
SHUTDOWN_TASKS_TIMEOUT = 2.0  # background loops get this long to stop after their cancel
CACHE_STATS_INTERVAL = 60.0
LAST_USED_SAVE_INTERVAL = 60.0
# malloc_trim (memory.py): soon after large buffers were used, and every so often regardless
MEMORY_TRIM_CHECK = 2.0
MEMORY_TRIM_INTERVAL = 30.0
RECENT_PULLS = 20
WORKER_BACKOFF = 1.0  # first restart delay of a crashed worker; doubles up to WORKER_MAX_BACKOFF
WORKER_MAX_BACKOFF = 60.0
HTTP_HEADER_LIMIT = 16 * 1024
HEALTHZ_CACHE_SECONDS = 1.0
HTTP_READ_TIMEOUT = 5.0

PullListener = Callable[[PullRecord], Awaitable[None] | None]
StatusHook = Callable[[], Mapping[str, Any]]


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (all addresses)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics.listen: {listen!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class Daemon:
    def __init__(
        self,
        config: Config,
        paths: Paths,
        *,
        metrics: Metrics | None = None,
        environ: MutableMapping[str, str] | None = None,
        drain_seconds: float = DRAIN_SECONDS,
    ) -> None:
        self.config = config
        self.paths = paths
        self.metrics = metrics or Metrics(per_image_series_limit=config.metrics.per_image_series_limit)
        self.last_used = LastUsed(paths.last_used_file)
        self.environ = os.environ if environ is None else environ
        self.drain_seconds = drain_seconds
        self.started_at = time.time()
        self.proxy_socket = paths.host(config.cri.proxy_socket) if config.cri.proxy_socket else None
        self.socket_inherited = False  # the proxy serves a socket systemd passed (LISTEN_FDS)
        self.metrics_address: str | None = None  # "host:port" actually bound
        self.upstream_ok: bool | None = None
        self.upstream_error = ""
        self.upstream_checked_at: float | None = None
        self.cache: dict[str, Any] = {}
        self.recent_pulls: deque[dict[str, Any]] = deque(maxlen=RECENT_PULLS)
        self.pull_totals: Counter[str] = Counter()
        self.ready = asyncio.Event()
        self._workers: dict[str, Callable[[], Awaitable[None]]] = {}
        self._worker_state: dict[str, dict[str, Any]] = {}
        self._pull_listeners: list[PullListener] = []
        self._status_hooks: dict[str, StatusHook] = {}
        self._pull_wrapper: Any = None
        self._stop: asyncio.Event | None = None
        self._dirty_event: asyncio.Event | None = None
        self._last_upstream_ok = 0.0
        # --- pod pulls (issue 14): one limit on the pulls nodeagent starts itself, pod pulls and
        # prefetch calls through the proxy alike (nodeagent/proxy/slots.py) ---
        self.pull_slots = PullSlots(config.pod_pulls.concurrency)
        self._checked_mono = 0.0
        self._proxy: Any = None
        self._http: asyncio.Server | None = None
        self._cri: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._listener_tasks: set[asyncio.Task[None]] = set()

    # --- extension points ----------------------------------------------------------------------
    def add_worker(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn()`` for the daemon's lifetime; restarted with backoff if it raises; cancelled
        at shutdown."""
        if name in self._workers:
            raise ValueError(f"worker {name!r} already added")
        self._workers[name] = fn

    def add_pull_listener(self, cb: PullListener) -> None:
        """``cb(record)`` after every PullImage through the proxy (sync or async; errors logged)."""
        self._pull_listeners.append(cb)

    def add_status_hook(self, name: str, fn: StatusHook) -> None:
        """``fn()`` becomes section ``name`` of the status file. A section with a true
        ``degraded`` key makes ``nodeagent status`` exit 1."""
        self._status_hooks[name] = fn

    def set_pull_wrapper(self, fn: Any) -> None:
        """``await fn(registry, call) -> (response, retry_reason)`` wraps every upstream PullImage
        (mirror health uses it to restart a pull stuck on a mirror that went down)."""
        self._pull_wrapper = fn
        if self._proxy is not None:
            self._proxy.pull_wrapper = fn

    @property
    def proxy(self) -> Any:
        """The running CRI proxy (``nodeagent.proxy.server.ImageProxy``), or None."""
        return self._proxy

    @property
    def cri(self) -> Any:
        """The daemon's CRI client to the upstream image service (``cri.endpoint``)."""
        return self._cri

    def mark_status_dirty(self) -> None:
        if self._dirty_event is not None:
            self._dirty_event.set()

    def update_cache_stats(
        self, images: int, size_bytes: int, imagefs_used_ratio: float | None, imagefs_path: str = ""
    ) -> None:
        """One place that sets the cache/imagefs gauges and the status ``cache`` section (the
        daemon refreshes it every minute; eviction may call it more often)."""
        self.metrics.cache_images.set(images)
        self.metrics.cache_bytes.set(size_bytes)
        if imagefs_used_ratio is not None:
            self.metrics.imagefs_used_ratio.set(imagefs_used_ratio)
        self.cache = {
            "images": images,
            "bytes": size_bytes,
            "imagefsUsedRatio": None if imagefs_used_ratio is None else round(imagefs_used_ratio, 4),
            "imagefsPath": imagefs_path,
            "at": time.time(),
        }
        self.mark_status_dirty()

    # --- run -----------------------------------------------------------------------------------
    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def run(self) -> int:
        from nodeagent.cri.client import CriClient
        from nodeagent.proxy.server import ImageProxy, proxy_limits

        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._dirty_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        self.last_used.load()
        self._cri = CriClient(self.config.cri.endpoint, timeout=HEALTH_TIMEOUT)
        listener: socket.socket | None = None
        try:
            listener = self._inherited_listener()
            await self._start_http()
            if self.proxy_socket is not None:
                self._proxy = ImageProxy(
                    self.config.cri.endpoint,
                    self.proxy_socket,
                    self.metrics,
                    self.last_used,
                    on_pull=self._on_pull,
                    on_upstream=self._on_upstream,
                    pull_wrapper=self._pull_wrapper,
                    limits=proxy_limits(self.config.cri.proxy_max_connections),
                    slots=self.pull_slots,  # pod pulls (issue 14)
                )
                await self._proxy.start(listener)
        except Exception:
            if listener is not None and self._proxy is None:
                listener.close()
            await self._shutdown(write_status=False)  # the file may belong to a live instance
            raise
        # Everything made during start-up (config, metrics, stubs, imported modules) lives as long
        # as the daemon: out of the garbage collector's sight, collections while serving stay short.
        gc.collect()
        gc.freeze()
        event(  # before the status file: whoever sees the file running also finds this line
            log,
            "ready",
            proxy_socket=str(self.proxy_socket or ""),
            socket_inherited=self.socket_inherited,
            upstream=self.config.cri.endpoint,
            metrics=self.metrics_address,
            startup_seconds=round(time.time() - self.started_at, 3),
            version=__version__,
        )
        self._write_status()
        sd_notify("READY=1\nSTATUS=serving", self.environ)
        self.ready.set()
        self._tasks = [
            asyncio.ensure_future(self._health_loop()),
            asyncio.ensure_future(self._status_loop()),
            asyncio.ensure_future(self._cache_stats_loop()),
            asyncio.ensure_future(self._last_used_loop()),
            asyncio.ensure_future(self._memory_loop()),
        ]
        wd = watchdog_interval(self.environ)
        if wd:
            self._tasks.append(asyncio.ensure_future(self._watchdog_loop(wd)))
        for name, fn in self._workers.items():
            self._tasks.append(asyncio.ensure_future(self._supervise(name, fn)))
        await self._stop.wait()
        sd_notify("STOPPING=1", self.environ)
        event(log, "stopping", drain_seconds=self.drain_seconds)
        await self._shutdown()
        event(log, "stopped")
        return 0

    def _inherited_listener(self) -> socket.socket | None:
        """The proxy's listening socket if systemd passed it (socket activation), else None (the
        proxy binds ``cri.proxySocket`` itself). The LISTEN_* variables are consumed either way."""
        sock = take_unix_listener(listen_fds(self.environ))
        if sock is None:
            return None
        path = socket_path(sock)
        if self.proxy_socket is None:
            event(
                log,
                "socket passed by systemd left unused: cri.proxySocket is empty, the proxy is off "
                "(to close it: systemctl mask --now nodeagent.socket)",
                level=30,
                inherited_socket=path,
            )
            sock.close()  # our copy; systemd keeps its own
            return None
        if not same_socket_path(path, self.proxy_socket):
            event(
                log,
                "socket passed by systemd is not cri.proxySocket: serving cri.proxySocket on a socket "
                "of our own, so restarts refuse calls; make ListenStream= of nodeagent.socket (a "
                "drop-in) and cri.proxySocket the same path",
                level=30,
                inherited_socket=path,
                proxy_socket=str(self.proxy_socket),
            )
            sock.close()
            return None
        self.socket_inherited = True
        return sock

    def _on_signal(self, sig: int) -> None:
        event(log, "signal", signal=signal.Signals(sig).name)
        self.stop()

    async def _shutdown(self, write_status: bool = True) -> None:
        if self._proxy is not None:
            await self._proxy.stop(self.drain_seconds)
        for t in self._tasks:
            t.cancel()
        if self._tasks:  # bounded: a task that ignores its cancel must not keep the node's daemon up
            _, stuck = await asyncio.wait(self._tasks, timeout=SHUTDOWN_TASKS_TIMEOUT)
            for t in stuck:
                event(log, "task did not stop", level=30, task=repr(t.get_coro()))
        if self._listener_tasks:
            await asyncio.wait(set(self._listener_tasks), timeout=2.0)
        if self._http is not None:
            self._http.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http.wait_closed(), 2.0)
        if self._cri is not None:
            await self._cri.close()
        if not write_status:
            return
        try:
            self.last_used.save()
        except OSError as e:
            event(log, "saving last-used times failed", level=40, error=str(e))
        self._write_status(state="stopped")

    # --- workers -------------------------------------------------------------------------------
    async def _supervise(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        backoff = WORKER_BACKOFF
        st = self._worker_state.setdefault(name, {"state": "running", "restarts": 0, "lastError": None})
        while True:
            st["state"] = "running"
            try:
                await fn()
                st["state"] = "exited"
                event(log, "worker exited", worker=name)
                return
            except asyncio.CancelledError:
                st["state"] = "stopped"
                raise
            except Exception as e:
                st["restarts"] += 1
                st["lastError"] = f"{type(e).__name__}: {e}"[:500]
                st["state"] = "restarting"
                self.mark_status_dirty()
                log.exception("worker %s failed; restarting in %.0fs", name, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, WORKER_MAX_BACKOFF)

    async def _health_loop(self) -> None:
        while True:
            if time.monotonic() - self._last_upstream_ok >= HEALTH_INTERVAL:
                await self.check_upstream()  # only when the proxy saw no answer lately
            await asyncio.sleep(HEALTH_INTERVAL)

    async def check_upstream(self, max_age: float = 0.0) -> bool:
        """Does the upstream image service answer? (ImageFsInfo: every image service has it.)
        A result younger than ``max_age`` seconds is reused (a /healthz flood is not a CRI flood)."""
        import grpc

        from nodeagent.cri.client import CriError

        if max_age and self._checked_mono and time.monotonic() - self._checked_mono < max_age:
            return bool(self.upstream_ok)
        try:
            await self._cri.image_fs_info()
        except CriError as e:
            answered = e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            self._on_upstream(answered, "" if answered else str(e))
        else:
            self._on_upstream(True, "")
        self.upstream_checked_at = time.time()
        self._checked_mono = time.monotonic()
        return bool(self.upstream_ok)

    def _on_upstream(self, ok: bool, error: str) -> None:
        if ok != self.upstream_ok:
            if ok:
                event(log, "upstream CRI answering", upstream=self.config.cri.endpoint)
            else:
                event(
                    log,
                    "upstream CRI not answering",
                    level=30,
                    upstream=self.config.cri.endpoint,
                    error=error,
                )
            self.mark_status_dirty()
        self.upstream_ok = ok
        self.upstream_error = error
        if ok:
            self._last_upstream_ok = time.monotonic()
        self.metrics.upstream_up.set(1 if ok else 0)

    async def _cache_stats_loop(self) -> None:
        from nodeagent.cri.client import CriError

        while True:
            # The eviction loop reports the same figures every eviction.interval (update_cache_stats);
            # list the images here only when nothing did within the last interval.
            if time.time() - float(self.cache.get("at", 0.0)) >= CACHE_STATS_INTERVAL:
                try:
                    await self.refresh_cache_stats()
                except CriError:
                    pass  # the runtime is not answering: /healthz and the status file say so
                except Exception:
                    log.exception("cache stats failed")  # a bug: visible, and the loop goes on
            await asyncio.sleep(CACHE_STATS_INTERVAL)

    async def refresh_cache_stats(self) -> None:
        """Image count and size from ListImages; imagefs usage measured the way eviction measures
        it (``eviction.imagefsPath`` under ``--root``, else the runtime's mountpoint; statvfs)."""
        from nodeagent.eviction import usage

        images = await self._cri.list_images()
        configured = self.config.eviction.imagefs_path
        mountpoint = "" if configured else usage.mountpoint_from_imagefs_info(await self._cri.image_fs_info())
        ratio: float | None = None
        path = ""
        try:
            where = usage.imagefs_path(self.paths, configured, mountpoint)
            path = str(where)
            ratio = usage.measure(where).ratio
        except usage.UsageError:
            pass
        self.update_cache_stats(len(images), sum(int(i.size) for i in images), ratio, path)

    async def _last_used_loop(self) -> None:
        while True:
            await asyncio.sleep(LAST_USED_SAVE_INTERVAL)
            try:
                self.last_used.save()
            except OSError as e:
                event(log, "saving last-used times failed", level=40, error=str(e))

    async def _memory_loop(self) -> None:
        from nodeagent import memory

        last = time.monotonic()
        while True:
            await asyncio.sleep(MEMORY_TRIM_CHECK)
            if memory.take_pending() or time.monotonic() - last >= MEMORY_TRIM_INTERVAL:
                last = time.monotonic()
                if not memory.trim():
                    return  # no glibc: nothing to do

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            sd_notify("WATCHDOG=1", self.environ)
            await asyncio.sleep(interval)

    # --- pulls -----------------------------------------------------------------------------------
    def _on_pull(self, rec: PullRecord) -> None:
        self.recent_pulls.append(rec.to_json())
        self.pull_totals[rec.result] += 1
        self.mark_status_dirty()
        for cb in self._pull_listeners:
            try:
                res = cb(rec)
            except Exception:
                log.exception("pull listener failed")
                continue
            if inspect.isawaitable(res):
                task = asyncio.ensure_future(self._await_listener(res))
                self._listener_tasks.add(task)
                task.add_done_callback(self._listener_tasks.discard)

    async def _await_listener(self, aw: Awaitable[None]) -> None:
        try:
            await aw
        except Exception:
            log.exception("pull listener failed")

    # --- status file -----------------------------------------------------------------------------
    async def _status_loop(self) -> None:
        assert self._dirty_event is not None
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that arrives as the
            # event is set, and the daemon's shutdown would then wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATUS_INTERVAL):
                    await self._dirty_event.wait()
                await asyncio.sleep(STATUS_DEBOUNCE)
            self._dirty_event.clear()
            # The file is written (with its fsyncs) off the event loop: the proxy keeps answering.
            body = self._status_body()
            await asyncio.to_thread(self._write_status_body, body)

    def status(self, state: str = "running") -> dict[str, Any]:
        sections: dict[str, Any] = {}
        for name, fn in self._status_hooks.items():
            try:
                sections[name] = dict(fn())
            except Exception as e:
                sections[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if state == "running":  # the same judgement as `nodeagent status`, as a metric
            self.metrics.set_degraded("upstream", self.upstream_ok is False)
            for name, section in sections.items():
                self.metrics.set_degraded(name, bool(section.get("degraded") or section.get("error")))
        return {
            "version": 1,
            "nodeagentVersion": __version__,
            "state": state,
            "pid": os.getpid(),
            "startedAt": self.started_at,
            "updatedAt": time.time(),
            "heartbeatSeconds": STATUS_INTERVAL,
            "proxy": {
                "socket": str(self.proxy_socket or ""),
                "socketInherited": self.socket_inherited,
                "upstream": self.config.cri.endpoint,
                "upstreamOk": self.upstream_ok,
                "upstreamError": self.upstream_error,
                "upstreamCheckedAt": self.upstream_checked_at,
            },
            "metrics": {"listen": self.metrics_address},
            "pulls": {
                "inFlight": self._proxy.in_flight if self._proxy is not None else 0,
                "totals": dict(self.pull_totals),
                "recent": list(self.recent_pulls),
            },
            "cache": self.cache,
            "workers": self._worker_state,
            "sections": sections,
        }

    def _write_status(self, state: str = "running") -> None:
        self._write_status_body(self._status_body(state))

    def _status_body(self, state: str = "running") -> str:
        return json.dumps(self.status(state), indent=1, sort_keys=True, default=str) + "\n"

    def _write_status_body(self, body: str) -> None:
        try:
            write_atomic(self.paths.daemon_status_file, body, mode=0o644)
        except OSError as e:
            event(log, "writing the status file failed", level=40, error=str(e))

    # --- HTTP: /metrics and /healthz -----------------------------------------------------------
    async def _start_http(self) -> None:
        host, port = parse_listen(self.config.metrics.listen)
        self._http = await asyncio.start_server(self._serve_http, host, port, limit=HTTP_HEADER_LIMIT)
        sock = self._http.sockets[0].getsockname()
        h = sock[0]
        self.metrics_address = f"[{h}]:{sock[1]}" if ":" in h else f"{h}:{sock[1]}"

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HTTP_READ_TIMEOUT)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) != 3:
                await self._respond(writer, 400, b"bad request\n")
                return
            method, target, _ = parts
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await self._respond(writer, 405, b"method not allowed\n", head_only=False)
            elif path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                body = generate_latest(self.metrics.registry)
                await self._respond(writer, 200, body, CONTENT_TYPE_LATEST, head_only=method == "HEAD")
            elif path == "/healthz":
                ok = await self.check_upstream(max_age=HEALTHZ_CACHE_SECONDS)
                msg = (
                    "ok: upstream CRI answers\n"
                    if ok
                    else f"upstream CRI not answering: {self.upstream_error}\n"
                )
                await self._respond(writer, 200 if ok else 503, msg.encode(), head_only=method == "HEAD")
            elif path == "/":
                await self._respond(writer, 200, b"nodeagent: /metrics /healthz\n")
            else:
                await self._respond(writer, 404, b"not found\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        head_only: bool = False,
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}.get(
            status, "Service Unavailable"
        )
        hdr = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(hdr.encode() + (b"" if head_only else body))
        await writer.drain()
