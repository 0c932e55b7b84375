"""nodeagent.proxy.h2grpc against real gRPC peers (grpc.aio, C-core's HTTP/2) on unix sockets in
/tmp: our Server answering grpc.aio clients, our Channel calling grpc.aio servers. Nothing is faked
but the handlers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import grpc.aio
import pytest
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame, SettingsFrame

from nodeagent.proxy.h2grpc import Channel, Context, Limits, RpcError, Server, ServerCall

MB = 1024 * 1024
LIMIT = 64 * MB


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def goaway_code(data: bytes) -> int | None:
    """The error code of the GOAWAY among the frames in ``data`` (None: no GOAWAY)."""
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        if isinstance(frame, GoAwayFrame):
            return int(frame.error_code)
        data = data[9 + length :]
    return None


@asynccontextmanager
async def our_server(resolve: Any) -> AsyncIterator[tuple[Server, str]]:
    d = tempfile.mkdtemp(prefix="na-h2-")
    path = os.path.join(d, "s.sock")
    srv = Server(resolve, max_message=LIMIT)
    await srv.start_unix(path)
    try:
        yield srv, path
    finally:
        await srv.stop(1.0)
        shutil.rmtree(d, ignore_errors=True)


@asynccontextmanager
async def grpc_server(handlers: dict[str, Any]) -> AsyncIterator[str]:
    """A real grpc.aio server; ``handlers``: method -> grpc.*_rpc_method_handler (bytes in/out)."""
    d = tempfile.mkdtemp(prefix="na-h2-")
    path = os.path.join(d, "g.sock")

    class Generic(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: Any) -> Any:
            return handlers.get(details.method)

    server = grpc.aio.server(
        options=(("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT))
    )
    server.add_generic_rpc_handlers((Generic(),))
    server.add_insecure_port("unix://" + path)
    await server.start()
    try:
        yield "unix://" + path
    finally:
        await server.stop(0)
        shutil.rmtree(d, ignore_errors=True)


def grpc_channel(path: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        "unix://" + path,
        options=(("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT)),
    )


# --- our server, grpc.aio clients ---------------------------------------------------------------
def test_relay_handler_answers_a_grpc_client_with_its_metadata_and_deadline() -> None:
    seen: list[Context] = []

    def echo(call: ServerCall) -> None:
        seen.append(call)
        call.reply(b"echo:" + call.message)

    async def main() -> None:
        async with our_server(lambda m: ("relay", echo)) as (_, path), grpc_channel(path) as ch:
            out = await ch.unary_unary("/t.S/Echo")(b"hi", timeout=7.0, metadata=(("x-trace", "abc"),))
            assert out == b"echo:hi"
            assert await ch.unary_unary("/t.S/Echo")(b"") == b"echo:"  # an empty message
        ctx = seen[0]
        assert ctx.method == "/t.S/Echo"
        assert ("x-trace", "abc") in ctx.metadata
        assert all(not k.startswith(("grpc-", ":")) and k != "content-type" for k, _ in ctx.metadata)
        assert ctx.deadline is not None and seen[1].deadline is None

    run(main())


def test_status_code_and_message_reach_a_grpc_client() -> None:
    message = "pull failed: 100% of 'ü' %41 \n second line"

    async def main() -> None:
        def fail(call: ServerCall) -> None:
            call.fail(grpc.StatusCode.NOT_FOUND, message)

        async with our_server(lambda m: ("relay", fail)) as (_, path), grpc_channel(path) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await ch.unary_unary("/t.S/Fail")(b"x")
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND
            assert ei.value.details() == message

    run(main())


def test_big_messages_both_ways_wait_for_the_peers_flow_control_windows() -> None:
    big = os.urandom(5 * MB)  # far beyond grpc's initial 64 KiB windows

    async def main() -> None:
        def double(call: ServerCall) -> None:
            call.reply(call.message + call.message)

        async with our_server(lambda m: ("relay", double)) as (_, path), grpc_channel(path) as ch:
            for _ in range(2):
                out = await ch.unary_unary("/t.S/Double")(big, timeout=20)
                assert out == big + big

    run(main())


def test_compressed_requests_are_decompressed() -> None:
    async def main() -> None:
        def echo(call: ServerCall) -> None:
            call.reply(call.message)

        async with our_server(lambda m: ("relay", echo)) as (_, path), grpc_channel(path) as ch:
            body = b"a" * 100_000
            assert await ch.unary_unary("/t.S/E")(body, compression=grpc.Compression.Gzip) == body

    run(main())


def test_a_caller_that_goes_away_cancels_the_handler() -> None:
    cancelled = asyncio.Event()

    def hang(call: ServerCall) -> None:
        call.on_cancel = cancelled.set

    async def main() -> None:
        async with our_server(lambda m: ("relay", hang)) as (srv, path), grpc_channel(path) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await ch.unary_unary("/t.S/Hang")(b"x", timeout=0.3)
            assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(cancelled.wait(), 2)  # the client's RST_STREAM reached us
            assert srv.in_flight == 0

    run(main())


def test_task_handlers_and_server_streaming() -> None:
    async def slow(request: bytes, ctx: Context) -> bytes:
        await asyncio.sleep(0.01)
        return request[::-1]

    async def count(request: bytes, ctx: Context) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    async def broken(request: bytes, ctx: Context) -> bytes:
        raise ValueError("boom")

    kinds = {"/t.S/Slow": ("unary", slow), "/t.S/Count": ("stream", count), "/t.S/Broken": ("unary", broken)}

    async def main() -> None:
        async with our_server(kinds.__getitem__) as (_, path), grpc_channel(path) as ch:
            assert await ch.unary_unary("/t.S/Slow")(b"abc") == b"cba"
            got = [m async for m in ch.unary_stream("/t.S/Count")(b"5")]
            assert got == [b"0", b"1", b"2", b"3", b"4"]
            assert [m async for m in ch.unary_stream("/t.S/Count")(b"0")] == []
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await ch.unary_unary("/t.S/Broken")(b"")
            assert ei.value.code() == grpc.StatusCode.UNKNOWN and "boom" in (ei.value.details() or "")

    run(main())


def test_stop_lets_calls_in_flight_finish_and_refuses_new_connections() -> None:
    pending: list[ServerCall] = []
    arrived = asyncio.Event()

    def hold(call: ServerCall) -> None:
        pending.append(call)
        arrived.set()

    async def main() -> None:
        d = tempfile.mkdtemp(prefix="na-h2-")
        path = os.path.join(d, "s.sock")
        srv = Server(lambda m: ("relay", hold), max_message=LIMIT)
        await srv.start_unix(path)
        async with grpc_channel(path) as ch:
            call = asyncio.ensure_future(ch.unary_unary("/t.S/Hold")(b"x", timeout=5))
            await asyncio.wait_for(arrived.wait(), 5)
            stopping = asyncio.ensure_future(srv.stop(grace=3.0))
            await asyncio.sleep(0.1)
            assert not stopping.done()  # waiting for the call in flight
            pending[0].reply(b"done")
            assert await call == b"done"
            await asyncio.wait_for(stopping, 2)
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await ch.unary_unary("/t.S/Hold")(b"x", timeout=2)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        os.unlink(path)
        os.rmdir(d)

    run(main())


def test_a_call_still_running_when_the_grace_ends_is_cancelled() -> None:
    cancelled: list[bool] = []

    def hold(call: ServerCall) -> None:
        call.on_cancel = lambda: cancelled.append(True)

    async def main() -> None:
        async with our_server(lambda m: ("relay", hold)) as (srv, path), grpc_channel(path) as ch:
            call = asyncio.ensure_future(ch.unary_unary("/t.S/Hold")(b"x", timeout=5))
            await asyncio.sleep(0.2)
            await srv.stop(grace=0.2)  # CANCELLED below: not left to its 5 s deadline
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await call
            assert ei.value.code() == grpc.StatusCode.CANCELLED
            assert cancelled == [True]

    run(main())


def test_garbage_on_the_socket_closes_that_connection_only() -> None:
    def echo(call: ServerCall) -> None:
        call.reply(call.message)

    async def main() -> None:
        async with our_server(lambda m: ("relay", echo)) as (_, path):
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 2)  # read until the server closes
            assert goaway_code(data) == ErrorCodes.PROTOCOL_ERROR  # a GOAWAY came before the close
            writer.close()
            async with grpc_channel(path) as ch:
                assert await ch.unary_unary("/t.S/E")(b"ok") == b"ok"

    run(main())


# --- our channel, grpc.aio servers --------------------------------------------------------------
def test_channel_calls_a_grpc_server_big_messages_metadata_and_status() -> None:
    seen: dict[str, Any] = {}

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen["md"] = dict(context.invocation_metadata() or ())
        seen["remaining"] = context.time_remaining()
        return request

    async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "denied: 100% ü")
        raise AssertionError

    handlers = {
        "/t.S/Echo": grpc.unary_unary_rpc_method_handler(echo),
        "/t.S/Fail": grpc.unary_unary_rpc_method_handler(fail),
    }

    async def main() -> None:
        async with grpc_server(handlers) as target:
            ch = Channel(target, max_message=LIMIT)
            try:
                big = os.urandom(6 * MB)
                assert await ch.unary("/t.S/Echo", big, timeout=20, metadata=(("x-a", "1"),)) == big
                assert seen["md"]["x-a"] == "1"
                assert 15 < seen["remaining"] <= 20  # our deadline travelled as grpc-timeout
                assert await ch.unary("/t.S/Echo", b"") == b""
                with pytest.raises(RpcError) as ei:
                    await ch.unary("/t.S/Fail", b"")
                assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert ei.value.details() == "denied: 100% ü"
                with pytest.raises(RpcError) as ei:
                    await ch.unary("/t.S/Missing", b"")
                assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
            finally:
                await ch.close()

    run(main())


def test_channel_deadline_and_cancel_reach_the_server() -> None:
    cancelled: list[str] = []

    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(request.decode())
            raise
        return b""

    async def main() -> None:
        async with grpc_server({"/t.S/Slow": grpc.unary_unary_rpc_method_handler(slow)}) as target:
            ch = Channel(target, max_message=LIMIT)
            try:
                with pytest.raises(RpcError) as ei:
                    await ch.unary("/t.S/Slow", b"deadline", timeout=0.3)
                assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # not the answer after 10 s
                task = asyncio.ensure_future(ch.unary("/t.S/Slow", b"cancel"))
                await asyncio.sleep(0.2)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                for _ in range(100):
                    if len(cancelled) == 2:
                        break
                    await asyncio.sleep(0.02)
                assert sorted(cancelled) == ["cancel", "deadline"]
            finally:
                await ch.close()

    run(main())


def test_channel_streams_and_fails_fast_when_nobody_listens() -> None:
    async def count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield b"m" * 100_000 + str(i).encode()

    async def main() -> None:
        async with grpc_server({"/t.S/Count": grpc.unary_stream_rpc_method_handler(count)}) as target:
            ch = Channel(target, max_message=LIMIT)
            try:
                got = [m async for m in ch.unary_stream("/t.S/Count", b"40", timeout=20)]
                assert len(got) == 40 and got[-1].endswith(b"39")
            finally:
                await ch.close()
        d = tempfile.mkdtemp(prefix="na-h2-")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(os.path.join(d, "dead.sock"))  # bound, not listening: connection refused
        ch = Channel("unix://" + os.path.join(d, "dead.sock"), max_message=LIMIT)
        with pytest.raises(RpcError) as ei:
            await ch.unary("/t.S/Any", b"", timeout=30)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE  # at once, not DEADLINE_EXCEEDED after 30 s
        sock.close()
        os.unlink(os.path.join(d, "dead.sock"))
        os.rmdir(d)

    run(main())


# --- bounds (issue 12): raw frames against our server ---------------------------------------------
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frames_of(data: bytes) -> list[Frame]:
    out = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        if len(data) < 9 + length:
            break
        frame.parse_body(memoryview(data[9 : 9 + length]))
        out.append(frame)
        data = data[9 + length :]
    return out


async def read_all(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:  # noqa: ASYNC109
    buf = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(1 << 16):
                buf += chunk
    return buf


def settings_bytes(values: dict[int, int]) -> bytes:
    body = b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in values.items())
    return len(body).to_bytes(3, "big") + b"\x04\x00" + bytes(4) + body


def test_settings_advertise_the_stream_limit_and_bad_values_close_only_that_connection() -> None:
    def echo(call: ServerCall) -> None:
        call.reply(call.message)

    async def main() -> None:
        async with our_server(lambda m: ("relay", echo)) as (_, path), grpc_channel(path) as ch:
            for value, code in ((0, ErrorCodes.PROTOCOL_ERROR), (2**24, ErrorCodes.PROTOCOL_ERROR)):
                reader, writer = await asyncio.open_unix_connection(path)
                writer.write(PREFACE + settings_bytes({0x5: value}))  # SETTINGS_MAX_FRAME_SIZE
                frames = frames_of(await read_all(reader))
                first = frames[0]
                assert isinstance(first, SettingsFrame)
                assert first.settings[0x3] == Limits().max_streams  # MAX_CONCURRENT_STREAMS
                assert first.settings[0x6] == Limits().max_header_list  # MAX_HEADER_LIST_SIZE
                assert goaway_code(b"".join(f.serialize() for f in frames)) == code
                writer.close()
                assert await ch.unary_unary("/t.S/E")(b"still fine", timeout=5) == b"still fine"

    run(main())


def test_a_ping_flood_gets_enhance_your_calm() -> None:
    async def main() -> None:
        limits = Limits(max_pings=50)
        d = tempfile.mkdtemp(prefix="na-h2-")
        path = os.path.join(d, "s.sock")
        srv = Server(lambda m: ("relay", lambda c: c.reply(b"")), max_message=LIMIT, limits=limits)
        await srv.start_unix(path)
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(
                PREFACE + settings_bytes({}) + PingFrame(0, opaque_data=b"12345678").serialize() * 500
            )
            data = await read_all(reader)
            pongs = [f for f in frames_of(data) if isinstance(f, PingFrame)]
            assert goaway_code(data) == ErrorCodes.ENHANCE_YOUR_CALM
            assert len(pongs) <= 51 + 16 * 1024 // 17  # cut off within one feed step past the limit
        finally:
            await srv.stop(1.0)
            shutil.rmtree(d, ignore_errors=True)

    run(main())


def test_a_request_larger_than_the_limit_fails_at_its_length_prefix() -> None:
    async def main() -> None:
        d = tempfile.mkdtemp(prefix="na-h2-")
        path = os.path.join(d, "s.sock")
        srv = Server(lambda m: ("relay", lambda c: c.reply(b"")), max_message=1 << 20)
        await srv.start_unix(path)
        try:
            async with grpc_channel(path) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await ch.unary_unary("/t.S/E")(b"x" * (2 << 20), timeout=5)
                assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert srv.held == 0  # nothing of it is kept
        finally:
            await srv.stop(1.0)
            shutil.rmtree(d, ignore_errors=True)

    run(main())


def test_at_the_connection_limit_an_idle_connection_makes_room() -> None:
    def echo(call: ServerCall) -> None:
        call.reply(call.message)

    async def main() -> None:
        d = tempfile.mkdtemp(prefix="na-h2-")
        path = os.path.join(d, "s.sock")
        srv = Server(lambda m: ("relay", echo), max_message=LIMIT, limits=Limits(max_connections=3))
        await srv.start_unix(path)
        try:
            async with grpc_channel(path) as ch:
                assert await ch.unary_unary("/t.S/E")(b"a", timeout=5) == b"a"  # a used connection
                idle = [await asyncio.open_unix_connection(path) for _ in range(5)]
                await asyncio.sleep(0.2)
                assert len(srv._conns) <= 3
                assert await ch.unary_unary("/t.S/E")(b"b", timeout=5) == b"b"  # kept: it made calls
                for _, w in idle:
                    w.close()
        finally:
            await srv.stop(1.0)
            shutil.rmtree(d, ignore_errors=True)

    run(main())


def test_a_caller_that_does_not_read_holds_at_most_the_upstream_window() -> None:
    """A relayed 8 MB answer to a caller whose window is 0: the proxy takes no more from the upstream
    than the stream's window (128 KiB), and other callers on the same upstream connection go on."""
    big = os.urandom(8 * MB)

    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return big if request == b"big" else request

    async def main() -> None:
        async with grpc_server({"/t.S/A": grpc.unary_unary_rpc_method_handler(answer)}) as target:
            ch = Channel(target, max_message=LIMIT)

            def relay(call: ServerCall) -> None:
                def done(message: bytes | None, error: RpcError | None) -> None:
                    if error is None:
                        call.reply(b"")
                    else:
                        call.fail(error.code(), error.details())

                call.on_cancel = ch.start(call.method, call.message, done, pipe=call).cancel

            async with our_server(lambda m: ("relay", relay)) as (srv, path):
                _, writer = await asyncio.open_unix_connection(path)
                enc = Encoder()
                block = enc.encode(
                    [
                        (":method", "POST"),
                        (":scheme", "http"),
                        (":path", "/t.S/A"),
                        (":authority", "x"),
                        ("content-type", "application/grpc"),
                    ]
                )
                h = HeadersFrame(1, data=block, flags=["END_HEADERS"])
                body = DataFrame(1, data=b"\x00\x00\x00\x00\x03big", flags=["END_STREAM"])
                writer.write(PREFACE + settings_bytes({0x4: 0}) + h.serialize() + body.serialize())
                await asyncio.sleep(1.0)
                (conn,) = list(srv._conns)
                assert conn.queued <= Limits().upstream_stream_window
                async with grpc_channel(path) as other:  # shares the upstream connection
                    assert await other.unary_unary("/t.S/A")(b"small", timeout=5) == b"small"
                writer.close()
            await ch.close()

    run(main())
