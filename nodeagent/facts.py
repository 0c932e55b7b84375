"""Node facts that ``apply`` renders from: CPUs, memory, NIC speed, image filesystem size, and the
current text of the files it patches. Gathered once, read-only, every host path through ``Paths``.

CPU count and memory come from the running kernel (``sched_getaffinity``: the CPUs this process may
use, so a cpuset is respected; ``sysconf`` physical pages), read with the stdlib rather than psutil
to keep apply's start-up short on the boot path; NIC speed and the image filesystem are read under
``--root`` (``/sys/class/net/*/speed``, statvfs of the containerd root), so tests can
hand in a fixture tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nodeagent.paths import Paths
from nodeagent.targets import is_owned


@dataclass(frozen=True)
class NodeFacts:
    paths: Paths
    cpus: int
    memory_bytes: int
    nic_speed_mbps: int | None  # fastest physical NIC that reports a speed; None if none does
    imagefs_bytes: int | None  # size of the filesystem holding the containerd root
    containerd_config: str | None  # current /etc/containerd/config.toml, None if absent
    nodeadm_present: bool  # nodeadm binary or /etc/eks/nodeadm.d exists under the root
    owned_hosts_files: tuple[Path, ...] = ()  # <hosts_dir>/*/hosts.toml that carry our marker

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30


def nic_speed_mbps(paths: Paths) -> int | None:
    """Fastest speed (Mb/s) among physical interfaces; virtual ones (no ``device`` link) are skipped.

    Drivers report -1 or fail with EINVAL when the link is down or the speed unknown (some
    virtual NICs); those are ignored.
    """
    base = paths.net_class_dir
    best: int | None = None
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return None
    for name in names:
        d = base / name
        if name == "lo" or not (d / "device").exists():
            continue
        try:
            speed = int((d / "speed").read_text().strip())
        except (OSError, ValueError):
            continue
        if speed > 0 and (best is None or speed > best):
            best = speed
    return best


def imagefs_bytes(paths: Paths) -> int | None:
    """Size of the filesystem that holds (or will hold) the containerd root."""
    p: Path = paths.containerd_root
    while True:
        try:
            st = os.statvfs(p)
            return st.f_blocks * st.f_frsize
        except FileNotFoundError:
            if p == paths.root or p.parent == p:
                return None
            p = p.parent
        except OSError:
            return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def owned_hosts_files(paths: Paths, hosts_dir: str) -> tuple[Path, ...]:
    """hosts.toml files under the hosts directory that carry nodeagent's marker (read-only scan)."""
    base = paths.hosts_dir(hosts_dir)
    found = []
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return ()
    for d in entries:
        f = d / "hosts.toml"
        if d.is_symlink() or not d.is_dir() or f.is_symlink():
            continue
        try:
            with open(f, "rb") as fh:
                head = fh.readline(4096)
        except OSError:
            continue
        if is_owned(head):
            found.append(f)
    return tuple(found)


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def memory_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))


def nodeadm_present(paths: Paths) -> bool:
    """nodeadm is installed, or its drop-in directory exists (apply's flavor, IMDS ``auto``)."""
    return any(b.exists() for b in paths.nodeadm_binaries) or paths.nodeadm_dropin_dir.is_dir()


def gather(paths: Paths, hosts_dir: str = "/etc/containerd/certs.d") -> NodeFacts:
    return NodeFacts(
        paths=paths,
        cpus=cpu_count(),
        memory_bytes=memory_bytes(),
        nic_speed_mbps=nic_speed_mbps(paths),
        imagefs_bytes=imagefs_bytes(paths),
        containerd_config=_read_text(paths.containerd_config),
        nodeadm_present=nodeadm_present(paths),
        owned_hosts_files=owned_hosts_files(paths, hosts_dir),
    )
