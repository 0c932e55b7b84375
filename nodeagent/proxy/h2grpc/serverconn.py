"""One kubelet-side connection: requests, flood accounting, request budgets, timeouts, dispatch."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from nodeagent.proxy.h2grpc.call import ServerCall
from nodeagent.proxy.h2grpc.limits import (
    _FEED_STEP,
    EMPTY,
    PING,
    RESETS,
    SETTINGS,
    WINDOW_UPDATES,
    FloodCounter,
)
from nodeagent.proxy.h2grpc.peer import _batch, _Peer
from nodeagent.proxy.h2grpc.tasks import run_task
from nodeagent.proxy.h2grpc.wire import (
    _HOP,
    _RESPONSE_HEADERS,
    RpcError,
    decode_timeout,
    status_headers,
)
from nodeagent.util.log import event, get_logger

if TYPE_CHECKING:
    from nodeagent.proxy.h2grpc.server import Server

log = get_logger(__package__)  # one logger for the package: "nodeagent.proxy.h2grpc"


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
        self._floods = FloodCounter(self.limits, self.opened)
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
        over = self._floods.over(time.monotonic())
        if over is None:
            return False
        lim = self.limits
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
            self._floods.counts[RESETS] += 1
            self.drop(ev.stream_id)
            call = self.calls.get(ev.stream_id)
            if call is not None:
                call.cancel()  # the caller went away: its handler (and upstream call) stops too
                if not call.kind and call.request_done:  # reset before it was started upstream
                    self.server._abandoned(call)
        elif isinstance(ev, h2.events.WindowUpdated):
            self._floods.counts[WINDOW_UPDATES] += 1
            self.window_opened(ev)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self._floods.counts[SETTINGS] += 1
            self.handshaken = True
            self.settings_changed(ev)
        elif isinstance(ev, h2.events.PingReceived):
            self._floods.counts[PING] += 1
        elif isinstance(ev, h2.events.TrailersReceived):
            pass  # a client's trailers end its request (StreamEnded follows)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.draining = True
            if ev.error_code or not self.calls:
                self.close()
        elif isinstance(ev, (h2.events.PriorityUpdated, h2.events.UnknownFrameReceived)):
            self._floods.counts[EMPTY] += 1

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
            self._floods.counts[EMPTY] += 1
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
        call.task = asyncio.get_running_loop().create_task(run_task(self, call))

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
