"""Task-based handlers ("unary", "stream") of a kubelet-side connection: the handler runs in its
own task and a streamed answer waits while its stream's queue is full (back-pressure)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc

from nodeagent.proxy.h2grpc.wire import _OK_TRAILERS, _RESPONSE_HEADERS, RpcError, message_frame
from nodeagent.util.log import get_logger

if TYPE_CHECKING:
    from nodeagent.proxy.h2grpc.call import ServerCall
    from nodeagent.proxy.h2grpc.serverconn import _ServerConn

log = get_logger(__package__)


async def send_message(conn: _ServerConn, call: ServerCall, message: bytes) -> None:
    """One message of a server-streaming answer; waits while more than one stream window of it
    is queued (back-pressure to the handler)."""
    call.start_response()
    conn.send(call.sid, message_frame(message))
    while not conn.closed and not call.finished and queued_for(conn, call.sid) > conn.limits.stream_window:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake(n: int, fut: asyncio.Future[None] = fut) -> None:
            if not fut.done():
                fut.set_result(None)

        out = conn.out.get(call.sid)
        if out is None:
            break
        out.on_sent = wake
        await fut
    if conn.closed or call.finished:
        raise ConnectionResetError("the caller went away")


def queued_for(conn: _ServerConn, sid: int) -> int:
    out = conn.out.get(sid)
    return 0 if out is None else out.size


async def run_task(conn: _ServerConn, call: ServerCall) -> None:
    """A task-based handler ("unary" or "stream")."""
    try:
        if call.kind == "stream":
            async for msg in call.handler(call.message, call):
                if call.finished:
                    return
                await send_message(conn, call, msg)
            if call._finish():
                if call.headers_sent:
                    conn.send(call.sid, b"", trailers=_OK_TRAILERS)
                else:
                    conn.send_headers(call.sid, [*_RESPONSE_HEADERS, *_OK_TRAILERS], end=True)
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
