"""One call being served (``ServerCall``): what a handler knows about it and how it is answered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from nodeagent.proxy.h2grpc.wire import (
    _OK_TRAILERS,
    _RESPONSE_HEADERS,
    MessageReader,
    message_frame,
    status_headers,
    whole_message,
)
from nodeagent.util.log import get_logger

if TYPE_CHECKING:
    from nodeagent.proxy.h2grpc.serverconn import _ServerConn

log = get_logger(__package__)  # one logger for the package: "nodeagent.proxy.h2grpc"

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
