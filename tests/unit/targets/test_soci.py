"""containerd.snapshotter: soci: sizing, validation, soci-snapshotter's config file and containerd's
settings on both flavors (the programs themselves read them in tests/integration/test_soci.py)."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

import pytest
import yaml

from nodeagent.apply import tuning
from nodeagent.apply.facts import gather
from nodeagent.apply.runner import ApplyReport, run_apply
from nodeagent.apply.targets import is_owned, nodeadm, pullpath, soci
from nodeagent.config import ConfigError, load_text
from nodeagent.config.model import Config
from nodeagent.util.paths import Paths
from tests.unit.targets.helpers import DATA, HEADER, config, facts

SOCI = """
containerd:
  restartCommand: []
  snapshotter: soci
  soci:
    restartCommand: []
"""


def _soci_tuning(cfg: Config, **kw: object) -> tuning.SociTuning:
    t = tuning.resolve(cfg, facts(Path("/nonexistent"), **kw)).soci
    assert t is not None
    return t


def _values(t: tuning.SociTuning) -> tuple[int, int, int, int, int]:
    return (
        t.max_concurrent_downloads_per_image.value,
        t.max_concurrent_downloads.value,
        t.chunk_size_mib.value,
        t.max_concurrent_unpacks_per_image.value,
        t.max_concurrent_unpacks.value,
    )


@pytest.mark.parametrize(
    ("kw", "want"),
    [
        # the benchmark's node: 2 vCPUs, 4 GiB, NIC speed unknown (veth): 20 connections per image,
        # x 2 parallel pulls; unpacks bound by the CPUs
        (dict(cpus=2, memory_bytes=4 * 2**30, nic_speed_mbps=None), (20, 40, 16, 2, 2)),
        # t3.medium-like (2 vCPUs, 4 GiB, up to 5 Gb/s): nodeadm's FastImagePull refuses it; twice
        # the 10 connections that fill 5 Gb/s, also the node total
        (dict(cpus=2, memory_bytes=4 * 2**30, nic_speed_mbps=5_000), (20, 20, 16, 2, 2)),
        # 1 vCPU, 1 GiB, 1 Gb/s: the floor of 4 connections, also the node total (twice the 2 streams
        # that fill 1 Gb/s), 8 MiB chunks, one unpack
        (dict(cpus=1, memory_bytes=2**30, nic_speed_mbps=1_000), (4, 4, 8, 1, 1)),
        # 64 vCPUs, 256 GiB, 50 Gb/s: 20 per image (nodeadm's value), 64 in flight at most, 12 unpacks
        (dict(cpus=64, memory_bytes=256 * 2**30, nic_speed_mbps=50_000), (20, 64, 16, 12, 12)),
        # 8 vCPUs, 32 GiB, 10 Gb/s: 20 connections fill 10 Gb/s; 8 pulls x 20 capped at 40 (twice 20)
        (dict(cpus=8, memory_bytes=32 * 2**30, nic_speed_mbps=10_000), (20, 40, 16, 8, 8)),
    ],
)
def test_auto_sizing_for_any_node_size(kw: dict, want: tuple[int, ...]) -> None:  # type: ignore[type-arg]
    t = _soci_tuning(config(SOCI), **kw)
    assert _values(t) == want
    assert all(c.auto and c.reason for c in t.choices())


def test_imagefs_throughput_bounds_unpacks_and_every_value_says_why() -> None:
    cfg = config(SOCI + "    imagefsThroughputMBps: 250\n")
    t = _soci_tuning(cfg, cpus=16, memory_bytes=64 * 2**30, nic_speed_mbps=25_000)
    assert t.max_concurrent_unpacks_per_image.value == 3  # 250 MB/s / 100 MB/s per unpack
    assert "imagefs 250 MB/s -> 3" in t.max_concurrent_unpacks_per_image.reason
    lines = [str(c) for c in tuning.resolve(cfg, facts(Path("/x"), cpus=16)).choices()]
    assert any(s.startswith("containerd.soci.chunkSizeMiB = 16 (auto: ") for s in lines)


def test_explicit_values_win_and_other_modes_are_not_sized() -> None:
    cfg = config(SOCI + "    chunkSizeMiB: 4\n    maxConcurrentDownloadsPerImage: 7\n")
    t = _soci_tuning(cfg)
    assert (t.chunk_size_mib.value, t.max_concurrent_downloads_per_image.value) == (4, 7)
    assert str(t.chunk_size_mib) == "containerd.soci.chunkSizeMiB = 4 (from config)"
    assert tuning.resolve(config(SOCI + "    pullMode: lazy\n"), facts(Path("/x"))).soci is None
    assert tuning.resolve(config(), facts(Path("/x"))).soci is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("  soci:\n    chunkSizeMiB: 0\n", "containerd.soci.chunkSizeMiB: must be between 1 and 1024, got 0"),
        ("  soci:\n    pullMode: eager\n", "containerd.soci.pullMode: must be one of"),
        ("  snapshotter: stargz\n", "containerd.snapshotter: must be one of"),
        (
            "  soci:\n    maxConcurrentDownloadsPerImage: 0\n",
            "containerd.soci.maxConcurrentDownloadsPerImage",
        ),
    ],
)
def test_invalid_settings_are_path_qualified(body: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_text(HEADER + "containerd:\n" + body)
    assert any(problem in str(p) for p in e.value.problems), e.value.problems


# --- apply, generic ---------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _node(root: Path, *, containerd: str = "2.2.9", installed: bool = True, nodeadm_: bool = False) -> None:
    (root / "etc/containerd").mkdir(parents=True, exist_ok=True)
    (root / "etc/containerd/config.toml").write_text(
        (DATA / "containerd-1.6-config-default.toml").read_text()
    )
    (root / "etc/eks").mkdir(parents=True, exist_ok=True)
    (root / "etc/eks/containerd-version.txt").write_text(containerd + "\n")
    if installed:
        (root / "usr/local/bin").mkdir(parents=True, exist_ok=True)
        (root / "usr/local/bin/soci-snapshotter-grpc").write_text("")
    if nodeadm_:
        (root / "usr/bin").mkdir(parents=True, exist_ok=True)
        (root / "usr/bin/nodeadm").write_text("")


def _apply(cfg: Config, root: Path, flavor: str = "generic", **kw: object) -> ApplyReport:
    f = gather(Paths(root), cfg.containerd.hosts_dir)
    if kw:
        f = type(f)(**{**f.__dict__, **kw})
    return run_apply(cfg, f, flavor=flavor, out=io.StringIO(), restarter=lambda c: None)


def test_generic_apply_writes_soci_config_and_containerd_proxy_plugin(tmp_path: Path) -> None:
    _node(tmp_path)
    report = _apply(config(SOCI), tmp_path, cpus=2, memory_bytes=4 * 2**30, nic_speed_mbps=None)
    assert report.ok, report.errors
    assert (report.snapshotter, report.pull_mode) == ("soci", "parallel")  # for nodeagent status
    text = (tmp_path / "etc/soci-snapshotter-grpc/config.toml").read_text()
    assert is_owned(text)
    doc = tomllib.loads(text)
    par = doc["pull_modes"]["parallel_pull_unpack"]
    assert par == {
        "enable": True,
        "max_concurrent_downloads": 40,
        "max_concurrent_downloads_per_image": 20,
        "concurrent_download_chunk_size": "16mb",
        "max_concurrent_unpacks": 2,
        "max_concurrent_unpacks_per_image": 2,
        "discard_unpacked_layers": True,
    }
    assert doc["pull_modes"]["soci_v2"] == {"enable": False}
    assert doc["content_store"] == {
        "type": "containerd",
        "containerd_address": "/run/containerd/containerd.sock",
    }
    c = tomllib.loads((tmp_path / "etc/containerd/config.toml").read_text())  # a version-2 file
    assert c["proxy_plugins"]["soci"] == {
        "type": "snapshot",
        "address": "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock",
        "exports": {"root": "/var/lib/soci-snapshotter-grpc"},
    }
    cri = c["plugins"][pullpath.V2_CRI]["containerd"]
    assert cri["snapshotter"] == "soci" and cri["disable_snapshot_annotations"] is False
    keys = [t["key"] for t in report.tuning]
    assert "containerd.soci.maxConcurrentDownloadsPerImage" in keys
    # SOCI needs snapshot annotations, which take containerd 2.2 off the transfer service
    assert any(
        "falls back to local pull because of disable_snapshot_annotations = false" in n for n in report.notes
    )
    second = _apply(config(SOCI), tmp_path, cpus=2, memory_bytes=4 * 2**30, nic_speed_mbps=None)
    assert second.ok and second.changed == []


def test_lazy_mode_config(tmp_path: Path) -> None:
    _node(tmp_path)
    assert _apply(config(SOCI + "    pullMode: lazy\n"), tmp_path).ok
    doc = tomllib.loads((tmp_path / "etc/soci-snapshotter-grpc/config.toml").read_text())
    assert doc["pull_modes"]["soci_v2"] == {"enable": True}
    assert doc["pull_modes"]["parallel_pull_unpack"] == {"enable": False}


@pytest.mark.parametrize(
    ("node", "body", "error"),
    [
        (dict(installed=False), "", "soci-snapshotter-grpc is not installed (/usr/bin/soci-snapshotter-grpc"),
        (dict(containerd="1.6.20"), "    pullMode: lazy\n", "pullMode lazy needs containerd 1.7.16 or newer"),
    ],
)
def test_apply_refuses_and_writes_nothing(tmp_path: Path, node: dict, body: str, error: str) -> None:  # type: ignore[type-arg]
    _node(tmp_path, **node)
    before = _tree(tmp_path)
    for flavor in ("generic", "eks-al2023"):
        report = _apply(config(SOCI + body), tmp_path, flavor=flavor)
        assert not report.ok and any(e.startswith("soci: ") and error in e for e in report.errors), (
            report.errors
        )
        assert _tree(tmp_path) == before


def test_overlayfs_writes_no_soci_settings(tmp_path: Path) -> None:
    _node(tmp_path, installed=False)
    assert _apply(config("containerd:\n  restartCommand: []\n"), tmp_path).ok
    assert not (tmp_path / "etc/soci-snapshotter-grpc").exists()
    doc = tomllib.loads((tmp_path / "etc/containerd/config.toml").read_text())
    assert doc["proxy_plugins"] == {}  # the stock file's empty table, left alone
    assert "snapshotter" not in doc["plugins"][pullpath.V2_CRI]["containerd"] or (
        doc["plugins"][pullpath.V2_CRI]["containerd"]["snapshotter"] == "overlayfs"
    )


def test_proxy_socket_is_not_soci_containerd_socket(tmp_path: Path) -> None:
    cfg = config(
        SOCI.replace(
            "containerd:\n",
            "cri:\n  endpoint: unix:///run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock\ncontainerd:\n",
        )
    )
    assert soci.containerd_socket(cfg) == "/run/containerd/containerd.sock"


# --- eks-al2023 -------------------------------------------------------------------------------


def _dropin(root: Path) -> dict:  # type: ignore[type-arg]
    docs = list(yaml.safe_load_all((root / "etc/eks/nodeadm.d/90-nodeagent.yaml").read_text()))
    return docs[0]  # type: ignore[no-any-return]


def test_eks_large_node_uses_nodeadm_fast_image_pull(tmp_path: Path) -> None:
    _node(tmp_path, nodeadm_=True)
    report = _apply(config(SOCI), tmp_path, flavor="eks-al2023", cpus=8, memory_bytes=32 * 2**30)
    assert report.ok, report.errors
    doc = _dropin(tmp_path)
    assert doc["spec"]["featureGates"] == {"FastImagePull": True}
    assert "proxy_plugins" not in doc["spec"]["containerd"]["config"]  # nodeadm's template has it
    assert not (tmp_path / "etc/soci-snapshotter-grpc").exists()  # nodeadm writes its own
    assert any("FastImagePull feature gate" in n for n in report.notes)


@pytest.mark.parametrize(
    ("kw", "body", "why"),
    [
        (dict(cpus=2, memory_bytes=4 * 2**30), "", "below nodeadm's minimum of 4 CPUs and 7 GiB"),
        (
            dict(cpus=8, memory_bytes=32 * 2**30),
            "    chunkSizeMiB: 32\n",
            "values set in the nodeagent config",
        ),
    ],
)
def test_eks_direct_configuration_where_nodeadm_would_not(
    tmp_path: Path, kw: dict, body: str, why: str
) -> None:  # type: ignore[type-arg]
    _node(tmp_path, nodeadm_=True)
    report = _apply(config(SOCI + body), tmp_path, flavor="eks-al2023", **kw)
    assert report.ok, report.errors
    doc = _dropin(tmp_path)
    assert "featureGates" not in doc["spec"]
    frag = tomllib.loads(doc["spec"]["containerd"]["config"])
    assert frag["proxy_plugins"]["soci"]["type"] == "snapshot"
    images = frag["plugins"][pullpath.V3_IMAGES]
    assert images["snapshotter"] == "soci" and images["disable_snapshot_annotations"] is False
    assert (tmp_path / "etc/soci-snapshotter-grpc/config.toml").exists()
    assert any(why in n for n in report.notes), report.notes


def test_feature_gate_needs_version_3_and_nodeadm_thresholds(tmp_path: Path) -> None:
    cfg = config(SOCI)
    big = facts(tmp_path, cpus=4, memory_bytes=7 * 2**30)
    assert nodeadm.soci_by_feature_gate(cfg, big, 3)
    assert not nodeadm.soci_by_feature_gate(cfg, big, 2)
    assert not nodeadm.soci_by_feature_gate(cfg, facts(tmp_path, cpus=3, memory_bytes=7 * 2**30), 3)
    assert not nodeadm.soci_by_feature_gate(config(SOCI + "    pullMode: lazy\n"), big, 3)
