"""What nodeagent needs from the container runtime, as ``Protocol``s (typed with the generated
protobuf messages of ``nodeagent.cri.gen.cri_api_pb2``).

``CriClient`` (runtime.v1 over gRPC) provides all of them; tests use one FAKE runtime
(tests/unit/cri/fakes.py) in its place. Each user names the smallest one it needs:

- ``ImageService``: prefetch, pod pulls and the daemon's cache statistics (image calls only);
- ``Runtime``: eviction (images, what uses them: containers and pod sandboxes, and removal);
- ``ImageRecords``: bake, which pins images through containerd's own images API
  (``ContainerdImages``: CRI has no call for labels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from nodeagent.cri.gen import containerd_images_pb2 as cpb
from nodeagent.cri.gen import cri_api_pb2 as pb

# runtime.v1 AuthConfig, or a mapping of its fields (``Auth.cri_fields()``)
AuthArg = pb.AuthConfig | Mapping[str, str] | None


class ImageService(Protocol):
    """runtime.v1 ImageService calls, as ``CriClient`` makes them."""

    async def pull_image(
        self,
        image: str,
        auth: AuthArg = None,
        sandbox_config: pb.PodSandboxConfig | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  (the gRPC deadline)
        retry: bool = True,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> str: ...

    async def list_images(self, filter: str | None = None) -> list[pb.Image]: ...

    async def image_status(self, image: str, verbose: bool = False) -> pb.ImageStatusResponse: ...

    async def remove_image(self, image: str) -> None: ...

    async def image_fs_info(self) -> pb.ImageFsInfoResponse: ...


class Runtime(ImageService, Protocol):
    """The image calls and what eviction reads about the images' users; ``close()`` ends the
    connection."""

    async def list_containers(self, filter: pb.ContainerFilter | None = None) -> list[pb.Container]: ...

    async def list_pod_sandboxes(self, filter: pb.PodSandboxFilter | None = None) -> list[pb.PodSandbox]: ...

    async def pod_sandbox_status(
        self, pod_sandbox_id: str, verbose: bool = False
    ) -> pb.PodSandboxStatusResponse: ...

    async def close(self) -> None: ...


class ImageRecords(Protocol):
    """containerd's image records (containerd.services.images.v1), as ``ContainerdImages`` reads
    and pins them."""

    async def list(self, filters: list[str] | None = None) -> list[cpb.Image]: ...

    async def pin(self, name: str) -> cpb.Image: ...
