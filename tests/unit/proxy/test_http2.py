"""nodeagent.proxy.http2 without sockets: the HPACK decoder against RFC 7541's examples and against
python-hyper's ``hpack`` encoder (an independent implementation), our encoder against its decoder,
and the framing rules a peer relies on."""

from __future__ import annotations

import asyncio
from typing import Any

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.proxy import http2
from nodeagent.proxy.http2 import Connection, HpackDecoder, HpackError, encode_headers, frame_bytes


def test_rfc7541_appendix_c_requests_decode() -> None:
    # C.3: requests without Huffman coding; C.4: the same requests with it. Each group shares
    # one decoder: later blocks refer to entries the earlier ones added to the dynamic table.
    c3 = [
        "828684410f7777772e6578616d706c652e636f6d",
        "828684be58086e6f2d6361636865",
        "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
    ]
    c4 = [
        "828684418cf1e3c2e5f23a6ba0ab90f4ff",
        "828684be5886a8eb10649cbf",
        "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
    ]
    want = [
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")],
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"www.example.com"),
            (b"cache-control", b"no-cache"),
        ],
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":path", b"/index.html"),
            (b":authority", b"www.example.com"),
            (b"custom-key", b"custom-value"),
        ],
    ]
    for blocks in (c3, c4):
        d = HpackDecoder()
        assert [d.decode(bytes.fromhex(b)) for b in blocks] == want
        assert d.size == 164  # RFC 7541 C.3.3 / C.4.3: the table holds 164 octets at the end
        assert d.table[0] == (b"custom-key", b"custom-value")


_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20).map(str.encode)
_value = st.binary(max_size=60)
_headers = st.lists(st.tuples(_name, _value), max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    blocks=st.lists(_headers, min_size=1, max_size=6),
    huffman=st.booleans(),
    table=st.sampled_from([0, 256, 4096]),
)
def test_decodes_what_an_independent_encoder_writes(
    blocks: list[list[tuple[bytes, bytes]]], huffman: bool, table: int
) -> None:
    enc = hpack.Encoder()
    enc.header_table_size = table  # a size update at the start of the next block
    dec = HpackDecoder()
    for headers in blocks:
        block = enc.encode(headers, huffman=huffman)
        assert dec.decode(block) == headers
    # the decoder's dynamic table mirrors the encoder's (same entries, newest first)
    assert list(dec.table) == [(bytes(n), bytes(v)) for n, v in enc.header_table.dynamic_entries]


def test_never_indexed_fields_and_static_names() -> None:
    enc = hpack.Encoder()
    block = enc.encode([hpack.NeverIndexedHeaderTuple(b"authorization", b"secret"), (b":path", b"/x")])
    dec = HpackDecoder()
    assert dec.decode(block) == [(b"authorization", b"secret"), (b":path", b"/x")]
    assert (b"authorization", b"secret") not in dec.table  # never indexed: not in the table


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (b"\xbf", "index 63 out of range"),  # no dynamic entry yet
        (b"\x80", "index 0 out of range"),
        (b"\x3f\xe2\x1f", "table size 4097 above the allowed 4096"),
        (b"\x00\x85abc", "truncated header block"),
        (b"\x00\x01a\xff\xff", "bad integer"),  # the length ends mid-integer
        (b"\x00\x01a\x7f" + b"\xff" * 6 + b"\x01", "bad integer"),  # an integer longer than 32 bits
    ],
)
def test_bad_blocks_are_compression_errors(block: bytes, message: str) -> None:
    with pytest.raises(HpackError, match=message) as ei:
        HpackDecoder().decode(block)
    assert ei.value.code == http2.COMPRESSION_ERROR


def test_header_list_size_is_bounded() -> None:
    big = encode_headers([(b"x-big", b"v" * 40_000), (b"x-big2", b"v" * 40_000)])
    with pytest.raises(HpackError, match="header list too large"):
        HpackDecoder().decode(big)


@given(_headers)
def test_our_blocks_decode_elsewhere_and_never_touch_the_dynamic_table(
    headers: list[tuple[bytes, bytes]],
) -> None:
    dec = hpack.Decoder()
    out = [(bytes(n), bytes(v)) for n, v in dec.decode(encode_headers(headers), raw=True)]
    assert out == headers
    assert len(dec.header_table.dynamic_entries) == 0


def test_static_entries_are_sent_by_index() -> None:
    assert encode_headers([(b":method", b"POST"), (b":status", b"200")]) == b"\x83\x88"
    # content-type is static entry 31: its name by index, the value as a literal
    assert encode_headers([(b"content-type", b"application/grpc")]) == b"\x0f\x10\x10application/grpc"


class _Recorder(Connection):
    """A Connection on a fake transport that records what a side would see."""

    client_side = True

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[Any, ...]] = []
        self.sent = bytearray()

    def on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self.events.append(("headers", sid, headers, end_stream))

    def on_data(self, sid: int, data: bytes, size: int, end_stream: bool) -> None:
        self.events.append(("data", sid, data, size, end_stream))

    def on_reset(self, sid: int, code: int) -> None:
        self.events.append(("reset", sid, code))

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        self.events.append(("goaway", last_stream_id, code))


class _Transport(asyncio.Transport):
    def __init__(self, sink: bytearray) -> None:
        super().__init__()
        self.sink = sink
        self.closed = False

    def write(self, data: Any) -> None:
        self.sink += data

    def close(self) -> None:
        self.closed = True


def _connected() -> _Recorder:
    c = _Recorder()
    c.connection_made(_Transport(c.sent))
    c.sent.clear()
    return c


def test_continuation_padding_ping_and_settings() -> None:
    c = _connected()
    block = encode_headers([(b":status", b"200"), (b"x-a", b"1" * 30)])
    padded = bytes([3]) + block[:10] + b"\x00\x00\x00"  # PADDED: pad length, fragment, padding
    wire = (
        frame_bytes(http2.HEADERS, http2.PADDED, 1, padded)
        + frame_bytes(http2.CONTINUATION, http2.END_HEADERS, 1, block[10:])
        + frame_bytes(http2.DATA, http2.PADDED | http2.END_STREAM, 1, bytes([2]) + b"hi\x00\x00")
        + frame_bytes(http2.PING, 0, 0, b"12345678")
        + frame_bytes(http2.SETTINGS, 0, 0, (4).to_bytes(2, "big") + (1000).to_bytes(4, "big"))
    )
    for i in range(0, len(wire), 7):  # any split of the byte stream gives the same frames
        c.data_received(wire[i : i + 7])
    assert c.events == [
        ("headers", 1, [(b":status", b"200"), (b"x-a", b"1" * 30)], False),
        ("data", 1, b"hi", 5, True),  # flow control counts the padding too
    ]
    assert frame_bytes(http2.PING, http2.ACK, 0, b"12345678") in c.sent
    assert frame_bytes(http2.SETTINGS, http2.ACK, 0) in c.sent
    assert c.peer_initial_window == 1000


def test_send_window_is_respected_and_refilled() -> None:
    c = _connected()
    c.open_send(1)
    c.stream_send[1] = 10  # the peer allows 10 bytes on this stream
    assert c.try_data(1, b"x" * 11, end_stream=False) is None
    assert c.try_data(1, b"x" * 10, end_stream=False) is not None
    assert c.stream_send[1] == 0

    async def main() -> bytes:
        task = asyncio.ensure_future(c.send_data(1, b"y" * 5))
        await asyncio.sleep(0.01)
        assert not task.done()  # waiting for a WINDOW_UPDATE
        c.sent.clear()
        c.data_received(frame_bytes(http2.WINDOW_UPDATE, 0, 1, (5).to_bytes(4, "big")))
        await asyncio.wait_for(task, 1)
        return bytes(c.sent)

    assert asyncio.run(main()) == frame_bytes(http2.DATA, 0, 1, b"y" * 5)


def test_protocol_errors_close_the_connection_with_goaway() -> None:
    c = _connected()
    c.data_received(frame_bytes(http2.PUSH_PROMISE, 0, 1, b"\x00\x00\x00\x02"))
    assert c.transport is not None and c.transport.closed  # type: ignore[attr-defined]
    assert bytes(c.sent)[3] == http2.GOAWAY
    s = Connection()  # a server side must see the client preface first
    s.connection_made(_Transport(bytearray()))
    s.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.transport is not None and s.transport.closed  # type: ignore[attr-defined]


def test_received_data_is_given_back_in_batches() -> None:
    c = _connected()
    chunk = b"z" * 16_000
    for _ in range(3):
        c.received(1, len(chunk))
    assert not c.sent  # small amounts: no WINDOW_UPDATE frames at all
    for _ in range(300):
        c.received(1, len(chunk))
    # one WINDOW_UPDATE each time half of our 8 MiB window was used: 303 x 16,000 bytes -> 1
    half = http2.WINDOW // 2
    given_back = (half // len(chunk) + 1) * len(chunk)
    assert bytes(c.sent) == frame_bytes(http2.WINDOW_UPDATE, 0, 1, given_back.to_bytes(4, "big"))


def _frames(wire: bytes) -> list[tuple[int, int, int, bytes]]:
    out, i = [], 0
    while i < len(wire):
        n = int.from_bytes(wire[i : i + 3], "big")
        out.append(
            (wire[i + 3], wire[i + 4], int.from_bytes(wire[i + 5 : i + 9], "big"), wire[i + 9 : i + 9 + n])
        )
        i += 9 + n
    return out


def test_a_message_larger_than_a_frame_goes_in_several_when_the_windows_allow() -> None:
    c = _connected()
    c.data_received(frame_bytes(http2.WINDOW_UPDATE, 0, 0, (1 << 20).to_bytes(4, "big")))
    c.open_send(3)
    c.stream_send[3] = 1 << 20
    body = bytes(range(256)) * 160  # 40,960 bytes: three frames of at most 16,384
    frames = _frames(c.try_data(3, body, end_stream=True) or b"")
    assert [len(p) for _, _, _, p in frames] == [16_384, 16_384, 8_192]
    assert [f for _, f, _, _ in frames] == [0, 0, http2.END_STREAM]  # END_STREAM on the last only
    assert b"".join(p for _, _, _, p in frames) == body
    assert c.stream_send[3] == (1 << 20) - len(body)


def test_a_reset_stream_leaves_no_per_stream_state() -> None:
    c = _connected()
    c.open_send(5)
    c.received(5, 100)
    c.data_received(frame_bytes(http2.RST_STREAM, 0, 5, (8).to_bytes(4, "big")))
    assert ("reset", 5, 8) in c.events
    assert 5 not in c.stream_send and 5 not in c._stream_unacked
