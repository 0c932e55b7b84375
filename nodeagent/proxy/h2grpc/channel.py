"""``Channel``: calls to one upstream over a shared HTTP/2 connection, made on first use."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from nodeagent.proxy.h2grpc.clientconn import OnDone, PendingCall, _ClientConn, _ClientStream
from nodeagent.proxy.h2grpc.limits import Limits
from nodeagent.proxy.h2grpc.wire import OK, RpcError, parse_endpoint

if TYPE_CHECKING:
    from nodeagent.proxy.h2grpc.call import ServerCall


class Channel:
    """Calls to one upstream over a shared HTTP/2 connection."""

    def __init__(
        self,
        endpoint: str,
        *,
        max_message: int,
        connect_timeout: float = 5.0,
        limits: Limits | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.max_message = max_message
        self.connect_timeout = connect_timeout
        self.limits = limits or Limits()
        self._kind, self._addr = parse_endpoint(endpoint)
        self._conn: _ClientConn | None = None
        self._connecting: asyncio.Future[_ClientConn] | None = None

    def _ready(self) -> _ClientConn | None:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.draining:
            return conn
        return None

    async def _connection(self) -> _ClientConn:
        conn = self._ready()
        if conn is not None:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        fut = self._connecting
        try:
            return await asyncio.shield(fut)
        finally:
            if fut.done() and self._connecting is fut:
                self._connecting = None

    async def _connect(self) -> _ClientConn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self._kind == "unix":
                    assert isinstance(self._addr, str)
                    _, conn = await loop.create_unix_connection(lambda: _ClientConn(self), self._addr)
                else:
                    assert isinstance(self._addr, tuple)
                    host, port = self._addr
                    _, conn = await loop.create_connection(lambda: _ClientConn(self), host, port)
        except OSError as e:
            raise RpcError(
                grpc.StatusCode.UNAVAILABLE, f"cannot connect to {self.endpoint}: {e.strerror or e}"
            ) from None
        except TimeoutError:
            raise RpcError(
                grpc.StatusCode.UNAVAILABLE, f"cannot connect to {self.endpoint}: timed out"
            ) from None
        self._conn = conn
        return conn

    def start(
        self,
        method: str,
        request: bytes,
        on_done: OnDone,
        *,
        timeout: float | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        pipe: ServerCall | None = None,
        capture: int = 0,
    ) -> PendingCall:
        """Start a unary call now (when connected, the request is written before this returns);
        ``on_done(message, None)`` or ``on_done(None, RpcError)`` runs once it ends. With ``pipe``,
        the answer's bytes go to that call as they arrive (its window re-opened upstream only as
        the caller takes them), and ``message`` is the answer if it was at most ``capture`` bytes,
        else None (also on success)."""
        pc = PendingCall(on_done)
        if pipe is not None:
            pc.pipe = pipe
            pc.capture = capture
            pc.raw = bytearray() if capture else None
        loop = asyncio.get_running_loop()
        if timeout is not None:
            pc.timer = loop.call_later(timeout, pc._expired)
        conn = self._ready()
        if conn is not None:
            self._open(pc, conn, method, request, timeout, metadata)
        else:
            pc.task = loop.create_task(self._connect_and_open(pc, method, request, timeout, metadata))
        return pc

    def _open(
        self,
        pc: PendingCall,
        conn: _ClientConn,
        method: str,
        request: bytes,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        pc.conn = conn
        try:
            pc.sid = conn.open(method, request, timeout, metadata, pc)
        except RpcError as e:
            pc.conn = None
            asyncio.get_running_loop().call_soon(pc._complete, None, e)

    async def _connect_and_open(
        self,
        pc: PendingCall,
        method: str,
        request: bytes,
        timeout: float | None,  # noqa: ASYNC109 (sent as grpc-timeout)
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        try:
            conn = await self._connection()
        except RpcError as e:
            pc.task = None
            pc._complete(None, e)
            return
        pc.task = None
        if pc.on_done is None:  # cancelled meanwhile
            return
        if pc.timer is not None:
            timeout = max(0.0, pc.timer.when() - asyncio.get_running_loop().time())
        self._open(pc, conn, method, request, timeout, metadata)

    async def unary(
        self,
        method: str,
        request: bytes,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the call's deadline, also sent upstream)
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> bytes:
        """One unary call; the response message's bytes, or RpcError."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def done(message: bytes | None, error: RpcError | None) -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                assert message is not None
                fut.set_result(message)

        pc = self.start(method, request, done, timeout=timeout, metadata=metadata)
        try:
            return await fut
        except asyncio.CancelledError:
            pc.cancel()
            raise

    async def unary_stream(
        self,
        method: str,
        request: bytes,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the call's deadline, also sent upstream)
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> AsyncIterator[bytes]:
        """A server-streaming call: its messages as they come, then RpcError unless it ended OK."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        conn = await self._connection()
        st = _ClientStream(True)
        sid = conn.open(method, request, timeout, metadata, st)
        assert st.event is not None
        try:
            while True:
                while st.messages:
                    msg = st.messages.popleft()
                    conn.consumed(sid, st)
                    yield msg
                if st.done:
                    break
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    await st.event.wait()
                st.event.clear()
        except TimeoutError:
            conn.cancel(sid)
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except (asyncio.CancelledError, GeneratorExit):
            conn.cancel(sid)
            raise
        if st.error is not None:
            raise st.error
        code, details = st.status or (grpc.StatusCode.INTERNAL, "no status")
        if code != OK:
            raise RpcError(code, details)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                conn.h2.close_connection()
            conn.close()
