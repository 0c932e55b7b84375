"""Bake step: pinning through the FAKE runtime's containerd image records (tests/unit/cri/fakes.py:
ContainerdImages' calls in process), the manifest, the snapshotter warnings."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nodeagent.config.model import Config, ContainerdConfig, PrefetchImage
from nodeagent.cri.gen import containerd_images_pb2 as cpb
from nodeagent.cri.gen import containerd_types_pb2 as tpb
from nodeagent.eviction import baked
from nodeagent.images.bake import pin_and_record, sandbox_image, snapshotter_warnings, with_sandbox_image
from nodeagent.images.prefetch import ImageOutcome
from nodeagent.util.paths import Paths
from tests.unit.cri.fakes import FakeRuntime


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def images_api(records: list[cpb.Image]) -> FakeRuntime:
    return FakeRuntime(records=records)


def record(name: str, target: str) -> cpb.Image:
    return cpb.Image(name=name, target=tpb.Descriptor(digest=target))


def test_pins_every_record_of_pinned_images_and_writes_the_manifest(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    api = images_api(
        [
            record("r.io/a:1", digest(1)),
            record("r.io/a@" + digest(1), digest(1)),
            record("sha256:" + "c" * 64, digest(1)),
            record("r.io/b:1", digest(2)),
        ]
    )
    outcomes = [
        ImageOutcome("r.io/a:1", pin=True, result="pulled", digest=digest(1), size=10),
        ImageOutcome("r.io/b:1", pin=False, result="present", digest=digest(2), size=20),
        ImageOutcome("r.io/c:1", pin=True, result="not_found"),
    ]
    result = asyncio.run(pin_and_record(outcomes, api, paths))
    assert result.ok and result.changed
    assert sorted(api.pinned) == sorted(["r.io/a:1", "r.io/a@" + digest(1), "sha256:" + "c" * 64])
    assert baked.load(paths.baked_manifest) == (
        baked.BakedImage("r.io/a:1", digest(1), 10, True),
        baked.BakedImage("r.io/b:1", digest(2), 20, False),
    )
    again = asyncio.run(pin_and_record(outcomes, api, paths))
    assert not again.changed  # same content: the file is not rewritten


def test_an_image_without_a_record_is_an_error_not_a_silent_success(tmp_path: Path) -> None:
    api = images_api([])
    outcomes = [ImageOutcome("r.io/a:1", pin=True, result="pulled", digest=digest(1), size=1)]
    result = asyncio.run(pin_and_record(outcomes, api, Paths(tmp_path)))
    assert not result.ok
    assert result.images == [baked.BakedImage("r.io/a:1", digest(1), 1, False)]


def test_warns_when_soci_is_present_but_cri_unpacks_with_overlayfs(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert snapshotter_warnings(Config(), paths) == []
    unit = paths.host("/etc/systemd/system/soci-snapshotter.service")
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\n")
    (w,) = snapshotter_warnings(Config(), paths)
    assert "snapshotter 'overlayfs'" in w and "soci-snapshotter.service" in w
    paths.containerd_config.parent.mkdir(parents=True)
    paths.containerd_config.write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "soci"\n'
    )
    assert snapshotter_warnings(Config(), paths) == []


def test_warns_when_the_config_wants_soci_but_cri_unpacks_with_overlayfs(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    soci = Config(containerd=ContainerdConfig(snapshotter="soci"))
    (w,) = snapshotter_warnings(soci, paths)
    assert "containerd.snapshotter: soci" in w and "snapshotter 'overlayfs'" in w and "nodeagent apply" in w
    paths.containerd_config.parent.mkdir(parents=True)
    paths.containerd_config.write_text(
        'version = 3\n[plugins."io.containerd.cri.v1.images"]\n  snapshotter = "soci"\n'
    )
    assert snapshotter_warnings(soci, paths) == []  # applied: the bake pins what nodes will use


def test_unreadable_containerd_config_is_a_warning(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    paths.containerd_config.parent.mkdir(parents=True)
    paths.containerd_config.write_text("version = [\n")
    (w,) = snapshotter_warnings(Config(), paths)
    assert w.startswith(f"{paths.containerd_config}: cannot read containerd's config")


def _containerd_config(root: Path, text: str) -> None:
    (root / "etc/containerd").mkdir(parents=True, exist_ok=True)
    (root / "etc/containerd/config.toml").write_text(text)


PUBLIC_PAUSE = PrefetchImage("public.ecr.aws/eks-distro/kubernetes/pause:3.10", pin=True, required=True)
BUSYBOX = PrefetchImage("busybox:1.36")


def test_sandbox_image_from_config_v3_v2_and_al2023_default(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert sandbox_image(paths) == (None, "")
    (tmp_path / "etc/eks/nodeadm.d").mkdir(parents=True)
    assert sandbox_image(paths) == ("localhost/kubernetes/pause", "nodeadm's containerd template on AL2023")
    _containerd_config(
        tmp_path, 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\nsandbox_image = "r/pause:1"\n'
    )
    assert sandbox_image(paths)[0] == "r/pause:1"
    v3 = (Path(__file__).parents[1] / "data/containerd-v3-commented.toml").read_text()
    _containerd_config(tmp_path, v3)
    assert sandbox_image(paths) == (
        "localhost/kubernetes/pause",
        str(tmp_path / "etc/containerd/config.toml"),
    )


def test_bake_adds_the_real_sandbox_image_and_flags_an_unused_pause(tmp_path: Path) -> None:
    (tmp_path / "etc/eks/nodeadm.d").mkdir(parents=True)
    images, warnings = with_sandbox_image([PUBLIC_PAUSE, BUSYBOX], Paths(tmp_path))
    assert images == (
        PUBLIC_PAUSE,
        BUSYBOX,
        PrefetchImage("localhost/kubernetes/pause", pin=True, required=False),
    )
    (w,) = warnings
    assert w.startswith(
        "images.prefetch has public.ecr.aws/eks-distro/kubernetes/pause:3.10, but pod sandboxes"
    )
    listed = [PrefetchImage("localhost/kubernetes/pause:latest", pin=True, required=True)]
    assert with_sandbox_image(listed, Paths(tmp_path)) == (tuple(listed), [])  # same image, normalized


def test_no_known_sandbox_image_leaves_the_list_alone(tmp_path: Path) -> None:
    assert with_sandbox_image([PUBLIC_PAUSE], Paths(tmp_path)) == ((PUBLIC_PAUSE,), [])
