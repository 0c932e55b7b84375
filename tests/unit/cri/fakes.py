"""An in-process FAKE CRI runtime (grpc.aio server on a unix socket) for unit tests.

It speaks the real runtime.v1 / containerd images wire protocol through our generated stubs, but
is not containerd: each RPC records the request, its deadline and metadata, then follows a
scripted plan (fail with a status N times, sleep, answer).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from nodeagent.cri.gen import containerd_images_pb2 as cpb
from nodeagent.cri.gen import containerd_images_pb2_grpc as cpb_grpc
from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.cri.gen import cri_api_pb2_grpc as pb_grpc


@dataclass
class Seen:
    method: str
    request: Any
    time_remaining: float | None
    metadata: dict[str, str]


@dataclass
class Plan:
    """Per-method script: fail ``fail_times`` times with ``fail_code``/``fail_details``, sleep
    ``delay`` seconds, then answer ``response``."""

    fail_times: int = 0
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    fail_details: str = "runtime is restarting"
    delay: float = 0.0
    response: Any = None


@dataclass
class FakeRuntime:
    plans: dict[str, Plan] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    active: int = 0
    max_active: int = 0

    def calls(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method]

    async def handle(self, method: str, request: Any, context: grpc.aio.ServicerContext, default: Any) -> Any:
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        self.seen.append(Seen(method, request, context.time_remaining(), md))
        plan = self.plans.get(method, Plan())
        if plan.fail_times > 0:
            plan.fail_times -= 1
            await context.abort(plan.fail_code, plan.fail_details)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if plan.delay:
                await asyncio.sleep(plan.delay)
        except asyncio.CancelledError:
            self.cancelled.append(method)
            raise
        finally:
            self.active -= 1
        return plan.response if plan.response is not None else default


def _image_service(rt: FakeRuntime) -> Any:
    class ImageService(pb_grpc.ImageServiceServicer):  # type: ignore[misc]
        async def ListImages(self, request: Any, context: Any) -> Any:
            return await rt.handle("ListImages", request, context, pb.ListImagesResponse())

        async def ImageStatus(self, request: Any, context: Any) -> Any:
            return await rt.handle("ImageStatus", request, context, pb.ImageStatusResponse())

        async def PullImage(self, request: Any, context: Any) -> Any:
            default = pb.PullImageResponse(image_ref="sha256:" + "a" * 64)
            return await rt.handle("PullImage", request, context, default)

        async def RemoveImage(self, request: Any, context: Any) -> Any:
            return await rt.handle("RemoveImage", request, context, pb.RemoveImageResponse())

        async def ImageFsInfo(self, request: Any, context: Any) -> Any:
            return await rt.handle("ImageFsInfo", request, context, pb.ImageFsInfoResponse())

    return ImageService()


def _runtime_service(rt: FakeRuntime) -> Any:
    class RuntimeService(pb_grpc.RuntimeServiceServicer):  # type: ignore[misc]
        async def Version(self, request: Any, context: Any) -> Any:
            default = pb.VersionResponse(version="0.1.0", runtime_name="fake", runtime_api_version="v1")
            return await rt.handle("Version", request, context, default)

        async def ListContainers(self, request: Any, context: Any) -> Any:
            return await rt.handle("ListContainers", request, context, pb.ListContainersResponse())

        async def ListPodSandbox(self, request: Any, context: Any) -> Any:
            return await rt.handle("ListPodSandbox", request, context, pb.ListPodSandboxResponse())

        async def RunPodSandbox(self, request: Any, context: Any) -> Any:
            default = pb.RunPodSandboxResponse(pod_sandbox_id="sb1")
            return await rt.handle("RunPodSandbox", request, context, default)

        async def CreateContainer(self, request: Any, context: Any) -> Any:
            default = pb.CreateContainerResponse(container_id="c1")
            return await rt.handle("CreateContainer", request, context, default)

    return RuntimeService()


def _containerd_images(rt: FakeRuntime) -> Any:
    class Images(cpb_grpc.ImagesServicer):  # type: ignore[misc]
        async def Get(self, request: Any, context: Any) -> Any:
            return await rt.handle("images.Get", request, context, cpb.GetImageResponse())

        async def List(self, request: Any, context: Any) -> Any:
            return await rt.handle("images.List", request, context, cpb.ListImagesResponse())

        async def Update(self, request: Any, context: Any) -> Any:
            default = cpb.UpdateImageResponse(image=request.image)
            return await rt.handle("images.Update", request, context, default)

    return Images()


ECHO_METHOD = "/nodeagent.test.Echo/Echo"


class _Echo(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A method no CRI version has: proves the proxy forwards names it does not know."""

    def __init__(self, rt: FakeRuntime) -> None:
        self.rt = rt

    def service(self, details: Any) -> Any:
        if details.method != ECHO_METHOD:
            return None

        async def echo(request: bytes, context: Any) -> bytes:
            self.rt.seen.append(Seen("Echo", request, context.time_remaining(), {}))
            return b"echo:" + request

        return grpc.unary_unary_rpc_method_handler(echo)


@asynccontextmanager
async def fake_runtime(sock: str | None = None) -> AsyncIterator[tuple[FakeRuntime, str]]:
    """Start the fake on a fresh unix socket (or ``sock``); yields (runtime, endpoint)."""
    d = tempfile.mkdtemp(prefix="na-cri-")  # short path: unix socket paths are limited to 107 bytes
    sock = sock or os.path.join(d, "cri.sock")
    rt = FakeRuntime()
    server = grpc.aio.server()
    pb_grpc.add_ImageServiceServicer_to_server(_image_service(rt), server)
    pb_grpc.add_RuntimeServiceServicer_to_server(_runtime_service(rt), server)
    cpb_grpc.add_ImagesServicer_to_server(_containerd_images(rt), server)
    server.add_generic_rpc_handlers((_Echo(rt),))
    server.add_insecure_port("unix://" + sock)
    await server.start()
    try:
        yield rt, "unix://" + sock
    finally:
        await server.stop(None)
        shutil.rmtree(d, ignore_errors=True)


class FakeClock:
    """Sleeps advance a fake monotonic clock instead of waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s
