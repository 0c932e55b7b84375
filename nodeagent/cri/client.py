"""Async CRI client (runtime.v1 over gRPC, grpc.aio).

    async with CriClient("unix:///run/containerd/containerd.sock") as cri:
        ref = await cri.pull_image("registry.example/app:1.2")
        images = await cri.list_images()

Every call carries a deadline: ``timeout`` for short calls, ``pull_timeout`` for PullImage (None:
no deadline, the caller cancels). A call that fails with UNAVAILABLE (runtime restarting, socket
not there yet) is retried with bounded exponential backoff and full jitter, at most
``retry.attempts`` times and never past ``retry.max_elapsed`` seconds; every other status is final.
A call that creates something is made with ``retry=False`` (UNAVAILABLE can arrive after the
runtime acted). Failures raise ``CriError`` naming the endpoint, the call and the
gRPC status; the request (which may carry registry credentials) is never part of the message, and
any credential the runtime echoes back is masked.

``CriClient`` provides the ``nodeagent.cri.runtime`` protocols (what eviction, prefetch, pod pulls
and the daemon need); it has only the calls nodeagent makes.

The channel is created on first use inside the running event loop (grpc.aio channels are bound
to the loop that made them) and closed by ``close()`` / leaving ``async with``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
import grpc.aio

from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.cri.gen import cri_api_pb2_grpc as pb_grpc
from nodeagent.cri.runtime import AuthArg

R = TypeVar("R")

# ListImages on a node with thousands of images exceeds gRPC's 4 MiB default (the kubelet allows 16).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_PULL_TIMEOUT = 30 * 60.0

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Reconnect quickly after the runtime restarts instead of grpc's default backoff of up to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Accept long error statuses from the runtime (grpc's default soft limit of 8 KiB for metadata
    # drops a call's status at random between the soft and the hard limit).
    ("grpc.max_metadata_size", 64 * 1024),
    ("grpc.absolute_max_metadata_size", 64 * 1024),
)


def grpc_target(endpoint: str) -> str:
    """``unix:///path``, ``unix:path`` and bare ``/path`` all mean a unix socket; anything else is
    passed to grpc as is (``host:port``)."""
    if endpoint.startswith("/"):
        return "unix://" + endpoint
    return endpoint


class CriError(Exception):
    """A CRI (or containerd API) call failed. ``code`` is the grpc.StatusCode (None: not gRPC)."""

    def __init__(
        self, endpoint: str, call: str, code: grpc.StatusCode | None, details: str, attempts: int = 1
    ) -> None:
        self.endpoint = endpoint
        self.call = call
        self.code = code
        self.details = details
        self.attempts = attempts
        code_name = code.name if code is not None else "ERROR"
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{endpoint}: {call}: {code_name}: {details}{tries}")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries on UNAVAILABLE: ``attempts`` calls in total, sleeping a random time in
    ``[0, min(max_backoff, base * 2**n)]`` between them, never starting an attempt after
    ``max_elapsed`` seconds from the first."""

    attempts: int = 4
    base: float = 0.1
    max_backoff: float = 2.0
    max_elapsed: float = 10.0

    def backoff(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        return rng() * min(self.max_backoff, self.base * (2.0**retry))


NO_RETRY = RetryPolicy(attempts=1)


def redact(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s and len(s) >= 3:
            text = text.replace(s, "***")
    return text


def auth_secrets(auth: pb.AuthConfig | None) -> list[str]:
    """The secret values of a runtime.v1.AuthConfig (to mask them in error text)."""
    if auth is None:
        return []
    return [auth.password, auth.auth, auth.identity_token, auth.registry_token]


class GrpcCaller:
    """Channel lifecycle, deadlines, retry and error translation shared by the CRI and containerd
    clients."""

    def __init__(
        self,
        endpoint: str,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.endpoint = endpoint
        self.timeout = timeout
        self.retry = retry or RetryPolicy(max_elapsed=max(timeout, 1.0))
        self._sleep = sleep
        self._clock = clock
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _make_stubs(self, channel: grpc.aio.Channel) -> None:
        raise NotImplementedError

    @property
    def channel(self) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            self._channel = grpc.aio.insecure_channel(grpc_target(self.endpoint), options=CHANNEL_OPTIONS)
            self._loop = loop
            self._make_stubs(self._channel)
        return self._channel

    async def close(self) -> None:
        ch, self._channel = self._channel, None
        if ch is not None:
            await ch.close()

    async def _call(
        self,
        name: str,
        method: Callable[..., Awaitable[R]],
        request: object,
        *,
        deadline: float | None,
        retry: bool = True,
        metadata: Sequence[tuple[str, str]] | None = None,
        secrets: Iterable[str] = (),
    ) -> R:
        """Invoke ``method(request)`` with a deadline; retry UNAVAILABLE per the policy."""
        self.channel  # noqa: B018  (make sure the channel and stubs exist on this loop)
        policy = self.retry if retry else NO_RETRY
        start = self._clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(request, timeout=deadline, metadata=metadata)
            except grpc.aio.AioRpcError as e:
                code = e.code()
                details = redact(e.details() or "", secrets)
                if code == grpc.StatusCode.UNAVAILABLE and attempt < policy.attempts:
                    delay = policy.backoff(attempt - 1)
                    if self._clock() - start + delay <= policy.max_elapsed:
                        await self._sleep(delay)
                        continue
                raise CriError(self.endpoint, name, code, details, attempt) from None


class CriClient(GrpcCaller):
    """runtime.v1 ImageService + RuntimeService on one channel. Methods return the generated
    protobuf messages from ``nodeagent.cri.gen.cri_api_pb2``."""

    def __init__(
        self,
        endpoint: str,
        timeout: float = 10.0,
        *,
        pull_timeout: float | None = DEFAULT_PULL_TIMEOUT,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(endpoint, timeout, retry, sleep=sleep, clock=clock)
        self.pull_timeout = pull_timeout
        self._images: pb_grpc.ImageServiceAsyncStub | None = None
        self._runtime: pb_grpc.RuntimeServiceAsyncStub | None = None

    def _make_stubs(self, channel: grpc.aio.Channel) -> None:
        self._images = pb_grpc.ImageServiceStub(channel)
        self._runtime = pb_grpc.RuntimeServiceStub(channel)

    async def __aenter__(self) -> CriClient:
        self.channel  # noqa: B018
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def images(self) -> pb_grpc.ImageServiceAsyncStub:
        self.channel  # noqa: B018
        assert self._images is not None
        return self._images

    @property
    def runtime(self) -> pb_grpc.RuntimeServiceAsyncStub:
        self.channel  # noqa: B018
        assert self._runtime is not None
        return self._runtime

    # --- RuntimeService --------------------------------------------------------------------------
    async def version(self) -> pb.VersionResponse:
        return await self._call(
            "Version", self.runtime.Version, pb.VersionRequest(version="v1"), deadline=self.timeout
        )

    async def list_containers(self, filter: pb.ContainerFilter | None = None) -> list[pb.Container]:
        resp: pb.ListContainersResponse = await self._call(
            "ListContainers",
            self.runtime.ListContainers,
            pb.ListContainersRequest(filter=filter),
            deadline=self.timeout,
        )
        return list(resp.containers)

    async def list_pod_sandboxes(self, filter: pb.PodSandboxFilter | None = None) -> list[pb.PodSandbox]:
        resp: pb.ListPodSandboxResponse = await self._call(
            "ListPodSandbox",
            self.runtime.ListPodSandbox,
            pb.ListPodSandboxRequest(filter=filter),
            deadline=self.timeout,
        )
        return list(resp.items)

    async def pod_sandbox_status(
        self, pod_sandbox_id: str, verbose: bool = False
    ) -> pb.PodSandboxStatusResponse:
        return await self._call(
            "PodSandboxStatus",
            self.runtime.PodSandboxStatus,
            pb.PodSandboxStatusRequest(pod_sandbox_id=pod_sandbox_id, verbose=verbose),
            deadline=self.timeout,
        )

    # --- ImageService ----------------------------------------------------------------------------
    async def pull_image(
        self,
        image: str,
        auth: AuthArg = None,
        sandbox_config: pb.PodSandboxConfig | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  (the gRPC deadline, not an asyncio timeout)
        retry: bool = True,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> str:
        """Pull ``image``; returns the image ref (id). ``auth`` is a runtime.v1.AuthConfig or a
        mapping of its fields. ``timeout`` None uses ``pull_timeout``. ``retry=False`` for a caller
        with its own retry loop (prefetch), so that the two do not multiply. ``metadata``: gRPC
        metadata (prefetch names itself to nodeagent's proxy: ``x-nodeagent-origin``)."""
        config = pb.AuthConfig(**auth) if isinstance(auth, Mapping) else auth
        req = pb.PullImageRequest(image=pb.ImageSpec(image=image), auth=config, sandbox_config=sandbox_config)
        resp: pb.PullImageResponse = await self._call(
            "PullImage",
            self.images.PullImage,
            req,
            deadline=timeout if timeout is not None else self.pull_timeout,
            retry=retry,
            metadata=metadata,
            secrets=auth_secrets(config),
        )
        return str(resp.image_ref)

    async def list_images(self, filter: str | None = None) -> list[pb.Image]:
        req = pb.ListImagesRequest(
            filter=pb.ImageFilter(image=pb.ImageSpec(image=filter)) if filter else None
        )
        resp: pb.ListImagesResponse = await self._call(
            "ListImages", self.images.ListImages, req, deadline=self.timeout
        )
        return list(resp.images)

    async def image_status(self, image: str, verbose: bool = False) -> pb.ImageStatusResponse:
        """The ImageStatusResponse; ``.HasField("image")`` is False when the image is absent."""
        return await self._call(
            "ImageStatus",
            self.images.ImageStatus,
            pb.ImageStatusRequest(image=pb.ImageSpec(image=image), verbose=verbose),
            deadline=self.timeout,
        )

    async def remove_image(self, image: str) -> None:
        """Remove by id, tag or digest; removing an absent image is not an error (CRI contract)."""
        await self._call(
            "RemoveImage",
            self.images.RemoveImage,
            pb.RemoveImageRequest(image=pb.ImageSpec(image=image)),
            deadline=max(self.timeout, 60.0),
        )

    async def image_fs_info(self) -> pb.ImageFsInfoResponse:
        return await self._call(
            "ImageFsInfo", self.images.ImageFsInfo, pb.ImageFsInfoRequest(), deadline=self.timeout
        )
