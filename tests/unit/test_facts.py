import os
from pathlib import Path

import pytest

from nodeagent.apply import facts
from nodeagent.apply.targets import owned_header
from nodeagent.util import proc
from nodeagent.util.paths import Paths


def _nic(root: Path, name: str, speed: str | None, physical: bool = True) -> None:
    d = root / "sys/class/net" / name
    d.mkdir(parents=True)
    if physical:
        (d / "device").mkdir()
    if speed is not None:
        (d / "speed").write_text(speed + "\n")


def test_nic_speed_is_the_fastest_physical_nic(tmp_path: Path) -> None:
    _nic(tmp_path, "lo", "10", physical=False)
    _nic(tmp_path, "eth0", "1000")
    _nic(tmp_path, "eth1", "25000")
    _nic(tmp_path, "veth1", "100000", physical=False)  # virtual: ignored
    _nic(tmp_path, "eth2", "-1")  # link down
    _nic(tmp_path, "eth3", None)  # driver does not report
    assert facts.nic_speed_mbps(Paths(tmp_path)) == 25000


def test_nic_speed_unknown_without_sysfs(tmp_path: Path) -> None:
    assert facts.nic_speed_mbps(Paths(tmp_path)) is None


def test_imagefs_size_from_nearest_existing_parent(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    assert facts.imagefs_bytes(Paths(tmp_path)) == st.f_blocks * st.f_frsize


def test_cpus_and_memory_match_psutil() -> None:
    import psutil

    assert facts.memory_bytes() == psutil.virtual_memory().total
    assert 1 <= facts.cpu_count() <= (psutil.cpu_count() or 1)


def test_gather_reads_under_root(tmp_path: Path) -> None:
    (tmp_path / "etc/containerd/certs.d/ours.io").mkdir(parents=True)
    (tmp_path / "etc/containerd/certs.d/ours.io/hosts.toml").write_text(owned_header("x"))
    (tmp_path / "etc/containerd/certs.d/theirs.io").mkdir()
    (tmp_path / "etc/containerd/certs.d/theirs.io/hosts.toml").write_text('server = "https://x"\n')
    (tmp_path / "etc/containerd/config.toml").write_text("version = 2\n")
    f = facts.gather(Paths(tmp_path))
    assert f.containerd_config == "version = 2\n"
    assert f.owned_hosts_files == (tmp_path / "etc/containerd/certs.d/ours.io/hosts.toml",)
    assert not f.nodeadm_present and f.cpus >= 1 and f.memory_bytes > 0
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/nodeadm").write_text("")
    assert facts.gather(Paths(tmp_path)).nodeadm_present


def _containerd_binary(root: Path, output: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A containerd binary under the root whose --version prints ``output`` (unit tests start no process)."""
    b = root / "usr/bin/containerd"
    b.parent.mkdir(parents=True, exist_ok=True)
    b.write_text("")

    def run(argv: list[str], **kw: object) -> proc.Result:
        assert argv == [str(b), "--version"]
        return proc.Result(0, output.encode() + b"\n", b"")

    monkeypatch.setattr(proc, "run", run)


def test_containerd_version_from_the_binary_under_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert facts.containerd_version(Paths(tmp_path)) == (None, "")
    _containerd_binary(
        tmp_path, "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1", monkeypatch
    )
    assert facts.containerd_version(Paths(tmp_path)) == (
        (1, 6, 20),
        f"{tmp_path}/usr/bin/containerd --version",
    )


def test_containerd_version_file_wins_as_for_nodeadm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _containerd_binary(tmp_path, "containerd github.com/containerd/containerd/v2 v2.1.5 abc", monkeypatch)
    (tmp_path / "etc/eks").mkdir(parents=True)
    (tmp_path / "etc/eks/containerd-version.txt").write_text("2.2.9\n")
    v = facts.gather(Paths(tmp_path))
    assert (v.containerd_version, v.containerd_version_source) == (
        (2, 2, 9),
        f"{tmp_path}/etc/eks/containerd-version.txt",
    )


def test_nodeconfigs_user_data_parts_then_dropins_by_name_without_ours(tmp_path: Path) -> None:
    d = tmp_path / "etc/eks/nodeadm.d"
    d.mkdir(parents=True)
    nc = "apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n  cluster: {name: %s}\n"
    (d / "20-b.yaml").write_text(nc % "b")
    (d / "10-a.json").write_text('{"apiVersion": "node.eks.aws/v1alpha1", "kind": "NodeConfig", "spec": {}}')
    (d / "90-nodeagent.yaml").write_text(owned_header("nodeadm drop-in") + nc % "ours")
    (d / "notes.txt").write_text("not a NodeConfig file")
    (d / "30-bad.yaml").write_text("kind: NodeConfig\n  : [")
    user_data = (
        'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="B"\n\n--B\n'
        "Content-Type: application/node.eks.aws\n\n" + nc % "u" + "\n--B--\n"
    ).encode()
    found, warnings = facts.nodeconfigs(Paths(tmp_path), user_data)
    assert [s.where for s in found] == [
        "user-data part 1 (application/node.eks.aws)",
        str(d / "10-a.json"),
        str(d / "20-b.yaml"),
    ]
    assert found[0].doc["spec"]["cluster"]["name"] == "u"
    assert len(warnings) == 1 and warnings[0].startswith(f"{d / '30-bad.yaml'}: not YAML")
