import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from nodeagent.eviction import usage
from nodeagent.eviction.usage import UsageError
from nodeagent.util.paths import Paths


def test_measure_counts_root_reserved_blocks_as_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = SimpleNamespace(f_blocks=1000, f_frsize=4096, f_bavail=300, f_bfree=350)
    monkeypatch.setattr(os, "statvfs", lambda p: fake)
    u = usage.measure(tmp_path)
    assert u.total_bytes == 1000 * 4096
    assert u.used_bytes == 700 * 4096  # capacity - available, as the kubelet counts it
    assert u.ratio == pytest.approx(0.7)


def test_measure_real_directory(tmp_path: Path) -> None:
    u = usage.measure(tmp_path)
    st = os.statvfs(tmp_path)
    assert u.total_bytes == st.f_blocks * st.f_frsize
    assert 0 <= u.used_bytes <= u.total_bytes


def test_measure_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"^{tmp_path}/nope: statvfs failed"):
        usage.measure(tmp_path / "nope")


def test_configured_path_wins_and_goes_under_root(tmp_path: Path) -> None:
    p = Paths(tmp_path)
    assert usage.imagefs_path(p, "/var/lib/containerd", "/x") == tmp_path / "var/lib/containerd"


def test_runtime_mountpoint_is_the_runtimes_view_not_under_root(tmp_path: Path) -> None:
    # the runtime does not run under --root: what it reports is used as reported (like cri.endpoint)
    assert usage.imagefs_path(Paths(tmp_path), "", "/var/lib/containerd/snap") == Path(
        "/var/lib/containerd/snap"
    )


@pytest.mark.parametrize(
    ("configured", "mountpoint", "message"),
    [
        ("", "", "image filesystem unknown"),
        ("relative/dir", "", "eviction.imagefsPath: relative/dir: host paths must be absolute"),
        ("", "/var/../etc", "ImageFsInfo fs_id.mountpoint: /var/../etc: '..' is not allowed"),
    ],
)
def test_bad_paths(tmp_path: Path, configured: str, mountpoint: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace(".", r"\.")):
        usage.imagefs_path(Paths(tmp_path), configured, mountpoint)


def test_mountpoint_from_imagefs_info() -> None:
    fs = SimpleNamespace(
        fs_id=SimpleNamespace(mountpoint="/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs")
    )
    resp = SimpleNamespace(image_filesystems=[SimpleNamespace(fs_id=SimpleNamespace(mountpoint="")), fs])
    assert usage.mountpoint_from_imagefs_info(resp).endswith("overlayfs")
    assert usage.mountpoint_from_imagefs_info(SimpleNamespace(image_filesystems=[])) == ""


def test_soci_snapshotter_measures_socis_root_unless_imagefs_path_is_set() -> None:
    from nodeagent.config.loader import load_text

    head = "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\n"
    assert usage.configured_path(load_text(head)) == ""  # the runtime's ImageFsInfo decides
    soci = load_text(head + "containerd:\n  snapshotter: soci\n  soci:\n    root: /data/soci\n")
    assert usage.configured_path(soci) == "/data/soci"
    both = load_text(
        head + "containerd:\n  snapshotter: soci\neviction:\n  imagefsPath: /var/lib/containerd\n"
    )
    assert usage.configured_path(both) == "/var/lib/containerd"
