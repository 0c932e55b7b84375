"""``nodeagent prefetch --bake`` (AMI build): pin images and write the baked-images manifest.

After the pulls, each image marked ``pin: true`` is pinned: every containerd image record (namespace
``k8s.io``) whose target is the image's manifest digest gets the label
``io.cri-containerd.pinned=pinned`` through containerd's own images API (CRI has no call for labels;
the CRI plugin reports such images as ``pinned`` and the kubelet's image GC skips them). Then
``Paths.baked_manifest`` lists every image present after the bake (reference, digest, size, pinned),
written atomically by the one manifest writer (``nodeagent.eviction.baked``); eviction never
removes those images.

``snapshotter_warnings`` compares the snapshotter CRI uses now (the build instance's containerd
config) with signs of another one at run time (SOCI): images unpacked for overlayfs are invisible to
a CRI that uses the soci snapshotter, and would be pulled again on every node.

``with_sandbox_image`` makes the bake record the node's real sandbox (pause) image: the one
containerd's config names (``pinned_images.sandbox`` in version 3, ``sandbox_image`` in version 2),
or on AL2023 nodeadm's ``localhost/kubernetes/pause``, which the AMI build imports from
``/etc/eks/pause.tar`` and which no registry serves. It is added to the bake's list (pinned, not
required) when the config does not list it, and a pause image in the list that is not the sandbox
image is reported: no pod sandbox would ever use it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nodeagent.config.model import Config, PrefetchImage
from nodeagent.eviction import baked
from nodeagent.images.prefetch import ImageOutcome
from nodeagent.util import imageref
from nodeagent.util.paths import Paths

if TYPE_CHECKING:
    from nodeagent.cri.gen import containerd_images_pb2 as cpb
    from nodeagent.cri.runtime import ImageRecords

DEFAULT_SNAPSHOTTER = "overlayfs"
# nodeadm's sandbox image on AL2023 AMIs (amazon-eks-ami: cached at build time from /etc/eks/pause.tar)
AL2023_SANDBOX_IMAGE = "localhost/kubernetes/pause"
CONTAINERD_SOCKETS = ("/run/containerd/containerd.sock", "/var/run/containerd/containerd.sock")


@dataclass
class BakeResult:
    images: list[baked.BakedImage] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    changed: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors


async def pin_and_record(
    outcomes: Sequence[ImageOutcome], images_api: ImageRecords, paths: Paths
) -> BakeResult:
    """Pin ``pin: true`` images (``images_api``: nodeagent.cri.containerd_images.ContainerdImages) and
    write the manifest of every image that is present."""
    from nodeagent.cri.client import CriError

    result = BakeResult()
    present = [o for o in outcomes if o.ok]
    records: list[cpb.Image] = []
    if any(o.pin for o in present):
        try:
            records = await images_api.list()
        except CriError as e:
            result.errors.append(f"cannot list containerd images to pin them: {e}")
    for o in present:
        if not o.digest.startswith("sha256:"):
            result.errors.append(f"{o.image}: no manifest digest known; not recorded as baked")
            continue
        pinned = False
        if o.pin and records:
            names = sorted({r.name for r in records if r.target.digest == o.digest})
            if not names:
                result.errors.append(f"{o.image}: no containerd image record for {o.digest}; not pinned")
            try:
                for name in names:
                    await images_api.pin(name)
                pinned = bool(names)
            except CriError as e:
                result.errors.append(f"{o.image}: pinning failed: {e}")
        elif o.pin:
            result.errors.append(f"{o.image}: not pinned")
        result.images.append(baked.BakedImage(o.image, o.digest, o.size, pinned))
    result.changed = baked.write(paths.baked_manifest, result.images)
    return result


def _cri_snapshotter(doc: dict[str, Any]) -> str:
    plugins = doc.get("plugins", {})
    if not isinstance(plugins, dict):
        return DEFAULT_SNAPSHOTTER
    version = doc.get("version", 1)
    if isinstance(version, int) and version >= 3:
        section = plugins.get("io.containerd.cri.v1.images", {})
        value = section.get("snapshotter") if isinstance(section, dict) else None
    else:
        cri = plugins.get("io.containerd.grpc.v1.cri", plugins.get("cri", {}))
        ctrd = cri.get("containerd", {}) if isinstance(cri, dict) else {}
        value = ctrd.get("snapshotter") if isinstance(ctrd, dict) else None
    return value if isinstance(value, str) and value else DEFAULT_SNAPSHOTTER


def _config_sandbox_image(doc: dict[str, Any]) -> str | None:
    plugins = doc.get("plugins", {})
    if not isinstance(plugins, dict):
        return None
    version = doc.get("version", 1)
    if isinstance(version, int) and version >= 3:
        images = plugins.get("io.containerd.cri.v1.images", {})
        pinned = images.get("pinned_images", {}) if isinstance(images, dict) else {}
        value = pinned.get("sandbox") if isinstance(pinned, dict) else None
    else:
        cri = plugins.get("io.containerd.grpc.v1.cri", {})
        value = cri.get("sandbox_image") if isinstance(cri, dict) else None
    return value if isinstance(value, str) and value else None


def sandbox_image(paths: Paths) -> tuple[str | None, str]:
    """(the sandbox image pods on this node use, where that was read); (None, "") when unknown."""
    path = paths.containerd_config
    try:
        image = _config_sandbox_image(tomllib.loads(path.read_text()))
        if image:
            return image, str(path)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        pass
    if any(b.exists() for b in paths.nodeadm_binaries) or paths.nodeadm_dropin_dir.is_dir():
        return AL2023_SANDBOX_IMAGE, "nodeadm's containerd template on AL2023"
    return None, ""


def _is_pause(ref: str) -> bool:
    return imageref.repository(ref).rsplit("/", 1)[-1] == "pause"


def with_sandbox_image(
    prefetch: Sequence[PrefetchImage], paths: Paths
) -> tuple[tuple[PrefetchImage, ...], list[str]]:
    """The bake's image list with the node's sandbox image in it, and warnings about pause images
    that no pod sandbox would use."""
    image, where = sandbox_image(paths)
    if image is None:
        return tuple(prefetch), []
    want = imageref.normalize(image)
    warnings = [
        f"images.prefetch has {p.image}, but pod sandboxes on this node use {image} ({where}): "
        "the baked copy would never be used"
        for p in prefetch
        if _is_pause(p.image) and imageref.normalize(p.image) != want
    ]
    if any(imageref.normalize(p.image) == want for p in prefetch):
        return tuple(prefetch), warnings
    return (*prefetch, PrefetchImage(image, pin=True, required=False)), warnings


def snapshotter_warnings(config: Config, paths: Paths) -> list[str]:
    """Warnings when the images baked now would not be the ones CRI uses at run time."""
    warnings: list[str] = []
    path = paths.containerd_config
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        doc = {}
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        return [f"{path}: cannot read containerd's config ({type(e).__name__}); snapshotter not checked"]
    now = _cri_snapshotter(doc)
    soci_signs = [str(u) for u in paths.soci_units if u.exists()]
    proxies = doc.get("proxy_plugins", {})
    if isinstance(proxies, dict) and any("soci" in str(k) for k in proxies):
        soci_signs.append(f"{path} [proxy_plugins]")
    wanted = config.containerd.snapshotter
    if wanted == "soci" and now != "soci":
        warnings.append(
            f"the nodeagent config sets containerd.snapshotter: soci, but CRI unpacks these images with "
            f"snapshotter {now!r} now ({path}): run `nodeagent apply` before the bake, or nodes pull "
            "the baked images again"
        )
    elif soci_signs and now != "soci":
        warnings.append(
            f"CRI unpacks these images with snapshotter {now!r}, but SOCI is present "
            f"({', '.join(soci_signs)}): if nodes run CRI with the 'soci' snapshotter they will not see "
            "the baked images and pull them again; bake with the snapshotter the nodes use"
        )
    endpoint = config.cri.endpoint.removeprefix("unix://")
    if endpoint not in CONTAINERD_SOCKETS and paths.root == Paths().root:
        warnings.append(
            f"cri.endpoint {config.cri.endpoint} is not containerd's own socket: images are pulled "
            "through that service's snapshotter; make sure it is the one CRI uses at run time"
        )
    return warnings
