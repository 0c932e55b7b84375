"""HTTP/2 (RFC 9113) as far as gRPC uses it, on an asyncio transport, and an HPACK (RFC 7541) decoder.

Written for the image proxy's hot path (``nodeagent.proxy.h2grpc``): a frame costs a few attribute
look-ups and one ``transport.write`` for everything a callback produces. What it does: the connection
preface, SETTINGS (and ACK), PING ACK, GOAWAY, RST_STREAM, HEADERS + CONTINUATION, DATA with
padding, and flow control both ways (the peer's windows when sending; our large windows topped up
in batches when receiving). Server push is refused, PRIORITY ignored.

HPACK: headers we send are literals "without indexing" and never Huffman-coded, so there is no
encoder state at all; the decoder keeps the peer's dynamic table and decodes Huffman strings with
``hpack``'s table (python-hyper).
"""

from __future__ import annotations

import asyncio
from collections import deque

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from nodeagent.log import get_logger

log = get_logger(__name__)

# Windows large enough that a big ListImages answer streams without waiting for WINDOW_UPDATEs.
WINDOW = 8 * 1024 * 1024


class StreamGone(Exception):
    """The peer reset the stream or the connection closed while we were sending."""


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0, 1, 3, 6, 7, 8
COMPRESSION_ERROR = 9
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = (
    1,
    2,
    4,
    5,
    6,
)
_DEFAULT_WINDOW = 65_535
_MAX_WINDOW = 2**31 - 1
_MAX_HEADER_LIST = 64 * 1024


class ProtocolError(Exception):
    def __init__(self, message: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


_STATIC: tuple[tuple[bytes, bytes], ...] = tuple(HeaderTable.STATIC_TABLE)  # RFC 7541 Appendix A
_NSTATIC = len(_STATIC)


class HpackError(ProtocolError):
    def __init__(self, message: str) -> None:
        super().__init__(message, COMPRESSION_ERROR)


class HpackDecoder:
    """Decodes header blocks, keeping the peer encoder's dynamic table (RFC 7541 section 4)."""

    def __init__(self, max_table_size: int = 4096, max_list_size: int = _MAX_HEADER_LIST) -> None:
        self.max_allowed = max_table_size  # our SETTINGS_HEADER_TABLE_SIZE (the default)
        self.max_size = max_table_size
        self.max_list_size = max_list_size
        self.size = 0
        self.table: deque[tuple[bytes, bytes]] = deque()  # newest first: index 62 is table[0]
        self._huffman: dict[bytes, bytes] = {}  # decoded strings, bounded

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= _NSTATIC:
            return _STATIC[index - 1]
        try:
            if index > _NSTATIC:
                return self.table[index - _NSTATIC - 1]
        except IndexError:
            pass
        raise HpackError(f"header index {index} out of range")

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 32
        if size > self.max_size:  # larger than the whole table: empties it (4.4)
            self.table.clear()
            self.size = 0
            return
        self.table.appendleft((name, value))
        self.size += size
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size:
            n, v = self.table.pop()
            self.size -= len(n) + len(v) + 32

    @staticmethod
    def _int(data: bytes, i: int, bits: int) -> tuple[int, int]:
        mask = (1 << bits) - 1
        value = data[i] & mask
        i += 1
        if value < mask:
            return value, i
        shift = 0
        while True:
            if i >= len(data) or shift > 28:
                raise HpackError("bad integer")
            b = data[i]
            i += 1
            value += (b & 127) << shift
            shift += 7
            if not b & 128:
                return value, i

    def _string(self, data: bytes, i: int) -> tuple[bytes, int]:
        if i >= len(data):
            raise HpackError("truncated header block")
        huffman = data[i] & 0x80
        length, i = self._int(data, i, 7)
        end = i + length
        if end > len(data):
            raise HpackError("truncated header block")
        raw = data[i:end]
        if not huffman:
            return raw, end
        out = self._huffman.get(raw)
        if out is None:
            try:
                out = decode_huffman(raw)
            except Exception:
                raise HpackError("bad Huffman string") from None
            if len(self._huffman) >= 512:
                self._huffman.clear()
            self._huffman[raw] = out
        return out, end

    def _literal(self, data: bytes, i: int, bits: int) -> tuple[tuple[bytes, bytes], int]:
        """A literal field: its name by index (``bits``-bit prefix; 0: a literal name), then its value."""
        index, i = self._int(data, i, bits)
        if index:
            name = self._entry(index)[0]
        else:
            name, i = self._string(data, i)
        value, i = self._string(data, i)
        return (name, value), i

    def decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        listed = 0
        i, n = 0, len(data)
        while i < n:
            b = data[i]
            if b & 0x80:  # indexed field
                if b != 0xFF:
                    index = b & 0x7F
                    i += 1
                else:
                    index, i = self._int(data, i, 7)
                field = self._entry(index)
            elif b & 0x40:  # literal with incremental indexing
                field, i = self._literal(data, i, 6)
                self._add(*field)
            elif b & 0x20:  # dynamic table size update
                size, i = self._int(data, i, 5)
                if size > self.max_allowed:
                    raise HpackError(f"table size {size} above the allowed {self.max_allowed}")
                self.max_size = size
                self._evict()
                continue
            else:  # literal without indexing (0000) or never indexed (0001)
                field, i = self._literal(data, i, 4)
            listed += len(field[0]) + len(field[1]) + 32
            if listed > self.max_list_size:
                raise HpackError("header list too large")
            out.append(field)
        return out


def frame_bytes(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + stream_id.to_bytes(4, "big") + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


_STATIC_FIELD = {field: i + 1 for i, field in reversed(list(enumerate(_STATIC)))}
_STATIC_NAME = {name: i + 1 for i, (name, _) in reversed(list(enumerate(_STATIC)))}


def encode_headers(headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]) -> bytes:
    """An HPACK block that never touches the dynamic table: static-table entries by index, the
    rest as literals "without indexing" (not Huffman-coded). No encoder state to keep."""
    out = bytearray()
    for k, v in headers:
        index = _STATIC_FIELD.get((k, v))
        if index is not None:
            out.append(0x80 | index)
            continue
        index = _STATIC_NAME.get(k)
        if index is not None:
            out += _hpack_int(index, 4)
        else:
            out += b"\x00" + _hpack_int(len(k), 7) + k
        out += _hpack_int(len(v), 7) + v
    return bytes(out)


class Connection(asyncio.Protocol):
    """One HTTP/2 connection on an asyncio transport: framing, SETTINGS/PING/WINDOW_UPDATE, flow
    control for sending (waiting for the peer's windows) and for receiving (our large windows are
    topped up in batches, so small calls send no WINDOW_UPDATE at all)."""

    client_side = False

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.draining = False  # GOAWAY sent or received: no new streams
        self._buf = bytearray()
        self._preface_pending = not self.client_side
        self._decoder = HpackDecoder()
        self._headers_stream = 0  # a header block continues in CONTINUATION frames
        self._headers_flags = 0
        self._headers_buf = bytearray()
        self._table_reset_sent = False
        # the peer's settings and our send windows
        self.peer_initial_window = _DEFAULT_WINDOW
        self.peer_max_frame = 16_384
        self.send_window = _DEFAULT_WINDOW
        self.stream_send: dict[int, int] = {}
        # what we received and have not yet given back in WINDOW_UPDATEs
        self._recv_unacked = 0
        self._stream_unacked: dict[int, int] = {}
        self._out: list[bytes] | None = None
        self._window_waiters: dict[int, asyncio.Future[None]] = {}
        self.highest_inbound = 0

    # -- transport
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        settings = (
            S_INITIAL_WINDOW_SIZE.to_bytes(2, "big")
            + WINDOW.to_bytes(4, "big")
            + S_MAX_HEADER_LIST_SIZE.to_bytes(2, "big")
            + _MAX_HEADER_LIST.to_bytes(4, "big")
        )
        if self.client_side:
            settings += S_ENABLE_PUSH.to_bytes(2, "big") + (0).to_bytes(4, "big")
        out = (PREFACE if self.client_side else b"") + frame_bytes(SETTINGS, 0, 0, settings)
        out += frame_bytes(WINDOW_UPDATE, 0, 0, (WINDOW - _DEFAULT_WINDOW).to_bytes(4, "big"))
        transport.write(out)

    def write(self, data: bytes) -> None:
        if self._out is not None:  # inside data_received: one write for all of it
            self._out.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            out, self._out = self._out, None
            if out and not self.closed:
                self.transport.write(b"".join(out))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake(0)

    def go_away(self, code: int = NO_ERROR, message: str = "") -> None:
        """GOAWAY naming the last stream we took: the peer opens no new streams here, and the ones
        it opened may finish (or, with an error code, the connection is closed)."""
        self.draining = True
        payload = self.highest_inbound.to_bytes(4, "big") + code.to_bytes(4, "big") + message.encode()
        self.write(frame_bytes(GOAWAY, 0, 0, payload))

    # -- receiving
    def data_received(self, data: bytes) -> None:
        self._out = []
        try:
            self._data_received(data)
        finally:
            out, self._out = self._out, None
            if out and self.transport is not None and not self.closed:
                self.transport.write(b"".join(out))

    def _data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        try:
            if self._preface_pending:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise ProtocolError("not an HTTP/2 connection preface")
                    return
                if buf[: len(PREFACE)] != PREFACE:
                    raise ProtocolError("not an HTTP/2 connection preface")
                del buf[: len(PREFACE)]
                self._preface_pending = False
            off = 0
            n = len(buf)
            while n - off >= 9:
                length = int.from_bytes(buf[off : off + 3], "big")
                if length > 16_384:  # our SETTINGS_MAX_FRAME_SIZE is the default
                    raise ProtocolError(f"frame of {length} bytes", FRAME_SIZE_ERROR)
                end = off + 9 + length
                if end > n:
                    break
                ftype, flags = buf[off + 3], buf[off + 4]
                sid = int.from_bytes(buf[off + 5 : off + 9], "big") & 0x7FFF_FFFF
                payload = bytes(buf[off + 9 : end])
                off = end
                self._frame_received(ftype, flags, sid, payload)
                if self.closed:
                    return
            del buf[:off]
        except ProtocolError as e:
            log.debug("HTTP/2 protocol error, closing the connection: %s", e)
            self.go_away(e.code, str(e))
            self.close()

    def _frame_received(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._headers_stream and ftype != CONTINUATION:
            raise ProtocolError("header block interrupted")
        if ftype == DATA:
            size = len(payload)
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            self._recv_unacked += size
            if self._recv_unacked >= WINDOW // 2:
                self.write(frame_bytes(WINDOW_UPDATE, 0, 0, self._recv_unacked.to_bytes(4, "big")))
                self._recv_unacked = 0
            self.on_data(sid, payload, size, bool(flags & END_STREAM))
        elif ftype == HEADERS:
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            self._headers_flags = flags
            if flags & END_HEADERS:
                self._headers_done(sid, payload)
            else:
                self._headers_stream = sid
                self._headers_buf = bytearray(payload)
        elif ftype == CONTINUATION:
            if sid != self._headers_stream:
                raise ProtocolError("unexpected CONTINUATION")
            self._headers_buf += payload
            if len(self._headers_buf) > 2 * _MAX_HEADER_LIST:
                raise ProtocolError("header block too large")
            if flags & END_HEADERS:
                self._headers_stream = 0
                self._headers_done(sid, bytes(self._headers_buf))
        elif ftype == RST_STREAM:
            self.stream_closed(sid)
            self.on_reset(sid, int.from_bytes(payload[:4], "big"))
        elif ftype == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
                self.write(frame_bytes(SETTINGS, ACK, 0))
        elif ftype == PING:
            if not flags & ACK:
                self.write(frame_bytes(PING, ACK, 0, payload))
        elif ftype == GOAWAY:
            self.draining = True
            last = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
            self.on_goaway(last, int.from_bytes(payload[4:8], "big"))
        elif ftype == WINDOW_UPDATE:
            inc = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
            if sid == 0:
                self.send_window += inc
                if self.send_window > _MAX_WINDOW:
                    raise ProtocolError("connection window overflow", FLOW_CONTROL_ERROR)
            elif sid in self.stream_send:
                self.stream_send[sid] += inc
            self._wake(sid)
        elif ftype == PUSH_PROMISE:
            raise ProtocolError("push is disabled")
        # PRIORITY and unknown frame types are ignored

    def _headers_done(self, sid: int, block: bytes) -> None:
        headers = self._decoder.decode(block)
        self.on_headers(sid, headers, bool(self._headers_flags & END_STREAM))

    def _settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - 5, 6):
            key = int.from_bytes(payload[i : i + 2], "big")
            value = int.from_bytes(payload[i + 2 : i + 6], "big")
            if key == S_INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise ProtocolError("initial window too large", FLOW_CONTROL_ERROR)
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for s in self.stream_send:
                    self.stream_send[s] += delta
                self._wake(0)
            elif key == S_MAX_FRAME_SIZE:
                self.peer_max_frame = value

    def received(self, sid: int, size: int) -> None:
        """``size`` bytes of a stream's DATA were consumed: top up its receive window in batches."""
        unacked = self._stream_unacked.get(sid, 0) + size
        if unacked >= WINDOW // 2:
            self.write(frame_bytes(WINDOW_UPDATE, 0, sid, unacked.to_bytes(4, "big")))
            unacked = 0
        self._stream_unacked[sid] = unacked

    # -- what a side does with frames
    def on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        raise NotImplementedError

    def on_data(self, sid: int, data: bytes, size: int, end_stream: bool) -> None:
        raise NotImplementedError

    def on_reset(self, sid: int, code: int) -> None:
        raise NotImplementedError

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        raise NotImplementedError

    # -- sending
    def header_block(self, block: bytes) -> bytes:
        """``block`` (from ``encode_headers``) as sent: the first one on a connection also says
        that our dynamic table is empty (size 0), whatever the peer's SETTINGS allow."""
        if not self._table_reset_sent:
            self._table_reset_sent = True
            return b"\x20" + block
        return block

    def headers_frames(self, sid: int, block: bytes, end_stream: bool) -> bytes:
        flags = END_STREAM if end_stream else 0
        limit = self.peer_max_frame
        if len(block) <= limit:
            return frame_bytes(HEADERS, flags | END_HEADERS, sid, block)
        out = [frame_bytes(HEADERS, flags, sid, block[:limit])]
        rest = block[limit:]
        while rest:
            chunk, rest = rest[:limit], rest[limit:]
            out.append(frame_bytes(CONTINUATION, 0 if rest else END_HEADERS, sid, chunk))
        return b"".join(out)

    def open_send(self, sid: int) -> None:
        self.stream_send[sid] = self.peer_initial_window

    def try_data(self, sid: int, data: bytes, end_stream: bool) -> bytes | None:
        """DATA frame(s) for ``data`` if the windows allow all of it now (the usual case), else None."""
        n = len(data)
        window = self.stream_send.get(sid)
        if window is None or n > window or n > self.send_window:
            return None
        self.stream_send[sid] = window - n
        self.send_window -= n
        flags = END_STREAM if end_stream else 0
        limit = self.peer_max_frame
        if n <= limit:
            return frame_bytes(DATA, flags, sid, data)
        view = memoryview(data)
        last = (n - 1) // limit * limit
        return b"".join(
            frame_bytes(DATA, flags if i == last else 0, sid, bytes(view[i : i + limit]))
            for i in range(0, n, limit)
        )

    async def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        """Send ``data`` on a stream as the peer's windows allow (waiting for WINDOW_UPDATEs)."""
        view = memoryview(data)
        while True:
            if self.closed or sid not in self.stream_send:
                raise StreamGone
            n = min(self.stream_send[sid], self.send_window, self.peer_max_frame, len(view))
            if n <= 0 and view:
                w = self._window_waiters.get(sid)
                if w is None:
                    w = self._window_waiters[sid] = asyncio.get_running_loop().create_future()
                await w
                continue
            last = n == len(view)
            self.stream_send[sid] -= n
            self.send_window -= n
            self.write(frame_bytes(DATA, END_STREAM if (last and end_stream) else 0, sid, bytes(view[:n])))
            view = view[n:]
            if last:
                return

    def stream_closed(self, sid: int) -> None:
        self.stream_send.pop(sid, None)
        self._stream_unacked.pop(sid, None)
        self._wake(sid)

    def _wake(self, sid: int) -> None:
        if sid == 0:
            waiters = list(self._window_waiters.values())
            self._window_waiters.clear()
        else:
            w = self._window_waiters.pop(sid, None)
            waiters = [w] if w is not None else []
        for w in waiters:
            if not w.done():
                w.set_result(None)
