"""One HTTP/2 connection on an asyncio transport: h2 driven from protocol callbacks, per-stream send
queues that follow the peer's windows and the socket's back-pressure."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame


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
