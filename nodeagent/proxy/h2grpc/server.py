"""The gRPC server on a unix socket: admission at the connection limit, calls in flight, stop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import grpc

from nodeagent.proxy.h2grpc.call import Resolver, ServerCall
from nodeagent.proxy.h2grpc.limits import _IDLE_CLIENT_GRACE, _NEW_CONNECTION_GRACE, Limits, LogLimiter
from nodeagent.proxy.h2grpc.serverconn import _ServerConn
from nodeagent.util.log import event, get_logger

log = get_logger(__package__)  # one logger for the package: "nodeagent.proxy.h2grpc"


class Server:
    """gRPC server on a unix socket (one it binds, or one it is given already listening)."""

    def __init__(
        self,
        resolve: Resolver,
        *,
        max_message: int,
        limits: Limits | None = None,
        on_abandoned: Callable[[ServerCall], None] | None = None,
    ) -> None:
        self.resolve = resolve
        self.max_message = max_message  # request messages
        self.limits = limits or Limits()
        self.on_abandoned = on_abandoned
        self.log_limit = LogLimiter()
        self.held = 0  # request bytes held, all connections
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_ServerConn] = set()
        self._active: set[ServerCall] = set()
        self._idle: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None

    def _admit(self, conn: _ServerConn) -> bool:
        """Room for one more connection: at the limit, the longest-idle connection that never sent a
        call (and is older than half a second) makes room, else the longest-idle one that has had no
        call for 10 s; else the new one is refused."""
        if len(self._conns) >= self.limits.max_connections:
            now = time.monotonic()  # a connection gets a moment to send its first call
            idle = [
                c
                for c in self._conns
                if not c.calls
                and (
                    now - c.active > _IDLE_CLIENT_GRACE if c.used else now - c.opened > _NEW_CONNECTION_GRACE
                )
            ]
            victim = min(idle, key=lambda c: (c.used, c.active), default=None)
            if victim is None:
                if self.log_limit.allow("connections"):
                    event(log, "proxy connection refused: limit", level=30, limit=self.limits.max_connections)
                return False
            victim.go_away()
            victim.close()
            self._conns.discard(victim)
        self._conns.add(conn)
        return True

    def _started(self, call: ServerCall) -> None:
        self._active.add(call)

    def _ended(self, call: ServerCall) -> None:
        self._active.discard(call)
        if not self._active and self._idle is not None:
            self._idle.set()
        if self.held and call.received == 0 and call.kind:
            for c in list(self._conns):
                c.retry_acks()

    def _abandoned(self, call: ServerCall) -> None:
        if self.on_abandoned is not None:
            try:
                self.on_abandoned(call)
            except Exception:
                log.exception("abandoned-call hook failed")

    @property
    def in_flight(self) -> int:
        return sum(1 for c in self._active if c.kind)

    async def start_unix(self, path: str, backlog: int = 100) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _ServerConn(self), path=path, backlog=backlog)
        self._timer = loop.call_later(1.0, self._tick)

    async def start_socket(self, sock: Any, backlog: int = 100) -> None:
        """Serve on a socket that is already bound and listening (socket activation). asyncio calls
        ``listen()`` on it again, so ``backlog`` must be the one the socket was made with."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _ServerConn(self), sock=sock, backlog=backlog)
        self._timer = loop.call_later(1.0, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        for c in list(self._conns):
            if c.closed:
                self._conns.discard(c)
            else:
                c.tick(now)
        self._timer = asyncio.get_running_loop().call_later(1.0, self._tick)

    async def stop(self, grace: float) -> None:
        """No new connections or calls; calls in flight get ``grace`` seconds, then are cancelled."""
        if self._server is not None:
            self._server.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for c in list(self._conns):
            c.go_away()
        if self._active:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        for call in list(self._active):
            on_cancel = call.on_cancel
            call.fail(grpc.StatusCode.CANCELLED, "the proxy is shutting down")
            if call.task is not None:
                call.task.cancel()
            if on_cancel is not None:
                on_cancel()
        await asyncio.sleep(0)
        for c in list(self._conns):
            c.close()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        self.log_limit.flush()


# --- client ------------------------------------------------------------------------------------
