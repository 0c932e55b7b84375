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

``Daemon`` is the supervisor: it starts and stops the parts, each in a module named for its job
(``nodeagent/run/``: the metrics endpoint, upstream health, cache figures, pull fan-out, the status
file; ``sd_daemon.py``: systemd; ``memory.py``: malloc_trim), and restarts a feature's worker that
crashes, with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from nodeagent import __version__
from nodeagent.config.model import Config
from nodeagent.eviction.usage import Imagefs, configured_path
from nodeagent.images.lastused import LastUsed
from nodeagent.proxy.slots import PullSlots
from nodeagent.run.cachestats import CacheStats
from nodeagent.run.http import MetricsEndpoint
from nodeagent.run.metrics import Metrics
from nodeagent.run.pulls import PullFeed, PullListener
from nodeagent.run.sd_daemon import (
    listen_fds,
    same_socket_path,
    sd_notify,
    socket_path,
    take_unix_listener,
    watchdog,
)
from nodeagent.run.statusfile import (
    VERSION,
    DaemonStatus,
    MetricsStatus,
    ProxyStatus,
    Section,
    WorkerStatus,
)
from nodeagent.run.statuswriter import HEARTBEAT, StatusWriter
from nodeagent.run.upstream import UpstreamHealth
from nodeagent.util import memory
from nodeagent.util.log import event, get_logger
from nodeagent.util.paths import Paths

if TYPE_CHECKING:
    from nodeagent.cri.client import CriClient
    from nodeagent.cri.runtime import ImageService
    from nodeagent.proxy.pulls import PullWrapper
    from nodeagent.proxy.server import ImageProxy

log = get_logger(__name__)

DRAIN_SECONDS = 10.0
UPSTREAM_TIMEOUT = 2.0  # the daemon's own CRI calls: health checks and cache figures
SHUTDOWN_TASKS_TIMEOUT = 2.0  # background loops get this long to stop after their cancel
LAST_USED_SAVE_INTERVAL = 60.0
WORKER_BACKOFF = 1.0  # first restart delay of a crashed worker; doubles up to WORKER_MAX_BACKOFF
WORKER_MAX_BACKOFF = 60.0

StatusHook = Callable[[], Mapping[str, Any]]


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
        self.ready = asyncio.Event()
        self.status_writer = StatusWriter(paths.daemon_status_file, self.status)
        changed = self.status_writer.mark_dirty
        self.upstream = UpstreamHealth(config.cri.endpoint, self.metrics, on_change=changed)
        imagefs = Imagefs(paths, configured_path(config))
        self.cache = CacheStats(self.metrics, imagefs, on_change=changed)
        self.pulls = PullFeed(on_change=changed)
        self.pulls.add_listener(self.cache.on_pull)
        self.http = MetricsEndpoint(config.metrics.listen, self.metrics, self._healthz)
        # one limit on the pulls nodeagent starts itself, pod pulls and prefetch calls through the
        # proxy alike (nodeagent/proxy/slots.py)
        self.pull_slots = PullSlots(config.pod_pulls.concurrency)
        self._workers: dict[str, Callable[[], Awaitable[None]]] = {}
        self._worker_state: dict[str, WorkerStatus] = {}
        self._status_hooks: dict[str, StatusHook] = {}
        self._pull_wrapper: PullWrapper | None = None
        self._stop: asyncio.Event | None = None
        self._proxy: ImageProxy | None = None
        self._cri: CriClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # --- extension points ----------------------------------------------------------------------
    def add_worker(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn()`` for the daemon's lifetime; restarted with backoff if it raises; cancelled
        at shutdown."""
        if name in self._workers:
            raise ValueError(f"worker {name!r} already added")
        self._workers[name] = fn

    def add_pull_listener(self, cb: PullListener) -> None:
        """``cb(record)`` after every PullImage through the proxy (sync or async; errors logged)."""
        self.pulls.add_listener(cb)

    def add_status_hook(self, name: str, fn: StatusHook) -> None:
        """``fn()`` becomes section ``name`` of the status file (``statusfile.Section``: ``at``,
        ``degraded``, ``error``, ``summary`` and the feature's own keys). A true ``degraded`` or an
        ``error`` makes ``nodeagent status`` exit 1."""
        self._status_hooks[name] = fn

    def set_pull_wrapper(self, fn: PullWrapper) -> None:
        """``await fn(registry, call) -> (response, retry_reason)`` wraps every upstream PullImage
        (mirror health uses it to restart a pull stuck on a mirror that went down)."""
        self._pull_wrapper = fn
        if self._proxy is not None:
            self._proxy.pull_wrapper = fn

    @property
    def proxy(self) -> ImageProxy | None:
        """The running CRI proxy (``nodeagent.proxy.server.ImageProxy``), or None."""
        return self._proxy

    @property
    def cri(self) -> ImageService:
        """The daemon's CRI client to the upstream image service (``cri.endpoint``); made by ``run``."""
        assert self._cri is not None, "the daemon is not running"
        return self._cri

    @property
    def metrics_address(self) -> str | None:
        """``host:port`` the metrics endpoint is bound to (None before it is)."""
        return self.http.address

    def mark_status_dirty(self) -> None:
        self.status_writer.mark_dirty()

    # --- run -----------------------------------------------------------------------------------
    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def run(self) -> int:
        from nodeagent.cri.client import CriClient
        from nodeagent.proxy.server import ImageProxy, proxy_limits

        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        self.last_used.load()
        self._cri = self.upstream.cri = CriClient(self.config.cri.endpoint, timeout=UPSTREAM_TIMEOUT)
        listener: socket.socket | None = None
        try:
            listener = self._inherited_listener()
            await self.http.start()
            if self.proxy_socket is not None:
                self._proxy = ImageProxy(
                    self.config.cri.endpoint,
                    self.proxy_socket,
                    self.metrics,
                    self.last_used,
                    on_pull=self.pulls.on_pull,
                    on_upstream=self.upstream.observe,
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
        self.status_writer.write()
        sd_notify("READY=1\nSTATUS=serving", self.environ)
        self.ready.set()
        background: list[Awaitable[None]] = [
            self.upstream.run(),
            self.status_writer.run(),
            self.cache.run(self._cri),
            self._last_used_loop(),
            memory.trim_loop(),
            watchdog(self.environ),
        ]
        self._tasks = [asyncio.ensure_future(aw) for aw in background]
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
        await self.pulls.wait_listeners(SHUTDOWN_TASKS_TIMEOUT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.http.stop(), SHUTDOWN_TASKS_TIMEOUT)
        if self._cri is not None:
            await self._cri.close()
        if not write_status:
            return
        try:
            self.last_used.save()
        except OSError as e:
            event(log, "saving last-used times failed", level=40, error=str(e))
        self.status_writer.write("stopped")

    # --- workers -------------------------------------------------------------------------------
    async def _supervise(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        backoff = WORKER_BACKOFF
        st = self._worker_state.setdefault(name, WorkerStatus("running", 0, None, time.time()))

        def enter(state: str) -> None:
            st.state, st.since = state, time.time()

        while True:
            enter("running")
            try:
                await fn()
                enter("exited")
                event(log, "worker exited", worker=name)
                return
            except asyncio.CancelledError:
                enter("stopped")
                raise
            except Exception as e:
                st.restarts += 1
                st.last_error = f"{type(e).__name__}: {e}"[:500]
                enter("restarting")
                self.mark_status_dirty()
                log.exception("worker %s failed; restarting in %.0fs", name, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, WORKER_MAX_BACKOFF)

    async def _last_used_loop(self) -> None:
        while True:
            await asyncio.sleep(LAST_USED_SAVE_INTERVAL)
            try:
                self.last_used.save()
            except OSError as e:
                event(log, "saving last-used times failed", level=40, error=str(e))

    async def _healthz(self, max_age: float) -> tuple[bool, str]:
        ok = await self.upstream.check(max_age)
        return ok, self.upstream.error

    # --- status --------------------------------------------------------------------------------
    def status(self, state: str = "running") -> DaemonStatus:
        """The status file's content as of now (``nodeagent/run/statusfile.py``)."""
        now = time.time()
        sections: dict[str, Section] = {}
        for name, fn in self._status_hooks.items():
            try:
                sections[name] = Section.of(dict(fn()), now)
            except Exception as e:
                sections[name] = Section(at=now, error=f"{type(e).__name__}: {e}"[:500])
        if state == "running":  # the same judgement as `nodeagent status`, as a metric
            self.metrics.set_degraded("upstream", self.upstream.ok is False)
            for name, section in sections.items():
                self.metrics.set_degraded(name, section.degraded or bool(section.error))
        up = self.upstream
        return DaemonStatus(
            version=VERSION,
            nodeagent_version=__version__,
            state=state,
            pid=os.getpid(),
            started_at=self.started_at,
            updated_at=now,
            heartbeat_seconds=HEARTBEAT,
            proxy=ProxyStatus(
                socket=str(self.proxy_socket or ""),
                socket_inherited=self.socket_inherited,
                upstream=self.config.cri.endpoint,
                upstream_ok=up.ok,
                upstream_error=up.error,
                upstream_checked_at=up.checked_at,
            ),
            metrics=MetricsStatus(listen=self.metrics_address),
            pulls=self.pulls.status(now, self._proxy.in_flight if self._proxy is not None else 0),
            cache=self.cache.current,
            workers={k: dataclasses.replace(v) for k, v in self._worker_state.items()},
            sections=sections,
        )
