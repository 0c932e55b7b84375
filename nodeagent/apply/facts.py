"""Node facts that ``apply`` renders from: CPUs, memory, NIC speed, image filesystem size, and the
current text of the files it patches. Gathered once, read-only, every host path through ``Paths``.

CPU count and memory come from the running kernel (``sched_getaffinity``: the CPUs this process may
use, so a cpuset is respected; ``sysconf`` physical pages), read with the stdlib rather than psutil
to keep apply's start-up short on the boot path; NIC speed and the image filesystem are read under
``--root`` (``/sys/class/net/*/speed``, statvfs of the containerd root), so tests can
hand in a fixture tree.

The installed containerd version is read as nodeadm reads it: ``/etc/eks/containerd-version.txt``
when the AMI has one, else ``containerd --version`` of the binary under ``--root``. On nodeadm
nodes the NodeConfigs nodeadm will merge besides ours are gathered too: the user-data's
``application/node.eks.aws`` parts and the other files in ``/etc/eks/nodeadm.d``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.apply.targets import is_owned
from nodeagent.config.model import Config
from nodeagent.util.paths import Paths, UnsafePathError

ContainerdVersion = tuple[int, int, int]
VERSION_TIMEOUT = 5.0  # `containerd --version`
MAX_NODECONFIG_BYTES = 1024 * 1024
NODECONFIG_SUFFIXES = (".yaml", ".yml", ".json")  # what nodeadm reads from a drop-in directory
_SEMVER = re.compile(r"([0-9]+)\.([0-9]+)\.([0-9]+)")


@dataclass(frozen=True)
class NodeConfigSource:
    """One NodeConfig nodeadm merges (user-data part or drop-in), parsed; ``where`` names it."""

    where: str
    doc: dict[str, Any]


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
    containerd_version: ContainerdVersion | None = None  # the installed containerd; None: unknown
    containerd_version_source: str = ""  # where it was read (for messages)
    nodeconfigs: tuple[NodeConfigSource, ...] = ()  # other NodeConfigs nodeadm merges, in its order
    nodeconfig_warnings: tuple[str, ...] = ()  # NodeConfigs that could not be read
    kubelet_main_configs: tuple[tuple[Path, str], ...] = ()  # existing kubelet --config files, text
    kubelet_process: tuple[int, tuple[str, ...]] | None = None  # a running kubelet: (pid, argv)
    kubelet_units: tuple[tuple[Path, str], ...] = ()  # kubelet's systemd unit, drop-ins, env files

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


def parse_version(text: str) -> ContainerdVersion | None:
    """The first ``X.Y.Z`` in ``containerd --version`` output (nodeadm's rule), e.g. ``v2.2.9`` or
    Debian's ``1.6.20~ds1``."""
    m = _SEMVER.search(text)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def containerd_version(paths: Paths) -> tuple[ContainerdVersion | None, str]:
    """(version, where it came from): the AMI's version file first, then the binary under the root."""
    try:
        v = parse_version(paths.containerd_version_file.read_text()[:4096])
        if v:
            return v, str(paths.containerd_version_file)
    except (OSError, UnicodeDecodeError):
        pass
    from nodeagent.util import proc

    for b in paths.containerd_binaries:
        if not b.is_file():
            continue
        try:
            r = proc.run([str(b), "--version"], timeout=VERSION_TIMEOUT, check=False)
        except proc.CommandError:
            continue
        v = parse_version(r.stdout.decode(errors="replace"))
        if r.returncode == 0 and v:
            return v, f"{b} --version"
    return None, ""


def _load_nodeconfig(where: str, text: str) -> tuple[NodeConfigSource | None, str | None]:
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return None, f"{where}: not YAML ({str(e).splitlines()[0]}); nodeadm will refuse it too"
    if not isinstance(doc, dict) or doc.get("kind") != "NodeConfig":
        return None, None
    return NodeConfigSource(where, doc), None


def nodeconfigs(
    paths: Paths, user_data: bytes | None
) -> tuple[tuple[NodeConfigSource, ...], tuple[str, ...]]:
    """The NodeConfigs nodeadm merges besides nodeagent's drop-in, in nodeadm's order: user-data
    parts (``imds://user-data``), then ``/etc/eks/nodeadm.d`` files by name (drop-ins win)."""
    found: list[NodeConfigSource] = []
    warnings: list[str] = []
    texts: list[tuple[str, str]] = []
    if user_data:
        from nodeagent.eks.userdata import UserDataError, nodeconfig_parts

        try:
            texts.extend(nodeconfig_parts(user_data))
        except UserDataError as e:
            warnings.append(f"{e}; its NodeConfig parts are not taken into account")
    try:
        names = sorted(os.listdir(paths.nodeadm_dropin_dir))
    except OSError:
        names = []
    for name in names:
        f = paths.nodeadm_dropin_dir / name
        if not name.endswith(NODECONFIG_SUFFIXES) or not f.is_file():
            continue
        try:
            with open(f, "rb") as fh:
                raw = fh.read(MAX_NODECONFIG_BYTES + 1)
        except OSError as e:
            warnings.append(f"{f}: cannot read ({e.strerror})")
            continue
        if is_owned(raw):
            continue  # nodeagent's own drop-in
        if len(raw) > MAX_NODECONFIG_BYTES:
            warnings.append(f"{f}: larger than {MAX_NODECONFIG_BYTES} bytes; not taken into account")
            continue
        texts.append((str(f), raw.decode(errors="replace")))
    for where, text in texts:
        source, warning = _load_nodeconfig(where, text)
        if source:
            found.append(source)
        if warning:
            warnings.append(warning)
    return tuple(found), tuple(warnings)


def existing_texts(files: tuple[Path, ...]) -> tuple[tuple[Path, str], ...]:
    """``(path, text)`` of each of ``files`` that can be read (at most ``MAX_NODECONFIG_BYTES`` each)."""
    out = []
    for p in files:
        try:
            with open(p, "rb") as fh:
                out.append((p, fh.read(MAX_NODECONFIG_BYTES).decode(errors="replace")))
        except OSError:
            continue
    return tuple(out)


MAX_CMDLINE_BYTES = 64 << 10


def missing_mirror_cas(config: Config, paths: Paths) -> list[str]:
    """A warning per mirror ``ca`` file that does not exist, resolved as the probes and containerd
    resolve it (``Paths.mirror_ca``: under ``--root``)."""
    out = []
    cd = config.containerd
    for registry, mirrors in cd.mirrors:
        for i, m in enumerate(mirrors):
            for ca in m.ca:
                try:
                    path = paths.mirror_ca(cd.hosts_dir, registry, ca)
                except UnsafePathError:
                    continue  # an unsafe registry name: the mirrors target reports it
                if not path.is_file():
                    out.append(
                        f"containerd.mirrors.{registry}[{i}].ca: {ca} (read as {path}) does not exist: "
                        "containerd and the mirror probes cannot verify this mirror's certificate"
                    )
    return out


def kubelet_process(paths: Paths) -> tuple[int, tuple[str, ...]] | None:
    """The running kubelet's pid and argv, from ``/proc`` under the root (None: none found)."""
    proc = paths.host("/proc")
    try:
        pids = sorted(int(n) for n in os.listdir(proc) if n.isdigit())
    except OSError:
        return None
    for pid in pids:
        try:
            with open(proc / str(pid) / "cmdline", "rb") as fh:
                raw = fh.read(MAX_CMDLINE_BYTES)
        except OSError:
            continue
        argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
        if argv and os.path.basename(argv[0]) == "kubelet":
            return pid, argv
    return None


def gather(
    paths: Paths, hosts_dir: str = "/etc/containerd/certs.d", *, user_data: bytes | None = None
) -> NodeFacts:
    """Every fact apply renders from. ``user_data``: as IMDS returned it (None: IMDS not used)."""
    version, version_source = containerd_version(paths)
    configs, config_warnings = nodeconfigs(paths, user_data)
    return NodeFacts(
        paths=paths,
        cpus=cpu_count(),
        memory_bytes=memory_bytes(),
        nic_speed_mbps=nic_speed_mbps(paths),
        imagefs_bytes=imagefs_bytes(paths),
        containerd_config=_read_text(paths.containerd_config),
        nodeadm_present=nodeadm_present(paths),
        owned_hosts_files=owned_hosts_files(paths, hosts_dir),
        containerd_version=version,
        containerd_version_source=version_source,
        nodeconfigs=configs,
        nodeconfig_warnings=config_warnings,
        kubelet_main_configs=existing_texts(paths.kubelet_main_configs),
        kubelet_process=kubelet_process(paths),
        kubelet_units=existing_texts(paths.kubelet_unit_files),
    )
