"""The CRI image-service proxy: kubelet -> nodeagent (unix socket) -> containerd (``cri.endpoint``).

Every RPC is forwarded as raw bytes: requests and responses are never re-serialized, so fields
this build does not know survive. A generic handler serves any method name, so RPCs we do not
inspect (and ones added to CRI later) pass through untouched. Three are inspected on the side:

- PullImage: single-flight (``nodeagent.proxy.singleflight``: concurrent pulls of the same image with
  the same credentials and runtime handler share one upstream pull, the kubelet's and nodeagent's own
  pod pulls through ``ImageProxy.pull`` alike), timed and recorded per caller (``PullRecord`` with its
  ``origin``) -> metrics, one JSON log line, pull listeners;
- ImageStatus: cache hit/miss counting and last-used times;
- RemoveImage: logged.

The caller's deadline becomes the upstream deadline (PullImage: the proxy keeps each caller's deadline
and the shared upstream pull ends when its last caller left); a cancelled caller cancels the upstream
call; the upstream's status code and message go back to the caller. Calls are not serialized: every
RPC runs in its own task. With the upstream down, calls fail with UNAVAILABLE at once (the
channel does not wait for readiness) and succeed again as soon as it is back.

Both hops speak gRPC through ``nodeagent.proxy.h2grpc`` (python-hyper's ``h2`` driven from the
asyncio loop's own socket callbacks), with every resource a peer can make it hold bounded
(``h2grpc.Limits``, docs/proxy.md). A burst of pulls the callers cancel (rapid reset) costs a
bounded number of records, log lines and metric increments (``CancelSummary``).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from nodeagent.cri.client import MAX_MESSAGE_BYTES
from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.images.lastused import LastUsed
from nodeagent.proxy import sockets
from nodeagent.proxy.h2grpc import Channel, Context, Limits, OnDone, RpcError, Server, ServerCall
from nodeagent.proxy.methods import (
    INSPECT_BYTES,
    MAX_REQUEST_BYTES,
    PULL,
    REMOVE,
    SERVER_STREAMING,
    STATUS,
    for_caller,
    proxy_limits,
)
from nodeagent.proxy.pullrecords import CancelSummary
from nodeagent.proxy.pulls import PullPath, PullWrapper
from nodeagent.proxy.records import (
    PullRecord,
)
from nodeagent.proxy.singleflight import Flights
from nodeagent.proxy.slots import PullSlots
from nodeagent.run.metrics import Metrics
from nodeagent.util import memory
from nodeagent.util.log import event, get_logger

log = get_logger(__name__)


class ImageProxy(PullPath):
    def __init__(
        self,
        upstream: str,
        socket_path: Path,
        metrics: Metrics,
        last_used: LastUsed,
        *,
        on_pull: Callable[[PullRecord], None] | None = None,
        on_upstream: Callable[[bool, str], None] | None = None,
        pull_wrapper: PullWrapper | None = None,
        limits: Limits | None = None,
        slots: PullSlots | None = None,
    ) -> None:
        self.upstream = upstream
        self.socket_path = socket_path
        self.metrics = metrics
        self.last_used = last_used
        self.on_pull = on_pull
        self.on_upstream = on_upstream
        self.pull_wrapper = pull_wrapper
        self.limits = limits or proxy_limits(Limits().max_connections)
        # the daemon's limit on the pulls nodeagent starts itself: prefetch calls through the proxy
        # take a slot to start an upstream pull (pod pulls take theirs in nodeagent/podpulls)
        self.slots = slots
        self._slot_tasks: set[asyncio.Task[None]] = set()
        self._cancels = CancelSummary()
        self._server: Server | None = None
        self._channel: Channel | None = None
        self._handlers: dict[str, tuple[str, Any]] = {}
        self._sizes: dict[str, int] = {}  # image id -> size
        self._background: set[asyncio.Task[None]] = set()
        self.in_flight = 0
        self.flights = Flights()
        self._pod_ready: OrderedDict[str, float] = OrderedDict()  # image -> monotonic time pulled
        self._bound = False  # only a socket we bound is ever removed

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve on ``sock``, an already-listening unix socket (socket activation: no bind, unlink or
        chmod, and ``stop`` leaves the path alone), or else bind ``socket_path``."""
        self._channel = Channel(self.upstream, max_message=MAX_MESSAGE_BYTES, limits=self.limits)
        server = Server(
            self._resolve, max_message=MAX_REQUEST_BYTES, limits=self.limits, on_abandoned=self._abandoned
        )
        if sock is not None:
            await server.start_socket(sock, sockets.BACKLOG)
            self._server = server
            return
        sockets.prepare_socket_path(self.socket_path)
        with sockets.restrictive_umask():
            await server.start_unix(str(self.socket_path), sockets.BACKLOG)
        sockets.finish_socket(self.socket_path)
        self._server = server
        self._bound = True

    async def stop(self, grace: float) -> None:
        """Stop accepting calls, let in-flight ones finish for up to ``grace`` seconds, then cancel
        them; finish recording; close the upstream channel."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self.drain_records(timeout=5.0)
        self._cancels.flush()
        if self._channel is not None:
            await self._channel.close()
        if self._bound:
            sockets.remove_socket(self.socket_path)
            self._bound = False

    async def drain_records(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait for pending pull records: a pull's caller can see its answer (an abort in particular)
        before the handler has left its ``finally`` and queued the record, so first wait for the
        in-flight handlers, then for the record tasks; bounded by ``timeout`` in all."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110 (shutdown and tests only)
            await asyncio.sleep(0.005)
        if self._background:
            await asyncio.wait(set(self._background), timeout=max(0.0, deadline - time.monotonic()))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- forwarding ----------------------------------------------------------------------------
    def _resolve(self, method: str) -> tuple[str, Any]:
        """``(kind, handler)`` for a method name (see ``h2grpc.Server``): inspected ones get their
        handler, every other name (also ones this build does not know) is relayed as it is."""
        found = self._handlers.get(method)
        if found is not None:
            return found
        if method in SERVER_STREAMING:

            def stream(request: bytes, ctx: Context) -> Any:
                return self.passthrough_stream(method, request, ctx)

            found = ("stream", stream)
        else:
            inspected = {PULL: self._pull, STATUS: self._status, REMOVE: self._remove}
            found = ("relay", inspected.get(method, self._passthrough))
        if len(self._handlers) < 256:  # bounded even if a client invents method names
            self._handlers[method] = found
        return found

    def _note(self, method: str, code: grpc.StatusCode) -> None:
        short = method.rsplit("/", 1)[-1]
        self.metrics.observe_proxy_request(short, code.name)
        if self.on_upstream is not None:
            if code == grpc.StatusCode.UNAVAILABLE:
                self.on_upstream(False, f"{method}: UNAVAILABLE")
            else:
                self.on_upstream(True, "")

    def _relay(self, call: ServerCall, done: OnDone, inspect: bool = False) -> None:
        """Start the upstream call for ``call`` (its request is written before this returns) with the
        caller's deadline and metadata; the answer's bytes go to the caller as they arrive (``done``
        gets the message itself only when ``inspect``); a caller that goes away resets it."""
        assert self._channel is not None
        pending = self._channel.start(
            call.method,
            call.message,
            done,
            timeout=call.time_remaining(),
            metadata=call.metadata,
            pipe=call,
            capture=INSPECT_BYTES if inspect else 0,
        )
        call.on_cancel = pending.cancel

    def _answer(self, call: ServerCall, message: bytes | None, error: RpcError | None) -> None:
        """The upstream's answer to the caller first, then the bookkeeping."""
        if error is None:  # relayed: ``message`` is None unless the call was inspected
            call.reply(message or b"")
            self._note(call.method, grpc.StatusCode.OK)
            if call.relayed >= memory.LARGE:  # e.g. ListImages on a node with thousands of images
                memory.note_large()
        else:
            call.fail(error.code(), for_caller(error.details()))
            self._note(call.method, error.code())

    def _passthrough(self, call: ServerCall) -> None:
        self._relay(call, lambda message, error: self._answer(call, message, error))

    async def _forward(self, method: str, request: bytes, ctx: Context) -> bytes:
        """One upstream call as a coroutine (the mirror-health retry path); raises RpcError."""
        assert self._channel is not None
        try:
            response = await self._channel.unary(
                method, request, timeout=ctx.time_remaining(), metadata=ctx.metadata
            )
        except RpcError as e:
            self._note(method, e.code())
            raise
        self._note(method, grpc.StatusCode.OK)
        return response

    async def passthrough_stream(self, method: str, request: bytes, ctx: Context) -> Any:
        assert self._channel is not None
        try:
            async for item in self._channel.unary_stream(
                method, request, timeout=ctx.time_remaining(), metadata=ctx.metadata
            ):
                yield item
        except RpcError as e:
            self._note(method, e.code())
            raise RpcError(e.code(), for_caller(e.details())) from None
        self._note(method, grpc.StatusCode.OK)

    def _status(self, call: ServerCall) -> None:
        def done(message: bytes | None, error: RpcError | None) -> None:
            self._answer(call, message, error)
            if message is not None:
                self._count_status(call.message, message)

        self._relay(call, done, inspect=True)

    def _count_status(self, request: bytes, response: bytes) -> None:
        try:
            image = pb.ImageStatusRequest.FromString(request).image.image
            status = pb.ImageStatusResponse.FromString(response)
        except Exception:
            return
        hit = status.HasField("image")
        self.metrics.cache_requests.labels(result="hit" if hit else "miss").inc()
        if hit:
            self._observe_lead(image)
            self.last_used.touch(image)
            if status.image.id:
                self.last_used.touch(status.image.id)

    def _remove(self, call: ServerCall) -> None:
        try:
            image = pb.RemoveImageRequest.FromString(call.message).image.image
        except Exception:
            image = "?"
        t0 = time.monotonic()

        def done(message: bytes | None, error: RpcError | None) -> None:
            self._answer(call, message, error)
            if error is not None:
                event(log, "remove", image=image, result=error.code().name, error=error.details())
            else:
                event(
                    log, "remove", image=image, result="OK", duration_seconds=round(time.monotonic() - t0, 4)
                )

        self._relay(call, done)


# CancelSummary and proxy_limits live in pullrecords / methods; callers import them from here.
__all__ = ["CancelSummary", "ImageProxy", "proxy_limits"]
