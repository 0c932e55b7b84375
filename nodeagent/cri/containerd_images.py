"""containerd's image metadata service (containerd.services.images.v1.Images), for image labels.

CRI has no call to set labels; pinning an image (the CRI plugin reports ``pinned`` for images
labelled ``io.cri-containerd.pinned=pinned``) goes through containerd's own API on the same
socket. The namespace is chosen per call with the ``containerd-namespace`` gRPC metadata header;
the CRI plugin keeps kubelet images in ``k8s.io``. Same deadlines, retry and errors as CriClient.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

import grpc
import grpc.aio

from nodeagent.cri.client import CriError, GrpcCaller, RetryPolicy
from nodeagent.cri.gen import containerd_images_pb2 as pb
from nodeagent.cri.gen import containerd_images_pb2_grpc as pb_grpc

CRI_NAMESPACE = "k8s.io"
PINNED_LABEL = "io.cri-containerd.pinned"
PINNED_VALUE = "pinned"
NAMESPACE_HEADER = "containerd-namespace"


class ContainerdImages(GrpcCaller):
    def __init__(
        self,
        endpoint: str,
        namespace: str = CRI_NAMESPACE,
        timeout: float = 10.0,
        *,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(endpoint, timeout, retry, sleep=sleep)
        self.namespace = namespace
        self._stub: pb_grpc.ImagesAsyncStub | None = None

    def _make_stubs(self, channel: grpc.aio.Channel) -> None:
        self._stub = pb_grpc.ImagesStub(channel)

    async def __aenter__(self) -> ContainerdImages:
        self.channel  # noqa: B018
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def stub(self) -> pb_grpc.ImagesAsyncStub:
        self.channel  # noqa: B018
        assert self._stub is not None
        return self._stub

    @property
    def _md(self) -> tuple[tuple[str, str], ...]:
        return ((NAMESPACE_HEADER, self.namespace),)

    async def list(self, filters: list[str] | None = None) -> list[pb.Image]:
        """Images in the namespace (containerd.services.images.v1.Image messages)."""
        resp: pb.ListImagesResponse = await self._call(
            "images.List",
            self.stub.List,
            pb.ListImagesRequest(filters=filters or []),
            deadline=self.timeout,
            metadata=self._md,
        )
        return list(resp.images)

    async def get(self, name: str) -> pb.Image | None:
        """The image record named ``name``, or None if there is none."""
        try:
            resp: pb.GetImageResponse = await self._call(
                "images.Get",
                self.stub.Get,
                pb.GetImageRequest(name=name),
                deadline=self.timeout,
                metadata=self._md,
            )
        except CriError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return resp.image

    async def set_labels(self, name: str, labels: Mapping[str, str | None]) -> pb.Image:
        """Set (value) or remove (None) individual labels of image ``name``; other labels stay.
        Returns the updated image record.

        The request carries the image's current target although the update mask names only
        labels: containerd 2.x converts the whole message before applying the mask and crashes
        (nil pointer dereference, the daemon exits) on an image without a target."""
        for key in labels:
            if not key or "\n" in key:
                raise ValueError(f"invalid label key {key!r}")
        current = await self.get(name)
        if current is None:
            raise CriError(
                self.endpoint, "images.Update", grpc.StatusCode.NOT_FOUND, f"image {name!r} not found"
            )
        image = pb.Image(name=name)
        if current.HasField("target"):
            image.target.CopyFrom(current.target)
        paths = []
        for key, value in sorted(labels.items()):
            paths.append(f"labels.{key}")
            if value is not None:
                image.labels[key] = value
        req = pb.UpdateImageRequest(image=image)
        req.update_mask.paths.extend(paths)
        resp: pb.UpdateImageResponse = await self._call(
            "images.Update", self.stub.Update, req, deadline=self.timeout, metadata=self._md
        )
        return resp.image

    async def pin(self, name: str) -> pb.Image:
        return await self.set_labels(name, {PINNED_LABEL: PINNED_VALUE})
