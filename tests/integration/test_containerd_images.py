"""ContainerdImages (containerd's images API, for pin labels) against a real containerd.

What callers rely on (prefetch --bake pins through it): the CRI-pulled image is listed in the
k8s.io namespace under its name, labels are set and removed one key at a time without touching the
CRI plugin's own labels, a missing name is None, and another namespace does not see k8s.io images.
"""

from __future__ import annotations

import asyncio

import pytest

from nodeagent.cri.client import CriClient
from nodeagent.cri.containerd_images import PINNED_LABEL, ContainerdImages
from tests.sandbox import Containerd, Registry, Sandbox


@pytest.mark.containerd_smoke
def test_list_get_pin_unpin_on_real_containerd(
    sandbox: Sandbox, registry: Registry, containerd: Containerd
) -> None:
    img = sandbox.image(registry, "apps/pinme", layers=1, layer_size=64 << 10)

    async def body() -> None:
        async with CriClient(containerd.endpoint) as cri:
            await cri.pull_image(img.reference)
        async with ContainerdImages(containerd.endpoint) as ci:
            names = {i.name for i in await ci.list()}
            assert img.reference in names
            rec = await ci.get(img.reference)
            assert rec is not None and rec.target.digest == img.manifest_digest
            cri_labels = dict(rec.labels)
            pinned = await ci.pin(img.reference)
            assert pinned.labels[PINNED_LABEL] == "pinned"
            got = await ci.get(img.reference)
            assert got is not None and got.labels[PINNED_LABEL] == "pinned"
            assert {k: v for k, v in got.labels.items() if k != PINNED_LABEL} == cri_labels
            await ci.set_labels(img.reference, {"example.com/a": "1"})
            await ci.set_labels(img.reference, {PINNED_LABEL: None})  # unpin (nodeagent never does)
            got = await ci.get(img.reference)
            assert got is not None and PINNED_LABEL not in got.labels
            assert got.labels["example.com/a"] == "1"
            assert await ci.get(f"{registry.host}/apps/never:1") is None
            filtered = await ci.list([f'name=="{img.reference}"'])
            assert [i.name for i in filtered] == [img.reference]
        async with ContainerdImages(containerd.endpoint, namespace="default") as other:
            assert img.reference not in {i.name for i in await other.list()}

    asyncio.run(body())
