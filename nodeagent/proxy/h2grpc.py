"""gRPC for the image proxy, on ``nodeagent.proxy.http2``: a server for the kubelet's calls and a
channel to the upstream image service. Messages are opaque bytes (never decoded here).

Why not grpc.aio: in grpc 1.85 every message that reaches a grpc.aio server or channel passes through
four threads (event-engine poller and worker, the completion-queue poller, then the asyncio loop). After
the ~12 ms a cached pull leaves the proxy idle, each of those wake-ups is a cold one: a bare grpc.aio
passthrough added 1.4-2.0 ms to a cached PullImage (docs/proxy.md). Here the asyncio loop reads and
writes both sockets itself, and a relayed call runs no task at all: the caller's request is written
upstream from the callback that read it, and the upstream's answer is written back to the caller from
the callback that read *it*.

- ``Server`` serves three kinds of method handlers (``resolve(method) -> (kind, handler)``):
  ``"relay"``: ``handler(call)`` is a plain function that must end the call with ``call.reply()`` or
  ``call.fail()`` (now or later) and may set ``call.on_cancel``; ``"unary"``: ``async handler(request,
  ctx) -> bytes``; ``"stream"``: an async generator of response messages.
- ``Channel`` calls one upstream over one shared connection, made on first use and again after the
  upstream went away; with nothing listening a call fails with UNAVAILABLE at once. ``start()`` is the
  callback form (``on_done(message, error)`` exactly once, unless cancelled), ``unary()`` and
  ``unary_stream()`` the awaitable ones.

Deadlines travel as ``grpc-timeout`` and are enforced on the channel side; a caller's RST_STREAM
cancels its handler and the upstream call; status code and message travel in trailers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import socket
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote, unquote

import grpc

from nodeagent.log import get_logger
from nodeagent.proxy.http2 import (
    CANCEL,
    NO_ERROR,
    REFUSED_STREAM,
    RST_STREAM,
    WINDOW,
    Connection,
    ProtocolError,
    StreamGone,
    encode_headers,
    frame_bytes,
)

log = get_logger(__name__)

_CODES = {c.value[0]: c for c in grpc.StatusCode}
OK = grpc.StatusCode.OK
# Metadata that belongs to one hop (HTTP/2 and gRPC framing) and is never copied to the next.
_HOP = frozenset({b"content-type", b"te", b"user-agent", b"host", b"connection"})
_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
_MAX_STREAM_ID = 2**31 - 1


class RpcError(Exception):
    """A call ended with a non-OK status (the upstream's, or UNAVAILABLE when it cannot be reached)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


# --- gRPC wire helpers -------------------------------------------------------------------------
def message_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def encode_timeout(seconds: float) -> bytes:
    """``grpc-timeout``: at most 8 digits and a unit; rounded up (never shortens the deadline)."""
    for unit, scale in ((b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60), (b"H", 1 / 3600)):
        v = math.ceil(max(seconds, 0.0) * scale)
        if v < 100_000_000:
            return str(max(v, 1)).encode() + unit
    return b"99999999H"


_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def decode_timeout(value: bytes) -> float | None:
    try:
        return int(value[:-1]) * _TIMEOUT_UNITS[value[-1:]]
    except (ValueError, KeyError):
        return None


def encode_message(details: str) -> bytes:
    """``grpc-message`` is percent-encoded UTF-8 (gRPC over HTTP/2)."""
    return quote(details, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()


def decode_message(value: bytes) -> str:
    return unquote(value.decode("ascii", "replace"), errors="replace")


def status_headers(code: grpc.StatusCode, details: str) -> list[tuple[bytes, bytes]]:
    out = [(b"grpc-status", str(code.value[0]).encode())]
    if details:
        out.append((b"grpc-message", encode_message(details)))
    return out


_RESPONSE_BLOCK = encode_headers(_RESPONSE_HEADERS)
_OK_BLOCK = encode_headers(status_headers(OK, ""))


def status_of(headers: list[tuple[bytes, bytes]]) -> tuple[grpc.StatusCode, str] | None:
    code: grpc.StatusCode | None = None
    details = ""
    for k, v in headers:
        if k == b"grpc-status":
            try:
                code = _CODES.get(int(v), grpc.StatusCode.UNKNOWN)
            except ValueError:
                code = grpc.StatusCode.UNKNOWN
        elif k == b"grpc-message":
            details = decode_message(v)
    return None if code is None else (code, details)


def whole_message(data: bytes, limit: int) -> bytes | None:
    """The message if ``data`` is exactly one uncompressed gRPC message within ``limit`` (the usual
    case: a unary call's message in one DATA frame), else None."""
    if len(data) >= 5 and not data[0] and int.from_bytes(data[1:5], "big") == len(data) - 5 <= limit:
        return data[5:]
    return None


class MessageReader:
    """Cuts length-prefixed gRPC messages out of DATA frames."""

    __slots__ = ("buf", "encoding", "limit")

    def __init__(self, limit: int, encoding: bytes | None = None) -> None:
        self.buf = bytearray()
        self.limit = limit
        self.encoding = encoding

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf
        if not buf:
            msg = whole_message(data, self.limit)
            if msg is not None:
                return [msg]
        buf += data
        out: list[bytes] = []
        while len(buf) >= 5:
            size = int.from_bytes(buf[1:5], "big")
            if size > self.limit:
                raise RpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"message of {size} bytes is larger than the limit of {self.limit}",
                )
            if len(buf) < 5 + size:
                break
            with memoryview(buf) as view:
                msg = bytes(view[5 : 5 + size])
            if buf[0]:
                msg = self._decompress(msg)
            out.append(msg)
            del buf[: 5 + size]
        return out

    def _decompress(self, msg: bytes) -> bytes:
        if self.encoding in (b"gzip", b"deflate"):
            try:
                d = zlib.decompressobj(31 if self.encoding == b"gzip" else 15)
                out = d.decompress(msg, self.limit + 1)
            except zlib.error as e:
                raise RpcError(grpc.StatusCode.INTERNAL, f"bad compressed message: {e}") from None
            if len(out) > self.limit:
                raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "decompressed message too large")
            return out
        raise RpcError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"compression {(self.encoding or b'(none)').decode(errors='replace')} is not supported",
        )


# --- server ------------------------------------------------------------------------------------
Resolver = Callable[[str], tuple[str, Any]]


class ServerCall:
    """One call being served, and what a handler knows about it (task handlers get it as ``ctx``): ``method``,
    ``deadline`` (loop time; None: none), ``metadata`` (the caller's, minus what belongs to this
    hop), ``time_remaining()``. A relay handler ends it with ``reply`` or ``fail``; ``on_cancel``
    runs if the caller goes away (or the server stops) first."""

    __slots__ = (
        "conn",
        "deadline",
        "encoding",
        "finished",
        "handler",
        "kind",
        "message",
        "metadata",
        "method",
        "nmessages",
        "on_cancel",
        "reader",
        "sid",
        "task",
    )

    def __init__(
        self,
        conn: _ServerConn,
        sid: int,
        method: str,
        deadline: float | None,
        metadata: tuple[tuple[str, str], ...],
        encoding: bytes | None,
    ) -> None:
        self.conn = conn
        self.sid = sid
        self.method = method
        self.deadline = deadline
        self.metadata = metadata
        self.encoding = encoding
        self.reader: MessageReader | None = None  # only when a message spans frames (or is compressed)
        self.message = b""  # the request (when ``nmessages`` == 1)
        self.nmessages = 0
        self.kind = ""
        self.handler: Any = None
        self.finished = False
        self.on_cancel: Callable[[], None] | None = None
        self.task: asyncio.Task[None] | None = None

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    def feed(self, data: bytes, limit: int) -> None:
        """Request DATA: a whole uncompressed message in one frame (the usual case) is taken as it
        is; anything else goes through a MessageReader. Raises RpcError."""
        if self.reader is None:
            msg = None if self.nmessages else whole_message(data, limit)
            if msg is not None:
                self.message = msg
                self.nmessages = 1
                return
            self.reader = MessageReader(limit, self.encoding)
        for msg in self.reader.feed(data):
            self.message = msg
            self.nmessages += 1

    def reply(self, message: bytes) -> None:
        if self._finish():
            self.conn.send_response(self.sid, message)

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        if self._finish():
            self.conn.send_status(self.sid, code, details, trailers_only=True)

    def _finish(self) -> bool:
        if self.finished:
            return False
        self.finished = True
        self.conn.call_ended(self)
        return not self.conn.closed

    def cancel(self) -> None:
        """The caller went away: stop the work (no answer is sent)."""
        if self.finished:
            return
        self.finished = True
        self.conn.call_ended(self)
        if self.task is not None:
            self.task.cancel()
        if self.on_cancel is not None:
            try:
                self.on_cancel()
            except Exception:
                log.exception("cancel callback for %s failed", self.method)


Context = ServerCall  # what task-based handlers get as ``ctx``


class _ServerConn(Connection):
    client_side = False

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.server = server
        self.calls: dict[int, ServerCall] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server._conns.discard(self)
        for call in list(self.calls.values()):
            call.cancel()

    def call_ended(self, call: ServerCall) -> None:
        self.calls.pop(call.sid, None)
        self.server._ended(call)

    # -- frames
    def on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        call = self.calls.get(sid)
        if call is not None or sid <= self.highest_inbound:
            if call is not None and end_stream:  # trailers from a client: end of its request
                self._request_complete(call)
            return
        if sid % 2 == 0:
            raise ProtocolError("client stream ids are odd")
        self.highest_inbound = sid
        if self.draining:  # after our GOAWAY: the caller retries on a new connection
            self.write(frame_bytes(RST_STREAM, 0, sid, REFUSED_STREAM.to_bytes(4, "big")))
            return
        method, deadline, encoding, ctype = "", None, None, b""
        md: list[tuple[str, str]] = []
        for k, v in headers:
            if k == b":path":
                method = v.decode("utf-8", "replace")
            elif k == b"grpc-timeout":
                t = decode_timeout(v)
                if t is not None:
                    deadline = asyncio.get_running_loop().time() + t
            elif k == b"grpc-encoding":
                encoding = v
            elif k == b"content-type":
                ctype = v
            elif k[:1] != b":" and k[:5] != b"grpc-" and k not in _HOP:
                md.append((k.decode("latin-1"), v.decode("latin-1")))  # lossless both ways
        self.open_send(sid)
        if not ctype.startswith(b"application/grpc"):
            self.send_status(sid, grpc.StatusCode.INTERNAL, "not a gRPC request", trailers_only=True)
            return
        call = ServerCall(self, sid, method, deadline, tuple(md), encoding)
        self.calls[sid] = call
        self.server._started(call)
        if end_stream:
            self._request_complete(call)

    def on_data(self, sid: int, data: bytes, size: int, end_stream: bool) -> None:
        call = self.calls.get(sid)
        if call is None:
            return
        self.received(sid, size)
        if call.kind:  # already dispatched: a client must not send more
            return
        try:
            call.feed(data, self.server.max_message)
        except RpcError as e:
            call.fail(e.code(), e.details())
            return
        if end_stream:
            self._request_complete(call)

    def on_reset(self, sid: int, code: int) -> None:
        call = self.calls.get(sid)
        if call is not None:
            call.cancel()  # the caller went away: its handler (and upstream call) stops too

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        if code != NO_ERROR:
            self.close()

    def _request_complete(self, call: ServerCall) -> None:
        if call.kind:
            return
        if call.nmessages != 1:
            call.kind = "invalid"
            call.fail(grpc.StatusCode.INTERNAL, f"expected one request message, got {call.nmessages}")
            return
        try:
            call.kind, call.handler = self.server.resolve(call.method)
            if call.kind == "relay":
                call.handler(call)
                return
        except Exception as e:
            log.exception("handler for %s failed", call.method)
            call.fail(grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}")
            return
        call.task = asyncio.get_running_loop().create_task(self._run(call))

    # -- answers
    def send_response(self, sid: int, message: bytes) -> None:
        head = self.headers_frames(sid, self.header_block(_RESPONSE_BLOCK), False)
        body = message_frame(message)
        data = self.try_data(sid, body, end_stream=False)
        if data is not None:  # the usual case: headers, message and status in one write
            tail = self.headers_frames(sid, _OK_BLOCK, True)
            self.write(head + data + tail)
            self.stream_closed(sid)
            return
        self.write(head)
        asyncio.get_running_loop().create_task(self._send_slowly(sid, body))

    async def _send_slowly(self, sid: int, body: bytes) -> None:
        try:
            await self.send_data(sid, body)
        except StreamGone:
            return
        self.send_status(sid, OK, "", trailers_only=False)

    def send_status(self, sid: int, code: grpc.StatusCode, details: str, *, trailers_only: bool) -> None:
        status = status_headers(code, details)
        block = self.header_block(encode_headers([*_RESPONSE_HEADERS, *status] if trailers_only else status))
        self.write(self.headers_frames(sid, block, end_stream=True))
        self.stream_closed(sid)

    async def _run(self, call: ServerCall) -> None:
        """A task-based handler ("unary" or "stream")."""
        sid, started = call.sid, False
        try:
            if call.kind == "stream":
                async for msg in call.handler(call.message, call):
                    if call.finished:
                        return
                    if not started:
                        self.write(self.headers_frames(sid, self.header_block(_RESPONSE_BLOCK), False))
                        started = True
                    await self.send_data(sid, message_frame(msg))
                if call._finish():
                    self.send_status(sid, OK, "", trailers_only=not started)
            else:
                call.reply(await call.handler(call.message, call))
        except RpcError as e:
            if call._finish():
                self.send_status(sid, e.code(), e.details(), trailers_only=not started)
        except StreamGone:
            call.cancel()
        except asyncio.CancelledError:
            if call._finish():  # the server stops
                self.send_status(sid, grpc.StatusCode.CANCELLED, "call cancelled", trailers_only=not started)
            raise
        except Exception as e:
            log.exception("handler for %s failed", call.method)
            if call._finish():
                self.send_status(
                    sid, grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}", trailers_only=not started
                )


class Server:
    """gRPC server on a unix socket."""

    def __init__(self, resolve: Resolver, *, max_message: int) -> None:
        self.resolve = resolve
        self.max_message = max_message
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_ServerConn] = set()
        self._active: set[ServerCall] = set()
        self._idle: asyncio.Event | None = None

    def _started(self, call: ServerCall) -> None:
        self._active.add(call)

    def _ended(self, call: ServerCall) -> None:
        self._active.discard(call)
        if not self._active and self._idle is not None:
            self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._active)

    async def start_unix(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _ServerConn(self), path=path)

    async def start_sock(self, sock: socket.socket, backlog: int) -> None:
        """Serve on an already-listening socket (socket activation). asyncio calls listen() on it
        again: ``backlog`` should be the one it was made with."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _ServerConn(self), sock=sock, backlog=backlog)

    async def stop(self, grace: float) -> None:
        """No new connections or calls; calls in flight get ``grace`` seconds, then are cancelled."""
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.go_away()
        if self._active:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        for call in list(self._active):
            call.fail(grpc.StatusCode.CANCELLED, "the proxy is shutting down")
            if call.task is not None:
                call.task.cancel()
            if call.on_cancel is not None:
                call.on_cancel()
        for c in list(self._conns):
            c.close()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None


# --- client ------------------------------------------------------------------------------------
OnDone = Callable[[bytes | None, RpcError | None], None]


class _ClientStream:
    """One call on the upstream connection, as its frames arrive."""

    __slots__ = (
        "done",
        "error",
        "event",
        "got_headers",
        "messages",
        "reader",
        "status",
        "streaming",
        "unacked",
    )

    def __init__(self, streaming: bool) -> None:
        self.reader: MessageReader | None = None  # only when a message spans frames
        self.streaming = streaming  # window given back as messages are consumed (back-pressure)
        self.messages: deque[bytes] = deque()
        self.status: tuple[grpc.StatusCode, str] | None = None
        self.error: RpcError | None = None
        self.got_headers = False
        self.done = False  # no more frames for this stream
        self.event: asyncio.Event | None = asyncio.Event() if streaming else None
        self.unacked = 0

    def feed(self, data: bytes, limit: int) -> None:
        if self.reader is None:
            msg = whole_message(data, limit)
            if msg is not None:
                self.messages.append(msg)
                return
            self.reader = MessageReader(limit)
        self.messages.extend(self.reader.feed(data))

    def finish(self, error: RpcError | None = None) -> None:
        if self.done:
            return
        if error is not None and self.error is None:
            self.error = error
        self.done = True
        if self.event is not None:
            self.event.set()

    def result(self) -> tuple[bytes | None, RpcError | None]:
        if self.error is not None:
            return None, self.error
        code, details = self.status or (grpc.StatusCode.INTERNAL, "upstream ended the call without a status")
        if code != OK:
            return None, RpcError(code, details)
        if len(self.messages) != 1:
            return None, RpcError(
                grpc.StatusCode.INTERNAL, f"expected one response message, got {len(self.messages)}"
            )
        return self.messages[0], None


class _ClientConn(Connection):
    client_side = True

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self.channel = channel
        self.streams: dict[int, _ClientStream] = {}
        self.next_stream_id = 1

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        reason = f"connection to {self.channel.endpoint} closed" + (f": {exc}" if exc else "")
        streams, self.streams = self.streams, {}
        for st in streams.values():
            st.finish(RpcError(grpc.StatusCode.UNAVAILABLE, reason))

    def on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        st = self.streams.get(sid)
        if st is None:
            return
        if not st.got_headers:  # response headers (or trailers-only)
            st.got_headers = True
            status = next((v for k, v in headers if k == b":status"), b"")
            if status != b"200":
                st.error = RpcError(
                    _http_code(status), f"upstream answered HTTP {status.decode(errors='replace')}"
                )
        st.status = status_of(headers) or st.status
        if end_stream:
            self._end(sid, st)

    def on_data(self, sid: int, data: bytes, size: int, end_stream: bool) -> None:
        st = self.streams.get(sid)
        if st is None:
            return
        if st.streaming:
            st.unacked += size
        else:
            self.received(sid, size)
        try:
            st.feed(data, self.channel.max_message)
        except RpcError as e:
            self.cancel(sid)
            st.finish(e)
            return
        if end_stream:
            self._end(sid, st)
        elif st.event is not None:
            st.event.set()

    def _end(self, sid: int, st: _ClientStream) -> None:
        self.streams.pop(sid, None)
        self.stream_closed(sid)
        if st.status is None and st.error is None:
            st.error = RpcError(grpc.StatusCode.INTERNAL, "upstream ended the call without a status")
        st.finish()

    def on_reset(self, sid: int, code: int) -> None:
        st = self.streams.pop(sid, None)
        if st is not None:
            st.finish(RpcError(_reset_code(code), f"upstream reset the call (HTTP/2 error {code})"))

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        for sid in [s for s in self.streams if s > last_stream_id]:
            self.streams.pop(sid).finish(RpcError(grpc.StatusCode.UNAVAILABLE, "upstream is going away"))
        if not self.streams or code != NO_ERROR:
            self.close()

    def cancel(self, sid: int) -> None:
        """Reset a stream (the caller went away or its deadline passed): the upstream stops too."""
        if self.streams.pop(sid, None) is not None:
            self.write(frame_bytes(RST_STREAM, 0, sid, CANCEL.to_bytes(4, "big")))
        self.stream_closed(sid)

    def consumed(self, sid: int, st: _ClientStream) -> None:
        if st.unacked and sid in self.streams:
            self.received(sid, st.unacked)
        st.unacked = 0

    def open(
        self,
        method: str,
        request: bytes,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...],
        st: _ClientStream,
    ) -> int:
        """Start a call: headers and (window permitting) the whole request in one write."""
        sid = self.next_stream_id
        if sid > _MAX_STREAM_ID:
            self.draining = True
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"{self.channel.endpoint}: stream ids used up")
        self.next_stream_id += 2
        block = _request_block(method)
        if timeout is not None or metadata:
            extra = [(k.encode("latin-1", "replace"), v.encode("latin-1", "replace")) for k, v in metadata]
            if timeout is not None:
                extra.append((b"grpc-timeout", encode_timeout(timeout)))
            block += encode_headers(extra)
        self.streams[sid] = st
        self.open_send(sid)
        head = self.headers_frames(sid, self.header_block(block), end_stream=False)
        body = message_frame(request)
        data = self.try_data(sid, body, end_stream=True)
        if data is not None:
            self.write(head + data)
        else:
            self.write(head)
            asyncio.get_running_loop().create_task(self._send_slowly(sid, body, st))
        return sid

    async def _send_slowly(self, sid: int, body: bytes, st: _ClientStream) -> None:
        try:
            await self.send_data(sid, body, end_stream=True)
        except StreamGone:
            if sid in self.streams:
                self.streams.pop(sid, None)
                st.finish(
                    RpcError(grpc.StatusCode.UNAVAILABLE, f"connection to {self.channel.endpoint} closed")
                )


@functools.lru_cache(maxsize=256)
def _request_block(method: str) -> bytes:
    return encode_headers(
        (
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", method.encode()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        )
    )


def _reset_code(code: int) -> grpc.StatusCode:
    if code == REFUSED_STREAM:
        return grpc.StatusCode.UNAVAILABLE
    if code == CANCEL:
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


def _http_code(status: bytes) -> grpc.StatusCode:
    return {
        b"400": grpc.StatusCode.INTERNAL,
        b"401": grpc.StatusCode.UNAUTHENTICATED,
        b"403": grpc.StatusCode.PERMISSION_DENIED,
        b"404": grpc.StatusCode.UNIMPLEMENTED,
        b"429": grpc.StatusCode.UNAVAILABLE,
        b"502": grpc.StatusCode.UNAVAILABLE,
        b"503": grpc.StatusCode.UNAVAILABLE,
        b"504": grpc.StatusCode.UNAVAILABLE,
    }.get(status, grpc.StatusCode.UNKNOWN)


def parse_endpoint(endpoint: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:///p``, ``unix:p`` and ``/p`` are unix sockets; ``host:port`` is TCP."""
    if endpoint.startswith("unix://"):
        return "unix", endpoint[len("unix://") :]
    if endpoint.startswith("unix:"):
        return "unix", endpoint[len("unix:") :]
    if endpoint.startswith("/"):
        return "unix", endpoint
    host, _, port = endpoint.rpartition(":")
    return "tcp", (host.strip("[]") or "localhost", int(port))


class PendingCall(_ClientStream):
    """A unary call started with ``Channel.start``: ``on_done`` runs exactly once unless ``cancel()``."""

    __slots__ = ("conn", "on_done", "sid", "task", "timer")

    def __init__(self, on_done: OnDone) -> None:
        super().__init__(False)
        self.on_done: OnDone | None = on_done
        self.conn: _ClientConn | None = None
        self.sid = 0
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def finish(self, error: RpcError | None = None) -> None:
        if self.done:
            return
        super().finish(error)
        self._complete(*self.result())

    def _complete(self, message: bytes | None, error: RpcError | None) -> None:
        cb, self.on_done = self.on_done, None
        if self.timer is not None:
            self.timer.cancel()
        if cb is not None:
            cb(message, error)

    def _expired(self) -> None:
        self.timer = None
        self._stop()
        self._complete(None, RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def _stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.conn is not None:
            self.conn.cancel(self.sid)

    def cancel(self) -> None:
        """The caller went away: reset the upstream call; ``on_done`` will not run."""
        self.on_done = None
        if self.timer is not None:
            self.timer.cancel()
        self._stop()


class Channel:
    """Calls to one upstream over a shared HTTP/2 connection."""

    def __init__(self, endpoint: str, *, max_message: int, connect_timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.max_message = max_message
        self.connect_timeout = connect_timeout
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
    ) -> PendingCall:
        """Start a unary call now (when connected, the request is written before this returns);
        ``on_done(message, None)`` or ``on_done(None, RpcError)`` runs once it ends."""
        pc = PendingCall(on_done)
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
            conn.go_away()
            conn.close()


__all__ = ["WINDOW", "Channel", "Context", "OnDone", "PendingCall", "RpcError", "Server", "ServerCall"]
