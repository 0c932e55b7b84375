"""PullImage through the proxy: single flight, each caller's deadline and cancel, the pod-pull lead.
Part of ``ImageProxy`` (nodeagent.proxy.server)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from nodeagent.cri.client import auth_secrets, redact
from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.proxy.h2grpc import RpcError, ServerCall
from nodeagent.proxy.methods import PULL, for_caller
from nodeagent.proxy.pullrecords import CancelSummary, PullRecording
from nodeagent.proxy.records import (
    ORIGIN_KUBELET,
    ORIGIN_POD,
    ORIGIN_PREFETCH,
    ORIGINS,
    registry_of,
)
from nodeagent.proxy.singleflight import Flight, Flights, Key, Waiting, pull_key
from nodeagent.proxy.slots import PullSlots
from nodeagent.util.log import get_logger

log = get_logger("nodeagent.proxy.server")

PullWrapper = Callable[[str, Callable[[], Awaitable[bytes]]], Awaitable[tuple[bytes, str | None]]]

# gRPC metadata by which a client of the proxy says what it is (``prefetch``); anything else is the kubelet.
ORIGIN_METADATA = "x-nodeagent-origin"
# Images pulled for pods whose "lead" (pull end -> the kubelet's first question) is still to be seen.
LEAD_ENTRIES = 1024
# A PullImage caller whose deadline passed is answered DEADLINE_EXCEEDED this long after it.
DEADLINE_GRACE = 1.0


class PullPath(PullRecording):
    """The PullImage handling of ``ImageProxy`` (its records: ``PullRecording``)."""

    if TYPE_CHECKING:  # provided by ImageProxy (nodeagent.proxy.server)
        flights: Flights
        in_flight: int
        pull_wrapper: PullWrapper | None
        slots: PullSlots | None
        _slot_tasks: set[asyncio.Task[None]]
        _cancels: CancelSummary
        _pod_ready: OrderedDict[str, float]

        def _note(self, method: str, code: grpc.StatusCode) -> None: ...
        def _passthrough(self, call: ServerCall) -> None: ...
        def _spawn(self, coro: Awaitable[None]) -> None: ...

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
    from nodeagent.util.imageref import normalize

    try:
        return normalize(image)
    except Exception:
        return image
