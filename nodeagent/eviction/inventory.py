"""What the runtime holds, read through CRI and turned into the policy's plain data.

Images from ListImages; their users from ListContainers and ListPodSandbox. A pod sandbox does not
name its image in ListPodSandbox, so the sandbox (pause) image is read once per sandbox from
PodSandboxStatus(verbose) (containerd reports it as ``info.image``) and remembered while the sandbox
exists. Any container or sandbox, running or not, keeps its image.
"""

from __future__ import annotations

import json

from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.cri.runtime import Runtime
from nodeagent.eviction.policy import Container, Image

CONTAINER_RUNNING = 1  # runtime.v1 ContainerState
SANDBOX_READY = 0  # runtime.v1 PodSandboxState


def image_of(msg: pb.Image) -> Image:
    return Image(
        id=msg.id,
        repo_tags=tuple(msg.repo_tags),
        repo_digests=tuple(msg.repo_digests),
        size=msg.size,
        pinned=msg.pinned,
    )


def container_of(msg: pb.Container) -> Container:
    return Container(
        id=msg.id,
        image=msg.image.image if msg.HasField("image") else "",
        image_ref=msg.image_ref,
        image_id=msg.image_id,
        running=msg.state == CONTAINER_RUNNING,
        kind="container",
    )


def sandbox_image_from_status(resp: pb.PodSandboxStatusResponse) -> str:
    """The image a sandbox was created from, from PodSandboxStatus(verbose=True); "" if not reported."""
    raw = resp.info.get("info")
    if not raw:
        return ""
    try:
        info = json.loads(raw)
    except ValueError:
        return ""
    image = info.get("image") if isinstance(info, dict) else None
    return image if isinstance(image, str) else ""


class Inventory:
    """Reads images and their users through the runtime (``CriClient``); caches sandbox images by
    sandbox id."""

    def __init__(self, cri: Runtime) -> None:
        self.cri = cri
        self._sandbox_images: dict[str, str] = {}

    async def images(self) -> list[Image]:
        return [image_of(m) for m in await self.cri.list_images()]

    async def users(self) -> list[Container]:
        """Every container and pod sandbox, with the image each was created from."""
        containers = [container_of(m) for m in await self.cri.list_containers()]
        sandboxes = await self.cri.list_pod_sandboxes()
        seen: dict[str, str] = {}
        for sb in sandboxes:
            sid = sb.id
            image = self._sandbox_images.get(sid)
            if image is None:
                try:
                    resp = await self.cri.pod_sandbox_status(sid, verbose=True)
                except Exception as e:
                    if _is_not_found(e):
                        continue  # removed since ListPodSandbox: it uses nothing any more
                    raise  # unknown sandbox image: better no eviction than losing it
                image = sandbox_image_from_status(resp)
            seen[sid] = image
            if image:
                containers.append(
                    Container(sid, image=image, running=sb.state == SANDBOX_READY, kind="sandbox")
                )
        self._sandbox_images = seen  # forget removed sandboxes
        return containers


def _is_not_found(e: BaseException) -> bool:
    code = getattr(e, "code", None)
    return getattr(code, "name", None) == "NOT_FOUND"
