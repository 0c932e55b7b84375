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

Modules: ``wire`` (gRPC framing, status and timeout headers), ``limits`` (``Limits``, the log
limiter), ``peer`` (one HTTP/2 connection on an asyncio transport), ``call`` (``ServerCall``),
``serverconn`` (a kubelet-side connection: requests, floods, budgets, timeouts), ``tasks`` (handlers run
as tasks, streamed answers with back-pressure), ``server``
(``Server``), ``clientconn`` (the upstream connection and its calls), ``channel`` (``Channel``).
"""

from __future__ import annotations

from nodeagent.proxy.h2grpc.call import Context, ServerCall
from nodeagent.proxy.h2grpc.channel import Channel
from nodeagent.proxy.h2grpc.clientconn import OnDone, PendingCall
from nodeagent.proxy.h2grpc.limits import Limits, LogLimiter
from nodeagent.proxy.h2grpc.server import Server
from nodeagent.proxy.h2grpc.wire import RpcError

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
