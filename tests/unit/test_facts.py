import os
from pathlib import Path

from nodeagent import facts
from nodeagent.paths import Paths
from nodeagent.targets import owned_header


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
