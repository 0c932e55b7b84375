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
import contextlib
import functools
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from nodeagent import memory
from nodeagent.cri.client import MAX_MESSAGE_BYTES, auth_secrets, redact
from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.lastused import LastUsed
from nodeagent.log import event, get_logger
from nodeagent.metrics import Metrics
from nodeagent.proxy import sockets
from nodeagent.proxy.h2grpc import Channel, Context, Limits, OnDone, RpcError, Server, ServerCall
from nodeagent.proxy.records import (
    ORIGIN_KUBELET,
    ORIGIN_POD,
    ORIGIN_PREFETCH,
    ORIGINS,
    PullRecord,
    classify,
    image_label,
    is_image_id,
    registry_of,
)
from nodeagent.proxy.singleflight import Flight, Flights, Key, Waiting, pull_key
from nodeagent.proxy.slots import PullSlots

log = get_logger(__name__)

PullWrapper = Callable[[str, Callable[[], Awaitable[bytes]]], Awaitable[tuple[bytes, str | None]]]

IMAGE_SERVICE = "/runtime.v1.ImageService/"
PULL = IMAGE_SERVICE + "PullImage"
STATUS = IMAGE_SERVICE + "ImageStatus"
REMOVE = IMAGE_SERVICE + "RemoveImage"
# Server-streaming CRI methods (a generic handler cannot learn a method's shape from its name).
SERVER_STREAMING = frozenset(
    {
        IMAGE_SERVICE + "StreamImages",
        "/runtime.v1.RuntimeService/StreamPodSandboxes",
        "/runtime.v1.RuntimeService/StreamContainers",
        "/runtime.v1.RuntimeService/StreamContainerStats",
        "/runtime.v1.RuntimeService/StreamPodSandboxStats",
        "/runtime.v1.RuntimeService/StreamPodSandboxMetrics",
        "/runtime.v1.RuntimeService/GetContainerEvents",
    }
)
# Image size lookup after a pull: short; a slow answer only loses the byte count of one record.
SIZE_LOOKUP_TIMEOUT = 5.0
SIZE_CACHE_ENTRIES = 4096
MAX_ERROR_CHARS = 2000
# The status message forwarded to the kubelet travels as gRPC metadata (grpc-message). Past the
# kubelet's default 8 KiB soft limit grpc drops the whole status at random ("Stream removed"), so a
# longer upstream message reaches the caller cut to this many bytes, with a marker.
MAX_CALLER_ERROR_BYTES = 4096
# gRPC metadata by which a client of the proxy says what it is (``prefetch``); anything else is the kubelet.
ORIGIN_METADATA = "x-nodeagent-origin"
# Images pulled for pods whose "lead" (pull end -> the kubelet's first question) is still to be seen.
LEAD_ENTRIES = 1024
# A PullImage caller whose deadline passed is answered DEADLINE_EXCEEDED this long after it.
DEADLINE_GRACE = 1.0
# Requests from the kubelet are small (a PullImage with its sandbox config: kilobytes); grpc's own
# default receive limit. Responses are relayed as they come and are not limited here.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Answers of inspected calls (PullImage, ImageStatus) up to this size are kept to be decoded.
INSPECT_BYTES = 1024 * 1024
# Pulls the caller cancelled: this many per period are recorded one by one; the rest are summed up
# in one log line per period (not recorded, not counted in the metrics: a rapid-reset burst).
CANCELED_RECORDS_PER_PERIOD = 20
CANCELED_PERIOD = 10.0


def proxy_limits(max_connections: int) -> Limits:
    """The proxy's bounds (``h2grpc.Limits``) with the configurable ones (``cri.proxyMaxConnections``)."""
    return Limits(max_connections=max_connections, long_calls=frozenset({PULL}))


class CancelSummary:
    """Caps the pull records of cancelled pulls per period; counts the rest per registry and writes
    one summary line when the period ends."""

    def __init__(self, burst: int = CANCELED_RECORDS_PER_PERIOD, period: float = CANCELED_PERIOD) -> None:
        self.burst = burst
        self.period = period
        self._start = 0.0
        self._recorded = 0
        self._skipped: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def allow(self, registry: str) -> bool:
        now = time.monotonic()
        if now - self._start >= self.period:
            self.flush()
            self._start = now
        if self._recorded < self.burst:
            self._recorded += 1
            return True
        self._skipped[registry] = self._skipped.get(registry, 0) + 1
        if self._timer is None:
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(max(0.0, self._start + self.period - now), self.flush)
        return False

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._skipped:
            event(
                log,
                "pulls canceled by callers, not recorded one by one",
                level=30,
                count=sum(self._skipped.values()),
                registries=dict(sorted(self._skipped.items())[:20]),
                period_seconds=self.period,
            )
        self._skipped = {}
        self._recorded = 0


class ImageProxy:
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

    # --- inspected calls -----------------------------------------------------------------------
    @staticmethod
    def _read_pull(request: bytes) -> tuple[str, list[str], Key] | None:
        """The image, the credentials' secrets (for masking) and the single-flight key of a
        PullImageRequest; None if it does not decode (then it is forwarded untouched and the runtime
        answers)."""
        try:
            req = pb.PullImageRequest.FromString(request)
            return req.image.image, [s for s in auth_secrets(req.auth) if s], pull_key(req)
        except Exception:
            return None

    def _pull(self, call: ServerCall) -> None:
        read = self._read_pull(call.message)
        if read is None:
            self._passthrough(call)
            return

        def deliver(message: bytes | None, error: Any) -> None:
            if error is None:
                assert message is not None
                call.reply(message)
            else:
                call.fail(error.code(), for_caller(error.details()))

        origin = origin_of(call.metadata)
        if origin == ORIGIN_PREFETCH and self.slots is not None and self.flights.get(read[2]) is None:
            task = asyncio.get_running_loop().create_task(self._pull_in_slot(call, read, origin, deliver))
            self._slot_tasks.add(task)
            task.add_done_callback(self._slot_tasks.discard)

            def cancel() -> None:
                task.cancel()

            call.on_cancel = cancel
            return
        remaining = call.time_remaining()
        call.on_cancel = self._enter(call.message, call.metadata, read, origin, remaining, deliver)

    async def _pull_in_slot(
        self,
        call: ServerCall,
        read: tuple[str, list[str], Key],
        origin: str,
        deliver: Callable[[bytes | None, Any], None],
    ) -> None:
        """A prefetch pull that would start an upstream pull: first a slot of the daemon's pull limit
        (shared with pod pulls), within the caller's deadline; held until the pull answered."""
        assert self.slots is not None
        try:
            async with asyncio.timeout(call.time_remaining()):
                place = await self.slots.acquire((self.slots.ticket(), 0))
        except TimeoutError:
            self._note(PULL, grpc.StatusCode.DEADLINE_EXCEEDED)
            call.fail(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded (waiting for a pull slot)")
            return
        if self.flights.get(read[2]) is not None:  # started meanwhile (e.g. by the kubelet): join it
            place.release()
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def answer(message: bytes | None, error: Any) -> None:
            deliver(message, error)
            if not answered.done():
                answered.set_result(None)

        try:
            leave = self._enter(call.message, call.metadata, read, origin, call.time_remaining(), answer)
            try:
                await answered
            except asyncio.CancelledError:
                leave()
                raise
        finally:
            place.release()

    async def pull(
        self,
        request: bytes,
        *,
        origin: str,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> bytes:
        """A PullImage from inside nodeagent (pod pulls): through the same single-flight table, pull
        records and metrics as the kubelet's calls. Raises RpcError; cancelling the awaiting task
        leaves the flight (the upstream pull goes on while others wait for it)."""
        read = self._read_pull(request)
        if read is None:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "not a PullImageRequest")
        fut: asyncio.Future[tuple[bytes | None, Any]] = asyncio.get_running_loop().create_future()

        def deliver(message: bytes | None, error: Any) -> None:
            if not fut.done():
                fut.set_result((message, error))

        leave = self._enter(request, metadata, read, origin, None, deliver)
        try:
            message, error = await fut
        except asyncio.CancelledError:
            leave()
            raise
        if error is not None:
            raise RpcError(error.code(), error.details())
        assert message is not None
        return message

    def _enter(
        self,
        request: bytes,
        metadata: tuple[tuple[str, str], ...],
        read: tuple[str, list[str], Key],
        origin: str,
        remaining: float | None,
        deliver: Callable[[bytes | None, Any], None],
    ) -> Callable[[], None]:
        """Join the flight of an identical pull or start one; returns what to call when the caller
        goes away. The caller's own deadline is kept here (the upstream call has none: it ends when
        it answers or when its last caller left)."""
        image, secrets, key = read
        pull = _Pull(image, registry_of(image), time.time(), time.monotonic(), secrets, True, origin)
        self._pull_started()
        if origin == ORIGIN_KUBELET:
            self._observe_lead(image)
        flight = self.flights.get(key)
        if flight is None:
            flight = self.flights.begin(key)
            self._start_upstream(flight, request, metadata, pull.registry)
        else:
            pull.joined = True
            self.metrics.pull_joins.labels(origin=origin).inc()
        waiting = Waiting(self._deliverer(pull, deliver), (pull, deliver))
        flight.waiting.append(waiting)
        if remaining is not None:
            waiting.timer = asyncio.get_running_loop().call_later(
                remaining, self._leave, flight, waiting, "DEADLINE_EXCEEDED"
            )
        return functools.partial(self._leave, flight, waiting, "CANCELLED")

    def _deliverer(
        self, pull: _Pull, deliver: Callable[[bytes | None, Any], None]
    ) -> Callable[[bytes | None, Any], None]:
        def answer(message: bytes | None, error: Any) -> None:
            if error is None:
                assert message is not None
                deliver(message, None)
                self._note(PULL, grpc.StatusCode.OK)
                self._pull_ended(pull, "OK", "", message, pull.retry_reason)
            else:
                details = redact(error.details(), pull.secrets)
                deliver(None, RpcError(error.code(), details))
                self._note(PULL, error.code())
                self._pull_ended(pull, error.code().name, details, b"", pull.retry_reason)

        return answer

    def _start_upstream(
        self, flight: Flight, request: bytes, metadata: tuple[tuple[str, str], ...], registry: str
    ) -> None:
        assert self._channel is not None
        if self.pull_wrapper is None:  # the callback path: no task on the way
            pending = self._channel.start(
                PULL, request, lambda m, e: self._flight_done(flight, m, e, None), metadata=metadata
            )
            flight.cancel_upstream = pending.cancel
            return
        # mirror health may cancel and retry it: a coroutine
        task = asyncio.get_running_loop().create_task(self._wrapped(flight, request, metadata, registry))

        def cancel() -> None:
            task.cancel()

        flight.cancel_upstream = cancel

    async def _wrapped(
        self, flight: Flight, request: bytes, metadata: tuple[tuple[str, str], ...], registry: str
    ) -> None:
        assert self.pull_wrapper is not None and self._channel is not None
        channel = self._channel

        async def attempt() -> bytes:
            return await channel.unary(PULL, request, timeout=None, metadata=metadata)

        try:
            response, retry_reason = await self.pull_wrapper(registry, attempt)
        except RpcError as e:
            self._flight_done(flight, None, e, None)
        except Exception as e:  # a bug in the wrapper must not leave callers waiting forever
            log.exception("pull wrapper failed")
            self._flight_done(
                flight, None, RpcError(grpc.StatusCode.UNKNOWN, f"nodeagent: {type(e).__name__}"), None
            )
        else:
            self._flight_done(flight, response, None, retry_reason)

    def _flight_done(
        self, flight: Flight, message: bytes | None, error: RpcError | None, retry_reason: str | None
    ) -> None:
        for w in self.flights.end(flight):
            w.state[0].retry_reason = retry_reason
            w.deliver(message, error)

    def _leave(self, flight: Flight, waiting: Waiting, code: str) -> None:
        if not self.flights.leave(flight, waiting):
            return
        pull, deliver = waiting.state
        if code == "DEADLINE_EXCEEDED":
            # Recorded now; answered a moment later, so that a caller keeping its own deadline (every
            # gRPC client) reports it in its own words, as it would without the proxy in between.
            self._note(PULL, grpc.StatusCode.DEADLINE_EXCEEDED)
            self._pull_ended(pull, code, "Deadline Exceeded", b"", None)
            error = RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            asyncio.get_running_loop().call_later(DEADLINE_GRACE, deliver, None, error)
            return
        self._pull_ended(pull, "CANCELLED", "the caller cancelled the pull", b"", None)

    def _pull_started(self) -> None:
        self.metrics.pulls_in_flight.inc()
        self.in_flight += 1

    def _observe_lead(self, image: str) -> None:
        """The kubelet asks about an image nodeagent pulled for a pod: how long it had been there."""
        if not self._pod_ready:
            return
        t = self._pod_ready.pop(_lead_key(image), None)
        if t is not None:
            self.metrics.pod_pulls_lead.observe(max(0.0, time.monotonic() - t))

    def _abandoned(self, call: ServerCall) -> None:
        """A PullImage the caller reset before it was started upstream: recorded as canceled (within
        the cancelled-pull cap), nothing sent upstream."""
        if call.method != PULL:
            return
        read = self._read_pull(call.message)
        if read is None:
            return
        image = read[0]
        pull = _Pull(
            image,
            registry_of(image),
            time.time(),
            time.monotonic(),
            known=True,
            origin=origin_of(call.metadata),
        )
        if self._cancels.allow(pull.registry):
            self._spawn(self._record_pull(pull, 0.0, "CANCELLED", "the caller cancelled the pull", b"", None))

    def _pull_ended(
        self, pull: _Pull, code: str, details: str, response: bytes, retry_reason: str | None
    ) -> None:
        duration = time.monotonic() - pull.t0
        self.metrics.pulls_in_flight.dec()
        self.in_flight -= 1
        if code == "CANCELLED" and not self._cancels.allow(pull.registry):
            return  # a burst of cancelled pulls: summed up in one line per period
        if code == "OK" and pull.origin == ORIGIN_POD and not pull.joined:
            key = _lead_key(pull.image)
            self._pod_ready[key] = time.monotonic()
            self._pod_ready.move_to_end(key)
            while len(self._pod_ready) > LEAD_ENTRIES:
                self._pod_ready.popitem(last=False)
        self._spawn(self._record_pull(pull, duration, code, details, response, retry_reason))

    async def _record_pull(
        self,
        pull: _Pull,
        duration: float,
        code: str,
        details: str,
        response: bytes,
        retry_reason: str | None,
    ) -> None:
        image, registry = pull.image, pull.registry
        result = "success" if code == "OK" else classify(code, details)
        if len(details) > MAX_ERROR_CHARS:  # bounded log lines and status file
            details = details[: MAX_ERROR_CHARS - 15] + "... (truncated)"
        rec = PullRecord(
            image=image,
            registry=registry,
            result=result,
            duration=duration,
            started_at=pull.started_at,
            code=code,
            error=details,
            retry_reason=retry_reason,
            origin=pull.origin,
            joined=pull.joined,
        )
        if code == "OK":
            with contextlib.suppress(Exception):  # a malformed answer only loses the ref
                rec.image_ref = pb.PullImageResponse.FromString(response).image_ref
            rec.bytes = await self._image_size(rec.image_ref or image)
            self.last_used.touch(image)
            if rec.image_ref:
                self.last_used.touch(rec.image_ref)
        m = self.metrics
        reg = m.registry_label(registry)
        m.pulls.labels(registry=reg, result=rec.result, origin=rec.origin).inc()
        m.pull_duration.labels(registry=reg, result=rec.result, origin=rec.origin).observe(duration)
        if rec.ok:
            m.pull_bytes.labels(registry=reg).inc(rec.bytes)
        m.observe_last_pull(image_label(image), duration)
        fields: dict[str, Any] = {
            "image": image,
            "registry": registry,
            "origin": rec.origin,
            "result": rec.result,
            "duration_seconds": round(duration, 4),
            "bytes": rec.bytes,
            "throughput_bytes_per_second": round(rec.throughput, 1),
        }
        if rec.joined:
            fields["joined"] = True
        if rec.image_ref:
            fields["image_ref"] = rec.image_ref
        if not rec.ok:
            fields["code"] = code
            fields["error"] = details
        if retry_reason:
            fields["retried"] = True
            fields["retry_reason"] = retry_reason
        event(log, "pull", **fields)
        if self.on_pull is not None:
            try:
                self.on_pull(rec)
            except Exception:
                log.exception("pull listener failed")

    async def _image_size(self, ref: str) -> int:
        """The image's size from the upstream (ImageStatus); remembered per image id, whose content
        never changes, so pulling an image that is already there costs no second call."""
        size = self._sizes.get(ref)
        if size is not None:
            return size
        size = await self._lookup_size(ref)
        if size and is_image_id(ref):
            if len(self._sizes) >= SIZE_CACHE_ENTRIES:
                del self._sizes[next(iter(self._sizes))]  # the oldest
            self._sizes[ref] = size
        return size

    async def _lookup_size(self, ref: str) -> int:
        assert self._channel is not None
        request = pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)).SerializeToString()
        try:
            raw = await self._channel.unary(STATUS, request, timeout=SIZE_LOOKUP_TIMEOUT)
            resp = pb.ImageStatusResponse.FromString(raw)
        except Exception:
            return 0
        return int(resp.image.size) if resp.HasField("image") else 0

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


@dataclass(slots=True)
class _Pull:
    image: str
    registry: str
    started_at: float  # wall clock, for the record
    t0: float  # monotonic
    secrets: list[str] = field(default_factory=list)  # only to mask them in error text
    known: bool = False  # the request decoded: this pull is recorded
    origin: str = ORIGIN_KUBELET
    joined: bool = False  # shared the upstream pull another caller started
    retry_reason: str | None = None


def origin_of(metadata: tuple[tuple[str, str], ...]) -> str:
    """``kubelet`` unless the caller names another origin nodeagent knows (``prefetch``)."""
    for k, v in metadata:
        if k == ORIGIN_METADATA:
            return v if v in ORIGINS else ORIGIN_KUBELET
    return ORIGIN_KUBELET


def _lead_key(image: str) -> str:
    from nodeagent.imageref import normalize

    try:
        return normalize(image)
    except Exception:
        return image


def for_caller(details: str) -> str:
    """An upstream status message as the proxy forwards it: whole up to ``MAX_CALLER_ERROR_BYTES``."""
    raw = details.encode()
    if len(raw) <= MAX_CALLER_ERROR_BYTES:
        return details
    marker = " ... (truncated by nodeagent)"
    return raw[: MAX_CALLER_ERROR_BYTES - len(marker)].decode(errors="ignore") + marker
