"""`nodeagent prefetch --bake` against a real containerd: pins through containerd's images API, the
CRI view of it, the baked-images manifest, and the eviction policy's refusal to remove baked images."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nodeagent.cri.client import CriClient
from nodeagent.eviction import baked, policy
from nodeagent.eviction.inventory import Inventory
from tests.integration.test_prefetch import run_prefetch, write_node_root
from tests.sandbox import Containerd, PushedImage, Registry, Sandbox


def ctr_images(address: str) -> dict[str, set[str]]:
    """``ctr -n k8s.io images ls``: REF -> the labels (LABELS column)."""
    out = subprocess.run(
        ["ctr", "--address", address, "-n", "k8s.io", "images", "ls"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {}
    for line in out.splitlines()[1:]:
        cols = line.split()
        rows[cols[0]] = set() if cols[-1] == "-" else set(cols[-1].split(","))
    return rows


async def _cri_images(endpoint: str) -> tuple[str, dict[str, bool]]:
    async with CriClient(endpoint) as cri:
        version = (await cri.version()).runtime_version
        return version, {t: img.pinned for img in await cri.list_images() for t in img.repo_tags}


async def _plan(endpoint: str, manifest: tuple[baked.BakedImage, ...]) -> policy.Plan:
    async with CriClient(endpoint) as cri:
        inv = Inventory(cri)
        images, users = await inv.images(), await inv.users()
    return policy.plan(
        images,
        users,
        usage=policy.FsUsage(used_bytes=100, total_bytes=100),
        thresholds=policy.Thresholds(high_percent=50, low_percent=0, min_unused_age=0),
        now=time.time(),
        last_used={},
        baked=manifest,
    )


def run_prefetch_one(tmp_path: Path, node: Containerd, image: str) -> subprocess.CompletedProcess[str]:
    root = tmp_path / "other-root"
    write_node_root(root, node, [{"image": image}])
    return run_prefetch(root)


@pytest.mark.containerd_smoke
def test_bake_pins_writes_the_manifest_and_eviction_keeps_baked_images(
    sandbox: Sandbox, registry: Registry, image_factory: Callable[..., PushedImage], tmp_path: Path
) -> None:
    pinned, unpinned, extra = (image_factory(layers=1, layer_size=128 << 10) for _ in range(3))
    node = sandbox.containerd([registry])
    root = tmp_path / "root"
    write_node_root(
        root,
        node,
        [{"image": pinned.reference, "pin": True, "required": True}, {"image": unpinned.reference}],
    )
    r = run_prefetch(root, "--bake")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bake: 2 image(s)" in r.stdout and "(1 pinned)" in r.stdout

    # containerd's own view: every record of the pinned image carries the label, the other none.
    rows = ctr_images(str(node.socket))
    label = "io.cri-containerd.pinned=pinned"
    assert label in rows[pinned.reference]
    assert label in rows[f"{pinned.reference.rsplit(':', 1)[0]}@{pinned.manifest_digest}"]
    assert label in rows[pinned.image_id]
    assert not [ref for ref, labels in rows.items() if label in labels and unpinned.image_id in (ref,)]
    assert label not in rows[unpinned.reference]

    # The manifest, written by the one writer eviction reads.
    manifest = baked.load(root / "etc/nodeagent/baked-images.json")
    assert manifest == (
        baked.BakedImage(pinned.reference, pinned.manifest_digest, manifest[0].size, True),
        baked.BakedImage(unpinned.reference, unpinned.manifest_digest, manifest[1].size, False),
    )
    assert all(b.size > 0 for b in manifest)
    assert (root / "etc/nodeagent/baked-images.json").stat().st_mode & 0o777 == 0o644

    # CRI's view (Image.pinned, the field the kubelet's image GC reads). containerd >= 1.7 derives it
    # from exactly this label (pkg/cri/store/image); 1.6 (Debian 12's 1.6.20) never sets the field.
    version, by_tag = asyncio.run(_cri_images(node.endpoint))
    assert by_tag[unpinned.reference] is False
    major, minor = (int(x) for x in re.findall(r"\d+", version)[:2])
    if (major, minor) >= (1, 7):
        assert by_tag[pinned.reference] is True
    else:
        assert by_tag[pinned.reference] is False, "containerd 1.6 reports pinned now: assert True above"

    # The eviction policy, on the runtime's real image list with the disk "full": the extra image
    # (not baked) goes, both baked images stay, whether or not CRI reports them pinned.
    pull = run_prefetch_one(tmp_path, node, extra.reference)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    p = asyncio.run(_plan(node.endpoint, manifest))
    verdicts = {d.image.repo_tags[0]: (d.verdict, d.reason) for d in p.decisions}
    assert verdicts[extra.reference] == (policy.REMOVE, policy.LRU)
    assert verdicts[unpinned.reference] == (policy.KEEP, policy.BAKED)
    assert verdicts[pinned.reference][0] == policy.KEEP
    assert verdicts[pinned.reference][1] in (policy.BAKED, policy.PINNED)


def test_bake_records_the_sandbox_image_containerds_config_names(
    sandbox: Sandbox, registry: Registry, image_factory: Callable[..., PushedImage], tmp_path: Path
) -> None:
    """The node's real pause image is baked even when images.prefetch does not list it, and a pause
    image in the list that no sandbox uses is reported."""
    real_pause = image_factory(layers=1, layer_size=64 << 10, repository="node/pause", tag="3.10")
    other_pause = image_factory(
        layers=1, layer_size=64 << 10, repository="elsewhere/pause", tag="3.10", seed=3
    )
    node = sandbox.containerd([registry], sandbox_image=real_pause.reference)
    root = tmp_path / "root"
    write_node_root(root, node, [{"image": other_pause.reference, "pin": True, "required": True}])
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(node.config_path.read_text())  # names the sandbox image

    r = run_prefetch(root, "--bake")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"images.prefetch has {other_pause.reference}, but pod sandboxes on this node use" in r.stderr
    manifest = {b.reference: b for b in baked.load(root / "etc/nodeagent/baked-images.json")}
    assert (
        manifest[real_pause.reference].pinned
        and manifest[real_pause.reference].digest == real_pause.manifest_digest
    )
    assert other_pause.reference in manifest  # listed: still baked, as asked
    assert "io.cri-containerd.pinned=pinned" in ctr_images(str(node.socket))[real_pause.reference]
