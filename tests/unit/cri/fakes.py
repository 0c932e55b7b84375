"""The one FAKE container runtime of the unit tests (not containerd).

``FakeRuntime`` has two faces over one state and one script:

- in process, it is what nodeagent's code takes in place of ``CriClient`` / ``ContainerdImages``
  (the ``nodeagent.cri.runtime`` protocols: ``Runtime``, ``ImageService``, ``ImageRecords``):
  images, containers, pod sandboxes, containerd image records, what each image takes on disk;
  pulls that succeed (adding the image), fail by script, or take time;
- served by ``fake_runtime()`` (grpc.aio on a unix socket), it speaks the real runtime.v1 /
  containerd images wire protocol through our generated stubs, for the client and proxy tests.

Either way each call is recorded (``seen``: request, deadline, metadata) and follows the method's
``Plan`` (fail with a status N times, sleep, answer). Failures in process are ``CriError`` as
``CriClient`` raises them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import grpc.aio

from nodeagent.cri.client import CriError
from nodeagent.cri.containerd_images import PINNED_LABEL, PINNED_VALUE
from nodeagent.cri.gen import containerd_images_pb2 as cpb
from nodeagent.cri.gen import containerd_images_pb2_grpc as cpb_grpc
from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.cri.gen import cri_api_pb2_grpc as pb_grpc
from nodeagent.eviction.policy import FsUsage


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


class Pull(NamedTuple):
    image: str
    auth: Any  # runtime.v1 AuthConfig or a mapping of its fields, as the caller passed it
    timeout: float | None
    retry: bool
    metadata: Sequence[tuple[str, str]] | None
    sandbox_config: pb.PodSandboxConfig | None


@dataclass
class FakeRuntime:
    # the script and what happened
    plans: dict[str, Plan] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    # the runtime's state (in process)
    images: dict[str, pb.Image] = field(default_factory=dict)  # by image id
    containers: list[pb.Container] = field(default_factory=list)
    sandboxes: list[pb.PodSandbox] = field(default_factory=list)
    sandbox_images: dict[str, str] = field(default_factory=dict)  # sandbox id -> its (pause) image
    gone: set[str] = field(default_factory=set)  # sandboxes removed since they were listed: NOT_FOUND
    records: list[cpb.Image] = field(default_factory=list)  # containerd's image records (labels)
    imagefs_mountpoint: str = ""
    # pulls: ``missing`` images do not exist (NOT_FOUND); ``pull_errors`` answer successive pulls of
    # an image before one succeeds; each pull takes ``pull_delay`` seconds (or fails at its deadline)
    missing: set[str] = field(default_factory=set)
    private: dict[str, str] = field(default_factory=dict)  # image -> the one username it may be pulled as
    pull_errors: dict[str, list[tuple[grpc.StatusCode, str]]] = field(default_factory=dict)
    pull_delay: float = 0.0
    pulls: list[Pull] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)
    on_list_containers: Callable[[int], None] | None = None
    # the image filesystem: what each image takes on it, what else uses it, its size
    disk: dict[str, int] = field(default_factory=dict)  # image id -> bytes
    base: int = 0
    total: int = 0

    def calls(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method]

    # --- state ----------------------------------------------------------------------------------
    def add_image(
        self,
        image_id: str,
        size: int,
        *,
        tags: Sequence[str] = (),
        digests: Sequence[str] = (),
        pinned: bool = False,
        disk: int | None = None,
    ) -> pb.Image:
        img = pb.Image(id=image_id, repo_tags=tags, repo_digests=digests, size=size, pinned=pinned)
        self.images[image_id] = img
        if disk is not None:
            self.disk[image_id] = disk
        return img

    def find(self, ref: str) -> pb.Image | None:
        for img in self.images.values():
            if ref == img.id or ref in img.repo_tags or ref in img.repo_digests:
                return img
        return None

    def usage(self, path: Path) -> FsUsage:
        """The image filesystem (``EvictionLoop(measure=...)``)."""
        return FsUsage(self.base + sum(self.disk.values()), self.total)

    # --- in process: the nodeagent.cri.runtime protocols -----------------------------------------
    async def _script(
        self,
        method: str,
        request: Any = None,
        deadline: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        self.seen.append(Seen(method, request, deadline, dict(metadata or ())))
        plan = self.plans.get(method, Plan())
        if plan.fail_times > 0:
            plan.fail_times -= 1
            raise CriError("fake", method, plan.fail_code, plan.fail_details)
        if plan.delay:
            await asyncio.sleep(plan.delay)

    async def pull_image(
        self,
        image: str,
        auth: Any = None,
        sandbox_config: pb.PodSandboxConfig | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        retry: bool = True,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> str:
        await self._script("PullImage", image, timeout, metadata)
        self.pulls.append(Pull(image, auth, timeout, retry, metadata, sandbox_config))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.pull_delay:
                if timeout is not None and timeout < self.pull_delay:
                    await asyncio.sleep(timeout)
                    raise CriError(
                        "fake", "PullImage", grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
                    )
                await asyncio.sleep(self.pull_delay)
            if image in self.missing:
                raise CriError("fake", "PullImage", grpc.StatusCode.NOT_FOUND, f"{image}: not found")
            user = auth.get("username") if isinstance(auth, Mapping) else getattr(auth, "username", None)
            if image in self.private and user != self.private[image]:
                raise CriError(
                    "fake", "PullImage", grpc.StatusCode.UNKNOWN, f"pull {image}: 401 Unauthorized"
                )
            script = self.pull_errors.get(image)
            if script:
                code, details = script.pop(0)
                raise CriError("fake", "PullImage", code, details)
            n = len(self.images) + 1
            repo = image.rsplit(":", 1)[0]
            img = self.add_image(digest(1000 + n), 1000 * n, tags=[image], digests=[f"{repo}@{digest(n)}"])
            return img.id
        finally:
            self.active -= 1

    async def list_images(self, filter: str | None = None) -> list[pb.Image]:
        await self._script("ListImages", filter)
        return list(self.images.values())

    async def image_status(self, image: str, verbose: bool = False) -> pb.ImageStatusResponse:
        await self._script("ImageStatus", image)
        img = self.find(image)
        return pb.ImageStatusResponse(image=img) if img is not None else pb.ImageStatusResponse()

    async def remove_image(self, image: str) -> None:
        await self._script("RemoveImage", image)
        self.removed.append(image)
        img = self.find(image)
        if img is not None:
            del self.images[img.id]
            self.disk.pop(img.id, None)

    async def image_fs_info(self) -> pb.ImageFsInfoResponse:
        await self._script("ImageFsInfo")
        if not self.imagefs_mountpoint:
            return pb.ImageFsInfoResponse()
        fs = pb.FilesystemUsage(fs_id=pb.FilesystemIdentifier(mountpoint=self.imagefs_mountpoint))
        return pb.ImageFsInfoResponse(image_filesystems=[fs])

    async def list_containers(self, filter: pb.ContainerFilter | None = None) -> list[pb.Container]:
        await self._script("ListContainers", filter)
        if self.on_list_containers is not None:
            self.on_list_containers(len(self.calls("ListContainers")))
        return list(self.containers)

    async def list_pod_sandboxes(self, filter: pb.PodSandboxFilter | None = None) -> list[pb.PodSandbox]:
        await self._script("ListPodSandbox", filter)
        return list(self.sandboxes)

    async def pod_sandbox_status(
        self, pod_sandbox_id: str, verbose: bool = False
    ) -> pb.PodSandboxStatusResponse:
        await self._script("PodSandboxStatus", pod_sandbox_id)
        if pod_sandbox_id in self.gone:
            raise CriError(
                "fake", "PodSandboxStatus", grpc.StatusCode.NOT_FOUND, f"{pod_sandbox_id} not found"
            )
        image = self.sandbox_images.get(pod_sandbox_id)
        info = {"info": json.dumps({"image": image})} if image is not None else {}
        return pb.PodSandboxStatusResponse(info=info)

    async def close(self) -> None:
        pass

    # containerd's images API (ContainerdImages)
    async def list(self, filters: list[str] | None = None) -> list[cpb.Image]:
        await self._script("images.List", filters)
        return list(self.records)

    async def pin(self, name: str) -> cpb.Image:
        return await self.set_labels(name, {PINNED_LABEL: PINNED_VALUE})

    async def set_labels(self, name: str, labels: Mapping[str, str | None]) -> cpb.Image:
        await self._script("images.Update", name)
        for rec in self.records:
            if rec.name == name:
                for k, v in labels.items():
                    if v is None:
                        rec.labels.pop(k, None)
                    else:
                        rec.labels[k] = v
                if labels.get(PINNED_LABEL) == PINNED_VALUE:
                    self.pinned.append(name)
                return rec
        raise CriError("fake", "images.Update", grpc.StatusCode.NOT_FOUND, f"image {name!r} not found")

    # --- served over gRPC ------------------------------------------------------------------------

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


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


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
