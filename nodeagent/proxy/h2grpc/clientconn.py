"""The upstream connection: one call's frames as they arrive (``_ClientStream``, ``PendingCall``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from nodeagent.proxy.h2grpc.peer import _batch, _Peer
from nodeagent.proxy.h2grpc.wire import (
    _MAX_STREAM_ID,
    _MAX_WINDOW,
    OK,
    MessageReader,
    RpcError,
    _http_code,
    _request_headers,
    _reset_code,
    encode_timeout,
    message_frame,
    status_of,
    whole_message,
)
from nodeagent.util.log import event, get_logger

if TYPE_CHECKING:
    from nodeagent.proxy.h2grpc.call import ServerCall
    from nodeagent.proxy.h2grpc.channel import Channel

log = get_logger(__package__)  # one logger for the package: "nodeagent.proxy.h2grpc"

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
