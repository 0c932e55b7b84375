"""gRPC for the image proxy on python-hyper's ``h2`` (HTTP/2 and HPACK, sans-IO): a server for the
kubelet's calls and a channel to the upstream image service. Messages are opaque bytes.

``h2`` does the protocol (framing, HPACK, stream states, flow-control accounting, SETTINGS/PING
acknowledgements, frame-size, CONTINUATION-backlog and window-overflow checks); this module drives it
from asyncio ``Protocol`` callbacks, so a relayed call still runs no task and no thread hand-off: the
caller's request is written upstream from the callback that read it, and each piece of the upstream's
answer is written back from the callback that read *it* (``Channel.start(..., pipe=call)``).

Everything a peer can make us hold is bounded (``Limits``, docs/proxy.md): connections, concurrent
streams per connection (advertised and enforced), calls in flight, header list size, request message
size, request bytes held per connection and in all (receive windows re-opened only as requests are
consumed), response bytes held (the upstream stream's window is re-opened only as the caller's
connection takes the bytes), send/handshake/idle/request timeouts, and control-frame floods (GOAWAY
ENHANCE_YOUR_CALM). A protocol error closes that stream or connection with ``h2``'s error code and one
(rate-limited) log line; it never reaches another connection.

- ``Server`` serves three kinds of method handlers (``resolve(method) -> (kind, handler)``):
  ``"relay"``: ``handler(call)`` is a plain function that must end the call with ``call.reply()`` or
  ``call.fail()`` (now or later) and may set ``call.on_cancel``; ``"unary"``: ``async handler(request,
  ctx) -> bytes``; ``"stream"``: an async generator of response messages.
- ``Channel`` calls one upstream over one shared connection, made on first use and again after the
  upstream went away; with nothing listening a call fails with UNAVAILABLE at once. ``start()`` is the
  callback form (``on_done(message, error)`` exactly once, unless cancelled), ``unary()`` and
  ``unary_stream()`` the awaitable ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from nodeagent.log import event, get_logger

log = get_logger(__name__)

_CODES = {c.value[0]: c for c in grpc.StatusCode}
OK = grpc.StatusCode.OK
# Metadata that belongs to one hop (HTTP/2 and gRPC framing) and is never copied to the next.
_HOP = frozenset({b"content-type", b"te", b"user-agent", b"host", b"connection"})
_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
_MAX_STREAM_ID = 2**31 - 1
_MAX_WINDOW = 2**31 - 1
# h2 is fed at most this much per step, so a flood of tiny frames is cut off after one step past
# its threshold instead of after everything one read returned (up to 256 KiB: ~29,000 frames).
_FEED_STEP = 16 * 1024
# At the connection limit a connection that has not sent a call yet may be closed to make room, but
# not in its first moment: a client that just connected is about to send one.
_NEW_CONNECTION_GRACE = 0.5
_IDLE_CLIENT_GRACE = 10.0  # ...and one that has made calls only after this long without any


@dataclass(frozen=True, slots=True)
class Limits:
    """What one peer (or all of them) can make the proxy hold. docs/proxy.md explains each."""

    max_connections: int = 32  # kubelet connections at once (idle ones are closed to admit new ones)
    max_streams: int = 100  # SETTINGS_MAX_CONCURRENT_STREAMS per connection
    max_calls: int = 256  # calls being answered at once, all connections (more: REFUSED_STREAM)
    max_connection_calls: int = 8  # calls started upstream at once per connection (more wait)...
    long_calls: frozenset[str] = frozenset()  # ...not counting these (pulls: seconds to minutes)
    max_header_list: int = 16 * 1024  # SETTINGS_MAX_HEADER_LIST_SIZE (decoded bytes of one block)
    stream_window: int = 65_535  # receive window per kubelet stream (SETTINGS_INITIAL_WINDOW_SIZE)
    connection_window: int = 256 * 1024  # receive window per kubelet connection
    request_budget: int = 4 * 1024 * 1024  # request bytes held (not yet complete) per connection
    total_request_budget: int = 16 * 1024 * 1024  # the same, all connections
    upstream_stream_window: int = 128 * 1024  # response bytes held per call (the upstream's window)
    send_timeout: float = 30.0  # a caller that takes none of its answer for this long is dropped
    request_timeout: float = 30.0  # a request must arrive whole within this
    handshake_timeout: float = 5.0  # preface and SETTINGS within this
    idle_timeout: float = 300.0  # a connection with no call for this long is closed (GOAWAY)
    flood_period: float = 10.0
    max_settings: int = 1000  # control frames per connection and period before ENHANCE_YOUR_CALM
    max_pings: int = 2000
    max_resets: int = 1000
    max_window_updates: int = 20_000
    max_empty_frames: int = 10_000  # DATA without payload nor END_STREAM, unknown and PRIORITY frames


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


class LogLimiter:
    """At most ``burst`` lines per kind and ``period``; the rest are counted and reported in one
    summary line when the next period starts (an attack costs a bounded number of log lines)."""

    def __init__(self, burst: int = 10, period: float = 60.0) -> None:
        self.burst = burst
        self.period = period
        self._start = 0.0
        self._counts: dict[str, int] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, kind: str) -> bool:
        now = time.monotonic()
        if now - self._start >= self.period:
            self.flush()
            self._start = now
        n = self._counts.get(kind, 0) + 1
        self._counts[kind] = n
        if n <= self.burst:
            return True
        self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
        return False

    def flush(self) -> None:
        for kind, n in self._suppressed.items():
            event(log, "proxy log lines suppressed", level=30, kind=kind, count=n, period_seconds=self.period)
        self._suppressed = {}
        self._counts = {}


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
    if not 2 <= len(value) <= 9:
        return None
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


_OK_TRAILERS = status_headers(OK, "")


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
    """Cuts length-prefixed gRPC messages out of DATA frames; a message larger than ``limit`` is
    refused as soon as its length prefix is seen (nothing of it is held)."""

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


# --- one HTTP/2 connection on an asyncio transport -----------------------------------------------
class _Out:
    """Bytes of one stream waiting for the peer's flow-control window (or the socket)."""

    __slots__ = ("chunks", "end", "on_sent", "size", "trailers")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.end = False  # END_STREAM after the bytes (on the last DATA frame, or with the trailers)
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.on_sent: Callable[[int], None] | None = None  # bytes that left this stream's queue


class _Batch:
    """Writes deferred to the end of the socket callback that caused them (one event loop: one)."""

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: set[_Peer] = set()

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if not self.depth:
            while self.dirty:
                self.dirty.pop().write()


_batch = _Batch()


class _Peer(asyncio.Protocol):
    """An ``h2.H2Connection`` driven by asyncio callbacks, with per-stream send queues that follow the
    peer's windows and the transport's back-pressure (``pause_writing``)."""

    client_side = False
    # Headers we send are made here, already in the form HTTP/2 wants (lower case, no hop-by-hop
    # fields): h2 need not check or normalize them. What the kubelet side receives is checked.
    _config = {
        "header_encoding": None,
        "validate_outbound_headers": False,
        "normalize_outbound_headers": False,
    }

    def __init__(self) -> None:
        self.h2: h2.connection.H2Connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=self.client_side, **self._config)  # type: ignore[arg-type]
        )
        self.transport: asyncio.Transport | None = None
        self.out: dict[int, _Out] = {}
        self.queued = 0  # bytes in ``out``
        self.paused = False  # the socket's buffer is full: send nothing until resume_writing
        self.closed = False
        self.draining = False  # a GOAWAY went out or came in: no new streams

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.out.clear()
        self.queued = 0

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.flush_all()

    def write(self) -> None:
        """Write what h2 has queued; inside a socket callback (``_Batch``), once at its end, so an
        answer's HEADERS, DATA and trailers usually leave in one write."""
        if _batch.depth:
            _batch.dirty.add(self)
            return
        self.write_now()

    def write_now(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.write_now()
            self.transport.close()
        self.closed = True

    def go_away(self, code: int = 0) -> None:
        """GOAWAY naming the last stream we took (written as a frame, outside h2's state machine,
        which would refuse to send the answers of the calls still running)."""
        if self.closed or self.transport is None:
            return
        self.draining = True
        f = GoAwayFrame(0)
        f.last_stream_id = self.h2.highest_inbound_stream_id
        f.error_code = code
        self.write_now()
        self.transport.write(f.serialize())

    def abort(self, code: ErrorCodes) -> None:
        """A connection error: GOAWAY with ``code``, then close."""
        with contextlib.suppress(Exception):
            self.h2.close_connection(error_code=code)
        self.close()

    # -- sending
    def send(
        self,
        sid: int,
        data: bytes,
        *,
        end: bool = False,
        trailers: list[tuple[bytes, bytes]] | None = None,
        on_sent: Callable[[int], None] | None = None,
    ) -> None:
        """Queue DATA for ``sid`` (then trailers or END_STREAM) and send what the windows allow."""
        out = self.out.get(sid)
        if out is None:
            out = self.out[sid] = _Out()
        if data:
            out.chunks.append(data)
            out.size += len(data)
            self.queued += len(data)
        out.end = out.end or end or trailers is not None
        if trailers is not None:
            out.trailers = trailers
        if on_sent is not None:
            out.on_sent = on_sent
        self._flush(sid, out)
        self.write()

    def drop(self, sid: int) -> None:
        out = self.out.pop(sid, None)
        if out is not None:
            self.queued -= out.size

    def window_opened(self, ev: h2.events.WindowUpdated) -> None:
        if ev.stream_id:
            out = self.out.get(ev.stream_id)
            if out is not None:
                self._flush(ev.stream_id, out)
        else:
            self.flush_all()

    def settings_changed(self, ev: h2.events.RemoteSettingsChanged) -> None:
        if SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
            self.flush_all()

    def flush_all(self) -> None:
        for sid, out in list(self.out.items()):
            if self.paused:
                break
            self._flush(sid, out)
        self.write()

    def _flush(self, sid: int, out: _Out) -> None:
        sent = 0
        h = self.h2
        try:
            while out.chunks and not self.paused:
                window = min(h.local_flow_control_window(sid), h.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = out.chunks[0]
                if len(chunk) > window:
                    out.chunks[0] = chunk[window:]
                    chunk = chunk[:window]
                else:
                    out.chunks.popleft()
                last = not out.chunks and out.end and out.trailers is None
                h.send_data(sid, chunk, end_stream=last)
                sent += len(chunk)
                if out.chunks:
                    self.write()  # a full socket buffer pauses us (pause_writing) before the next one
            if not out.chunks:
                if out.trailers is not None:
                    h.send_headers(sid, out.trailers, end_stream=True)
                    del self.out[sid]
                elif out.end:
                    if not sent:
                        h.end_stream(sid)
                    del self.out[sid]
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            self.out.pop(sid, None)  # the peer reset it meanwhile
            self.queued -= out.size
            return
        finally:
            if sent:
                out.size -= sent
                self.queued -= sent
                if out.on_sent is not None:
                    out.on_sent(sent)


# --- server ------------------------------------------------------------------------------------
Resolver = Callable[[str], tuple[str, Any]]


class ServerCall:
    """One call being served, and what a handler knows about it (task handlers get it as ``ctx``):
    ``method``, ``deadline`` (loop time; None: none), ``metadata`` (the caller's, minus what belongs
    to this hop), ``time_remaining()``. A relay handler ends it with ``reply`` or ``fail``;
    ``on_cancel`` runs if the caller goes away (or the server stops) first."""

    __slots__ = (
        "conn",
        "deadline",
        "encoding",
        "finished",
        "handler",
        "headers_sent",
        "kind",
        "message",
        "metadata",
        "method",
        "nmessages",
        "on_cancel",
        "opened",
        "piped",
        "reader",
        "received",
        "relayed",
        "request_done",
        "sid",
        "task",
        "unacked",
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
        self.request_done = False
        self.on_cancel: Callable[[], None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.headers_sent = False
        self.piped = False  # the response body is relayed by the channel as it arrives
        self.relayed = 0  # response bytes relayed
        self.received = 0  # request bytes held (flow-controlled) until the call is dispatched
        self.unacked = 0  # of which not yet given back to the caller's window
        self.opened = time.monotonic()

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

    # -- answers
    def start_response(self) -> None:
        """Response headers (a piped call sends them when the upstream's first bytes arrive)."""
        if not self.headers_sent and not self.conn.closed:
            self.headers_sent = True
            self.conn.send_headers(self.sid, _RESPONSE_HEADERS)

    def relay(self, data: bytes, on_sent: Callable[[int], None]) -> None:
        """Response bytes exactly as the upstream sent them (length-prefixed messages);
        ``on_sent(n)`` runs as they leave for the caller."""
        if self.finished or self.conn.closed:
            return
        self.start_response()
        self.piped = True
        self.relayed += len(data)
        self.conn.send(self.sid, data, on_sent=on_sent)

    def reply(self, message: bytes) -> None:
        """End with OK after ``message`` (a piped call: after the bytes already relayed)."""
        if not self._finish():
            return
        self.start_response()
        body = b"" if self.piped else message_frame(message)
        self.conn.send(self.sid, body, trailers=_OK_TRAILERS)

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        if not self._finish():
            return
        if self.headers_sent:
            self.conn.send(self.sid, b"", trailers=status_headers(code, details))
        else:
            self.conn.send_headers(self.sid, [*_RESPONSE_HEADERS, *status_headers(code, details)], end=True)

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
        self.conn.drop(self.sid)
        if self.task is not None:
            self.task.cancel()
        if self.on_cancel is not None:
            try:
                self.on_cancel()
            except Exception:
                log.exception("cancel callback for %s failed", self.method)


Context = ServerCall  # what task-based handlers get as ``ctx``


class _ServerConn(_Peer):
    client_side = False

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.server = server
        self.limits = server.limits
        self.calls: dict[int, ServerCall] = {}
        self.opened = self.active = time.monotonic()
        self.handshaken = False
        self.used = False  # ever sent a request
        self.held = 0  # request bytes of calls not yet dispatched
        self.stalled_since: float | None = None
        self._period = self.opened
        self._counts = [0, 0, 0, 0, 0]  # settings, pings, resets, window updates, empty frames
        self._ready: list[ServerCall] = []
        self._waiting: deque[ServerCall] = deque()  # complete, waiting for a call of theirs to end
        self.running = 0  # calls started (handler running)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.server._admit(self):
            transport.close()
            self.closed = True
            return
        lim = self.limits
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: lim.max_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: lim.stream_window,
                SettingCodes.MAX_HEADER_LIST_SIZE: lim.max_header_list,
            },
        )
        self.h2.decoder.max_header_list_size = lim.max_header_list
        self.h2.initiate_connection()
        if lim.connection_window > 65_535:
            self.h2.increment_flow_control_window(lim.connection_window - 65_535)
        self.write()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server._conns.discard(self)
        for call in list(self.calls.values()):
            call.cancel()

    def call_ended(self, call: ServerCall) -> None:
        self.calls.pop(call.sid, None)
        self._release(call)
        self.server._ended(call)
        self.active = time.monotonic()
        if call.kind in ("relay", "unary", "stream") and call.method not in self.limits.long_calls:
            self.running -= 1
            if self._waiting and not self.closed:
                asyncio.get_running_loop().call_soon(self._start_waiting)

    def _start_waiting(self) -> None:
        while self._waiting and self.running < self.limits.max_connection_calls and not self.closed:
            call = self._waiting.popleft()
            if not call.finished:
                self._request_complete(call)
        self.write()

    def _release(self, call: ServerCall) -> None:
        """The call's request bytes are no longer held: give their window back."""
        if call.received:
            self.held -= call.received
            self.server.held -= call.received
            call.received = 0
        if call.unacked:
            n, call.unacked = call.unacked, 0
            if not self.closed:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.acknowledge_received_data(n, call.sid)

    def send_headers(self, sid: int, headers: Any, end: bool = False) -> None:
        try:
            self.h2.send_headers(sid, headers, end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            return
        self.write()

    # -- frames
    def data_received(self, data: bytes) -> None:
        with _batch:
            self._data_received(data)

    def _data_received(self, data: bytes) -> None:
        try:
            for i in range(0, len(data), _FEED_STEP):
                events = self.h2.receive_data(data[i : i + _FEED_STEP])
                self.handshaken = True  # the preface was right (h2 raises otherwise)
                for ev in events:
                    self._event(ev)
                if self.closed or self._flooded():
                    return
            self._dispatch_ready()
        except h2.exceptions.ProtocolError as e:
            self._protocol_error(e)
            return
        except Exception as e:  # a bug must cost one connection, never the daemon
            if self.server.log_limit.allow("internal"):
                event(log, "proxy connection failed", level=40, error=f"{type(e).__name__}: {e}")
            self.abort(ErrorCodes.INTERNAL_ERROR)
            return
        self.write()

    def _protocol_error(self, e: h2.exceptions.ProtocolError) -> None:
        code = getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR)
        if self.server.log_limit.allow("protocol"):
            name = code.name if isinstance(code, ErrorCodes) else str(code)
            event(log, "proxy connection closed: protocol error", level=30, code=name, error=str(e)[:200])
        if self.h2.state_machine.state != h2.connection.ConnectionState.CLOSED:
            self.abort(code)  # (a bad preface: h2 raised before queuing its GOAWAY)
        else:
            self.close()  # h2 has queued the GOAWAY with its code

    def _flooded(self) -> bool:
        now = time.monotonic()
        if now - self._period >= self.limits.flood_period:
            self._period = now
            self._counts = [0, 0, 0, 0, 0]
            return False
        lim = self.limits
        c = self._counts
        over = next(
            (
                name
                for name, n, cap in (
                    ("SETTINGS", c[0], lim.max_settings),
                    ("PING", c[1], lim.max_pings),
                    ("RST_STREAM", c[2], lim.max_resets),
                    ("WINDOW_UPDATE", c[3], lim.max_window_updates),
                    ("empty frames", c[4], lim.max_empty_frames),
                )
                if n > cap
            ),
            None,
        )
        if over is None:
            return False
        if self.server.log_limit.allow("flood"):
            event(
                log, "proxy connection closed: flood", level=30, frames=over, period_seconds=lim.flood_period
            )
        self.go_away(ErrorCodes.ENHANCE_YOUR_CALM)
        for call in list(self.calls.values()):
            call.cancel()
        self.close()
        return True

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.DataReceived):
            self._on_data(ev)
        elif isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev)
        elif isinstance(ev, h2.events.StreamEnded):
            call = self.calls.get(ev.stream_id)
            if call is not None and not call.request_done:
                call.request_done = True
                self._ready.append(call)
        elif isinstance(ev, h2.events.StreamReset):
            self._counts[2] += 1
            self.drop(ev.stream_id)
            call = self.calls.get(ev.stream_id)
            if call is not None:
                call.cancel()  # the caller went away: its handler (and upstream call) stops too
                if not call.kind and call.request_done:  # reset before it was started upstream
                    self.server._abandoned(call)
        elif isinstance(ev, h2.events.WindowUpdated):
            self._counts[3] += 1
            self.window_opened(ev)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self._counts[0] += 1
            self.handshaken = True
            self.settings_changed(ev)
        elif isinstance(ev, h2.events.PingReceived):
            self._counts[1] += 1
        elif isinstance(ev, h2.events.TrailersReceived):
            pass  # a client's trailers end its request (StreamEnded follows)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.draining = True
            if ev.error_code or not self.calls:
                self.close()
        elif isinstance(ev, (h2.events.PriorityUpdated, h2.events.UnknownFrameReceived)):
            self._counts[4] += 1

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        self.used = True
        self.active = time.monotonic()
        if self.draining:  # after our GOAWAY: the caller retries on a new connection
            self._refuse(sid, ErrorCodes.REFUSED_STREAM)
            return
        method, deadline, encoding, ctype = "", None, None, b""
        md: list[tuple[str, str]] = []
        for k, v in ev.headers or ():
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
        if not ctype.startswith(b"application/grpc"):
            self.send_headers(
                sid,
                [*_RESPONSE_HEADERS, *status_headers(grpc.StatusCode.INTERNAL, "not a gRPC request")],
                True,
            )
            return
        call = ServerCall(self, sid, method, deadline, tuple(md), encoding)
        self.calls[sid] = call
        self.server._started(call)

    def _refuse(self, sid: int, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            self.h2.reset_stream(sid, code)

    def _on_data(self, ev: h2.events.DataReceived) -> None:
        sid, size = ev.stream_id, ev.flow_controlled_length or 0
        call = self.calls.get(sid)
        if call is None or call.kind or call.finished:
            if size:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.acknowledge_received_data(size, sid)
            return
        if not ev.data and not ev.stream_ended:
            self._counts[4] += 1
        call.received += size
        call.unacked += size
        self.held += size
        self.server.held += size
        try:
            call.feed(ev.data or b"", self.server.max_message)
        except RpcError as e:
            call.fail(e.code(), e.details())
            return
        self._maybe_ack(call)

    def _maybe_ack(self, call: ServerCall) -> None:
        """Re-open the caller's window for a request still arriving only while the request bytes
        held stay within the per-connection and total budgets; otherwise the caller waits (held
        calls are looked at again when a call ends, see ``Server._ended``)."""
        if not call.unacked:
            return
        lim = self.limits
        budget = max(lim.request_budget, self.server.max_message)
        total = max(lim.total_request_budget, self.server.max_message)
        if self.held <= budget and self.server.held <= total:
            n, call.unacked = call.unacked, 0
            self.h2.acknowledge_received_data(n, call.sid)

    def retry_acks(self) -> None:
        for call in list(self.calls.values()):
            if call.unacked and not call.kind:
                self._maybe_ack(call)
        self.write()

    def _dispatch_ready(self) -> None:
        """Start the calls whose request arrived whole in this read (one that the caller also reset
        in the same read never reaches the upstream)."""
        ready, self._ready = self._ready, []
        for call in ready:
            if not call.finished:
                self._request_complete(call)

    def _request_complete(self, call: ServerCall) -> None:
        if call.kind:
            return
        self._release(call)
        if call.nmessages != 1:
            call.kind = "invalid"
            call.fail(grpc.StatusCode.INTERNAL, f"expected one request message, got {call.nmessages}")
            return
        capped = call.method not in self.limits.long_calls
        if capped and self.running >= self.limits.max_connection_calls:
            self._waiting.append(call)  # started when one of this connection's calls ends
            return
        if self.server.in_flight > self.limits.max_calls:
            call.kind = "refused"
            call.cancel()
            self._refuse(call.sid, ErrorCodes.REFUSED_STREAM)
            return
        try:
            call.kind, call.handler = self.server.resolve(call.method)
            self.running += capped
            if call.kind == "relay":
                call.handler(call)
                return
        except Exception as e:
            log.exception("handler for %s failed", call.method)
            call.fail(grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}")
            return
        call.task = asyncio.get_running_loop().create_task(self._run(call))

    # -- timeouts (Server._tick, once a second)
    def tick(self, now: float) -> None:
        lim = self.limits
        if not self.handshaken and now - self.opened > lim.handshake_timeout:
            self._timed_out("handshake")
            return
        if not self.calls and now - self.active > lim.idle_timeout:
            self.go_away()
            self.close()
            return
        if self.queued and (self.paused or not self._can_send()):
            if self.stalled_since is None:
                self.stalled_since = now
            elif now - self.stalled_since > lim.send_timeout:
                self._timed_out("send")
                return
        else:
            self.stalled_since = None
        for call in list(self.calls.values()):
            if not call.request_done and now - call.opened > lim.request_timeout:
                call.cancel()
                self._refuse(call.sid, ErrorCodes.CANCEL)
        self.write()

    def _can_send(self) -> bool:
        h = self.h2
        return h.outbound_flow_control_window > 0 and any(
            h.local_flow_control_window(sid) > 0 for sid in self.out if sid in h.streams
        )

    def _timed_out(self, what: str) -> None:
        if self.server.log_limit.allow("timeout"):
            event(log, "proxy connection closed: timeout", level=30, timeout=what)
        for call in list(self.calls.values()):
            call.cancel()
        self.abort(ErrorCodes.NO_ERROR if what == "handshake" else ErrorCodes.CANCEL)

    # -- task handlers
    async def send_message(self, call: ServerCall, message: bytes) -> None:
        """One message of a server-streaming answer; waits while more than one stream window of it
        is queued (back-pressure to the handler)."""
        call.start_response()
        self.send(call.sid, message_frame(message))
        while (
            not self.closed and not call.finished and self._queued_for(call.sid) > self.limits.stream_window
        ):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def wake(n: int, fut: asyncio.Future[None] = fut) -> None:
                if not fut.done():
                    fut.set_result(None)

            out = self.out.get(call.sid)
            if out is None:
                break
            out.on_sent = wake
            await fut
        if self.closed or call.finished:
            raise ConnectionResetError("the caller went away")

    def _queued_for(self, sid: int) -> int:
        out = self.out.get(sid)
        return 0 if out is None else out.size

    async def _run(self, call: ServerCall) -> None:
        """A task-based handler ("unary" or "stream")."""
        try:
            if call.kind == "stream":
                async for msg in call.handler(call.message, call):
                    if call.finished:
                        return
                    await self.send_message(call, msg)
                if call._finish():
                    if call.headers_sent:
                        self.send(call.sid, b"", trailers=_OK_TRAILERS)
                    else:
                        self.send_headers(call.sid, [*_RESPONSE_HEADERS, *_OK_TRAILERS], end=True)
            else:
                call.reply(await call.handler(call.message, call))
        except RpcError as e:
            call.fail(e.code(), e.details())
        except ConnectionResetError:
            call.cancel()
        except asyncio.CancelledError:
            call.fail(grpc.StatusCode.CANCELLED, "call cancelled")  # the server stops
            raise
        except Exception as e:
            log.exception("handler for %s failed", call.method)
            call.fail(grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}")


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
OnDone = Callable[[bytes | None, RpcError | None], None]


class _ClientStream:
    """One call on the upstream connection, as its frames arrive."""

    __slots__ = (
        "capture",
        "done",
        "error",
        "event",
        "got_headers",
        "messages",
        "pipe",
        "raw",
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
        self.pipe: ServerCall | None = None  # relay the body to this call as it arrives
        self.capture = 0  # piped: also keep up to this many bytes of it (to inspect the answer)
        self.raw: bytearray | None = None

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
        if self.pipe is not None:  # relayed; the message itself only if kept (None: not kept)
            raw = self.raw
            return (None if raw is None else whole_message(bytes(raw), self.capture)), None
        if len(self.messages) != 1:
            return None, RpcError(
                grpc.StatusCode.INTERNAL, f"expected one response message, got {len(self.messages)}"
            )
        return self.messages[0], None


class _ClientConn(_Peer):
    client_side = True
    # The upstream is the node's own runtime: its answers are relayed as they are, not checked.
    _config = {**_Peer._config, "validate_inbound_headers": False, "normalize_inbound_headers": False}

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self.channel = channel
        self.streams: dict[int, _ClientStream] = {}
        self._consumed = 0  # connection-level bytes since the last connection WINDOW_UPDATE

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                SettingCodes.INITIAL_WINDOW_SIZE: self.channel.limits.upstream_stream_window,
                SettingCodes.MAX_HEADER_LIST_SIZE: 1024 * 1024,
                SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.h2.initiate_connection()
        # The connection window is kept wide open: what bounds the bytes held is each stream's
        # window, so one caller that does not read never stalls the calls of others (docs/proxy.md).
        self.h2.increment_flow_control_window(_MAX_WINDOW - 65_535)
        self.h2.decoder.max_header_list_size = 1024 * 1024  # before the SETTINGS ACK too
        self.write()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        reason = f"connection to {self.channel.endpoint} closed" + (f": {exc}" if exc else "")
        streams, self.streams = self.streams, {}
        for st in streams.values():
            st.finish(RpcError(grpc.StatusCode.UNAVAILABLE, reason))

    def data_received(self, data: bytes) -> None:
        with _batch:
            self._data_received(data)

    def _data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
            for ev in events:
                self._event(ev)
        except h2.exceptions.ProtocolError as e:
            event(log, "upstream connection closed: protocol error", level=30, error=str(e)[:200] or repr(e))
            self.close()
            return
        self.write()

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.DataReceived):
            self._on_data(ev)
        elif isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            self._on_headers(ev.stream_id, ev.headers or [])
        elif isinstance(ev, h2.events.StreamEnded):
            st = self.streams.pop(ev.stream_id, None)
            if st is not None:
                self._end(st)
        elif isinstance(ev, h2.events.StreamReset):
            self.drop(ev.stream_id)
            st = self.streams.pop(ev.stream_id, None)
            if st is not None:
                st.finish(
                    RpcError(
                        _reset_code(ev.error_code), f"upstream reset the call (HTTP/2 error {ev.error_code})"
                    )
                )
        elif isinstance(ev, h2.events.WindowUpdated):
            self.window_opened(ev)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.settings_changed(ev)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.draining = True
            last = ev.last_stream_id if ev.last_stream_id is not None else 0
            for sid in [s for s in self.streams if s > last]:
                self.streams.pop(sid).finish(RpcError(grpc.StatusCode.UNAVAILABLE, "upstream is going away"))
            if not self.streams or ev.error_code:
                self.close()

    def _on_headers(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
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

    def _on_data(self, ev: h2.events.DataReceived) -> None:
        sid, size, data = ev.stream_id, ev.flow_controlled_length or 0, ev.data or b""
        self._consumed += size
        if self._consumed > _MAX_WINDOW // 2:
            self.h2.increment_flow_control_window(self._consumed)
            self._consumed = 0
        st = self.streams.get(sid)
        if st is None:
            return
        pipe = st.pipe
        if pipe is not None:
            if st.raw is not None and len(st.raw) + len(data) <= st.capture + 5:
                st.raw += data
            elif st.raw is not None:
                st.raw = None  # larger than we inspect: relayed only
            if pipe.finished:
                self._grant(sid, size)
                return
            if size > len(data):  # padding: not relayed, given back at once
                self._grant(sid, size - len(data))
            if data:
                pipe.relay(data, functools.partial(self._grant, sid))
            return
        if st.streaming:
            st.unacked += size
        else:
            self._grant(sid, size)
        try:
            st.feed(data, self.channel.max_message)
        except RpcError as e:
            self.cancel(sid)
            st.finish(e)
            return
        if st.event is not None:
            st.event.set()

    def _grant(self, sid: int, n: int) -> None:
        """Re-open the upstream stream's window by ``n`` (bytes we no longer hold)."""
        if n <= 0 or sid not in self.streams or self.closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
            self.h2.increment_flow_control_window(n, stream_id=sid)
            self.write()

    def _end(self, st: _ClientStream) -> None:
        if st.status is None and st.error is None:
            st.error = RpcError(grpc.StatusCode.INTERNAL, "upstream ended the call without a status")
        st.finish()

    def cancel(self, sid: int) -> None:
        """Reset a stream (the caller went away or its deadline passed): the upstream stops too."""
        self.streams.pop(sid, None)
        self.drop(sid)
        if not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.h2.reset_stream(sid, ErrorCodes.CANCEL)
                self.write()

    def consumed(self, sid: int, st: _ClientStream) -> None:
        if st.unacked and sid in self.streams:
            self._grant(sid, st.unacked)
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
        sid = self.h2.get_next_available_stream_id()
        if sid > _MAX_STREAM_ID - 2:
            self.draining = True
        headers = list(_request_headers(method))
        for k, v in metadata:
            headers.append((k.encode("latin-1", "replace"), v.encode("latin-1", "replace")))
        if timeout is not None:
            headers.append((b"grpc-timeout", encode_timeout(timeout)))
        try:
            self.h2.send_headers(sid, headers)
        except h2.exceptions.TooManyStreamsError:
            raise RpcError(
                grpc.StatusCode.UNAVAILABLE, f"{self.channel.endpoint}: too many calls at once"
            ) from None
        except h2.exceptions.ProtocolError as e:
            self.draining = True
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"{self.channel.endpoint}: {e}") from None
        self.streams[sid] = st
        self.send(sid, message_frame(request), end=True)
        return sid


@functools.lru_cache(maxsize=256)
def _request_headers(method: str) -> tuple[tuple[bytes, bytes], ...]:
    return (
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", method.encode()),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    )


def _reset_code(code: int) -> grpc.StatusCode:
    if code == ErrorCodes.REFUSED_STREAM:
        return grpc.StatusCode.UNAVAILABLE
    if code == ErrorCodes.CANCEL:
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


__all__ = [
    "Channel",
    "Context",
    "Limits",
    "LogLimiter",
    "OnDone",
    "PendingCall",
    "RpcError",
    "Server",
    "ServerCall",
]
