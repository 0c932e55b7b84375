"""The CRI image-service proxy: kubelet -> nodeagent (unix socket) -> containerd (``cri.endpoint``).

Every RPC is forwarded as raw bytes: requests and responses are never re-serialized, so fields
this build does not know survive. A generic handler serves any method name, so RPCs we do not
inspect (and ones added to CRI later) pass through untouched. Three are inspected on the side:

- PullImage: timed and recorded (``PullRecord``) -> metrics, one JSON log line, pull listeners;
- ImageStatus: cache hit/miss counting and last-used times;
- RemoveImage: logged.

The caller's deadline becomes the upstream deadline; a cancelled caller cancels the upstream call;
the upstream's status code and message go back to the caller. Calls are not serialized: every
RPC runs in its own task. With the upstream down, calls fail with UNAVAILABLE at once (the
channel does not wait for readiness) and succeed again as soon as it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from nodeagent.cri.client import CHANNEL_OPTIONS, CriClient, auth_secrets, grpc_target, redact
from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.lastused import LastUsed
from nodeagent.log import event, get_logger
from nodeagent.metrics import Metrics
from nodeagent.proxy import sockets
from nodeagent.proxy.records import PullRecord, classify, image_label, registry_of

log = get_logger(__name__)

T = TypeVar("T")
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
# Metadata that belongs to this hop and must not be copied to the upstream call.
_HOP_METADATA = frozenset({"user-agent", "content-type", "te", "host", ":authority"})
# Image size lookup after a pull: short; a slow answer only loses the byte count of one record.
SIZE_LOOKUP_TIMEOUT = 5.0
MAX_ERROR_CHARS = 2000
# The status message forwarded to the kubelet travels as gRPC metadata (grpc-message). Past the
# kubelet's default 8 KiB soft limit grpc drops the whole status at random ("Stream removed"), so a
# longer upstream message reaches the caller cut to this many bytes, with a marker.
MAX_CALLER_ERROR_BYTES = 4096


def _forward_metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    md = context.invocation_metadata() or ()
    return tuple((k, v) for k, v in md if not k.startswith("grpc-") and k not in _HOP_METADATA)


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
    ) -> None:
        self.upstream = upstream
        self.socket_path = socket_path
        self.metrics = metrics
        self.last_used = last_used
        self.on_pull = on_pull
        self.on_upstream = on_upstream
        self.pull_wrapper = pull_wrapper
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._callables: dict[str, Any] = {}
        self._cri: CriClient | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.in_flight = 0
        self._bound = False  # only a socket we bound is ever removed

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(grpc_target(self.upstream), options=CHANNEL_OPTIONS)
        self._cri = CriClient(self.upstream, timeout=SIZE_LOOKUP_TIMEOUT)
        server = grpc.aio.server(
            options=(
                ("grpc.max_receive_message_length", CHANNEL_OPTIONS[0][1]),
                ("grpc.max_send_message_length", CHANNEL_OPTIONS[0][1]),
            )
        )
        server.add_generic_rpc_handlers((_GenericHandler(self),))
        sockets.prepare_socket_path(self.socket_path)
        with sockets.restrictive_umask():
            server.add_insecure_port("unix://" + str(self.socket_path))
            await server.start()
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
        if self._cri is not None:
            await self._cri.close()
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
    def _unary(self, method: str) -> Any:
        mc = self._callables.get(method)
        if mc is None:
            assert self._channel is not None
            mc = self._channel.unary_unary(method)  # no (de)serializers: bytes in, bytes out
            if len(self._callables) < 256:  # bounded even if a client invents method names
                self._callables[method] = mc
        return mc

    def _note(self, method: str, code: grpc.StatusCode) -> None:
        short = method.rsplit("/", 1)[-1]
        self.metrics.observe_proxy_request(short, code.name)
        if self.on_upstream is not None:
            if code == grpc.StatusCode.UNAVAILABLE:
                self.on_upstream(False, f"{method}: UNAVAILABLE")
            else:
                self.on_upstream(True, "")

    async def _forward(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """One upstream call with the caller's deadline and metadata; raises AioRpcError."""
        call = self._unary(method)(
            request, timeout=context.time_remaining(), metadata=_forward_metadata(context)
        )
        try:
            response: bytes = await call
        except asyncio.CancelledError:
            call.cancel()  # the caller went away: stop the upstream work too
            raise
        except grpc.aio.AioRpcError as e:
            self._note(method, e.code())
            raise
        self._note(method, grpc.StatusCode.OK)
        return response

    async def passthrough(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self._forward(method, request, context)
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), for_caller(e.details() or ""))
            raise  # unreachable: abort raises

    async def passthrough_stream(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> Any:
        assert self._channel is not None
        call = self._channel.unary_stream(method)(
            request, timeout=context.time_remaining(), metadata=_forward_metadata(context)
        )
        try:
            async for item in call:
                yield item
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as e:
            self._note(method, e.code())
            await context.abort(e.code(), for_caller(e.details() or ""))
        else:
            self._note(method, grpc.StatusCode.OK)

    # --- inspected calls -----------------------------------------------------------------------
    async def pull_image(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            req = pb.PullImageRequest.FromString(request)
            image = req.image.image
            secrets = [s for s in auth_secrets(req.auth) if s]
        except Exception:  # undecodable: forward untouched, let the runtime answer
            return await self.passthrough(PULL, request, context)
        del req  # the credentials are not kept
        registry = registry_of(image)
        started_at = time.time()
        t0 = time.monotonic()
        self.metrics.pulls_in_flight.inc()
        self.in_flight += 1
        code, details, response, retry_reason = "OK", "", b"", None
        try:

            async def call() -> bytes:
                return await self._forward(PULL, request, context)

            if self.pull_wrapper is not None:
                response, retry_reason = await self.pull_wrapper(registry, call)
            else:
                response = await call()
            return response
        except grpc.aio.AioRpcError as e:
            code, details = e.code().name, redact(e.details() or "", secrets)
            await context.abort(e.code(), for_caller(details))
            raise  # unreachable
        except asyncio.CancelledError:
            code, details = "CANCELLED", "the caller cancelled the pull"
            raise
        finally:
            duration = time.monotonic() - t0
            self.metrics.pulls_in_flight.dec()
            self.in_flight -= 1
            self._spawn(
                self._record_pull(
                    image, registry, started_at, duration, code, details, response, retry_reason
                )
            )

    async def _record_pull(
        self,
        image: str,
        registry: str,
        started_at: float,
        duration: float,
        code: str,
        details: str,
        response: bytes,
        retry_reason: str | None,
    ) -> None:
        result = "success" if code == "OK" else classify(code, details)
        if len(details) > MAX_ERROR_CHARS:  # bounded log lines and status file
            details = details[: MAX_ERROR_CHARS - 15] + "... (truncated)"
        rec = PullRecord(
            image=image,
            registry=registry,
            result=result,
            duration=duration,
            started_at=started_at,
            code=code,
            error=details,
            retry_reason=retry_reason,
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
        m.pulls.labels(registry=reg, result=rec.result).inc()
        m.pull_duration.labels(registry=reg, result=rec.result).observe(duration)
        if rec.ok:
            m.pull_bytes.labels(registry=reg).inc(rec.bytes)
        m.observe_last_pull(image_label(image), duration)
        fields: dict[str, Any] = {
            "image": image,
            "registry": registry,
            "result": rec.result,
            "duration_seconds": round(duration, 4),
            "bytes": rec.bytes,
            "throughput_bytes_per_second": round(rec.throughput, 1),
        }
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
        assert self._cri is not None
        try:
            resp = await self._cri.image_status(ref)
        except Exception:
            return 0
        return int(resp.image.size) if resp.HasField("image") else 0

    async def image_status(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        response = await self.passthrough(STATUS, request, context)
        try:
            image = pb.ImageStatusRequest.FromString(request).image.image
            status = pb.ImageStatusResponse.FromString(response)
        except Exception:
            return response
        hit = status.HasField("image")
        self.metrics.cache_requests.labels(result="hit" if hit else "miss").inc()
        if hit:
            self.last_used.touch(image)
            if status.image.id:
                self.last_used.touch(status.image.id)
        return response

    async def remove_image(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            image = pb.RemoveImageRequest.FromString(request).image.image
        except Exception:
            image = "?"
        t0 = time.monotonic()
        try:
            response = await self._forward(REMOVE, request, context)
        except grpc.aio.AioRpcError as e:
            event(log, "remove", image=image, result=e.code().name, error=e.details() or "")
            await context.abort(e.code(), for_caller(e.details() or ""))
            raise
        event(log, "remove", image=image, result="OK", duration_seconds=round(time.monotonic() - t0, 4))
        return response


class _GenericHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Serves every method name: inspected ones get their handler, others pass through."""

    def __init__(self, proxy: ImageProxy) -> None:
        self.proxy = proxy
        self._cache: dict[str, Any] = {}

    def service(self, details: Any) -> Any:
        method: str = details.method
        handler = self._cache.get(method)
        if handler is not None:
            return handler
        p = self.proxy
        if method in SERVER_STREAMING:

            async def stream(request: bytes, context: grpc.aio.ServicerContext) -> Any:
                async for item in p.passthrough_stream(method, request, context):
                    yield item

            handler = grpc.unary_stream_rpc_method_handler(stream)
        else:
            inspected = {PULL: p.pull_image, STATUS: p.image_status, REMOVE: p.remove_image}.get(method)
            if inspected is not None:
                handler = grpc.unary_unary_rpc_method_handler(inspected)
            else:

                async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                    return await p.passthrough(method, request, context)

                handler = grpc.unary_unary_rpc_method_handler(unary)
        if len(self._cache) < 256:
            self._cache[method] = handler
        return handler


def for_caller(details: str) -> str:
    """An upstream status message as the proxy forwards it: whole up to ``MAX_CALLER_ERROR_BYTES``."""
    raw = details.encode()
    if len(raw) <= MAX_CALLER_ERROR_BYTES:
        return details
    marker = " ... (truncated by nodeagent)"
    return raw[: MAX_CALLER_ERROR_BYTES - len(marker)].decode(errors="ignore") + marker
