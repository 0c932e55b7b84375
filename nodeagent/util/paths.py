"""Every host path nodeagent reads or writes, in one place.

``Paths(root)`` prefixes each absolute host path with ``root`` (``--root DIR``), so every command
can run against a fixture tree. Nothing else in the package builds host paths by hand.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


class UnsafePathError(ValueError):
    """A path component would escape the directory it must stay in."""


@dataclass(frozen=True)
class Paths:
    root: Path = Path("/")

    @classmethod
    def at(cls, root: str | os.PathLike[str] | None) -> Paths:
        return cls(Path(root) if root else Path("/"))

    def host(self, path: str | PurePosixPath) -> Path:
        """Map an absolute host path (``/etc/x``) into the root."""
        p = PurePosixPath(path)
        if not p.is_absolute():
            raise UnsafePathError(f"{path}: host paths must be absolute")
        if ".." in p.parts:
            raise UnsafePathError(f"{path}: '..' is not allowed in host paths")
        return self.root.joinpath(*p.parts[1:])

    # --- nodeagent's own files -------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.host("/etc/nodeagent/config.yaml")

    def config_for(self, given: str | None) -> Path:
        """The config file a command reads: ``-c FILE`` as given, else ``config_file``."""
        return Path(given) if given else self.config_file

    @property
    def baked_manifest(self) -> Path:
        return self.host("/etc/nodeagent/baked-images.json")

    @property
    def state_dir(self) -> Path:
        """Persistent state (survives reboots): last-used times, last apply report, mirror state."""
        return self.host("/var/lib/nodeagent")

    @property
    def run_dir(self) -> Path:
        """Runtime state of the daemon (tmpfs on a real node)."""
        return self.host("/run/nodeagent")

    @property
    def last_used_file(self) -> Path:
        return self.state_dir / "last-used.json"

    @property
    def apply_report_file(self) -> Path:
        return self.state_dir / "apply-report.json"

    @property
    def daemon_status_file(self) -> Path:
        return self.run_dir / "status.json"

    # --- files of other components that nodeagent writes ---------------------------------------
    @property
    def containerd_config(self) -> Path:
        return self.host("/etc/containerd/config.toml")

    @property
    def nodeadm_dropin_dir(self) -> Path:
        return self.host("/etc/eks/nodeadm.d")

    @property
    def kubelet_dropin_dir(self) -> Path:
        """The kubelet ``--config-dir`` used by the generic flavor."""
        return self.host("/etc/kubernetes/kubelet.conf.d")

    def hosts_dir(self, configured: str) -> Path:
        return self.host(configured)

    def mirror_ca(self, hosts_dir: str, registry: str, ca: str) -> Path:
        """A mirror's ``ca`` file as containerd reads it, under the root: an absolute path is a host
        path, a relative one is relative to the registry's hosts.toml directory."""
        if ca.startswith("/"):
            return self.host(ca)
        return child(self.hosts_dir(hosts_dir), registry) / ca

    # --- other components' files that nodeagent only reads ---------------------------------------
    @property
    def containerd_root(self) -> Path:
        return self.host("/var/lib/containerd")

    @property
    def net_class_dir(self) -> Path:
        return self.host("/sys/class/net")

    @property
    def nodeadm_binaries(self) -> tuple[Path, ...]:
        """Where AL2023 installs nodeadm (its presence selects the eks-al2023 flavor)."""
        return (self.host("/usr/bin/nodeadm"), self.host("/usr/local/bin/nodeadm"))

    @property
    def containerd_binaries(self) -> tuple[Path, ...]:
        """Where a node installs containerd (``containerd --version`` gives the installed version)."""
        return (self.host("/usr/bin/containerd"), self.host("/usr/local/bin/containerd"))

    @property
    def containerd_version_file(self) -> Path:
        """The EKS AMI's record of the containerd it ships; nodeadm reads it before the binary."""
        return self.host("/etc/eks/containerd-version.txt")

    @property
    def kubelet_main_configs(self) -> tuple[Path, ...]:
        """Usual places of the kubelet's main ``--config`` file (kubeadm, EKS AMIs, packages)."""
        return (
            self.host("/var/lib/kubelet/config.yaml"),
            self.host("/etc/kubernetes/kubelet/config.yaml"),
            self.host("/etc/kubernetes/kubelet/config.json"),
            self.host("/etc/kubernetes/kubelet/kubelet-config.json"),
            self.host("/etc/kubernetes/kubelet-config.yaml"),
        )

    @property
    def kubelet_unit_files(self) -> tuple[Path, ...]:
        """The kubelet's systemd unit, its drop-ins (sorted) and the environment files packages give
        it (kubeadm's ``/etc/default/kubelet``, RPMs' ``/etc/sysconfig/kubelet``)."""
        out: list[Path] = []
        for base in ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"):
            out.append(self.host(f"{base}/kubelet.service"))
            with contextlib.suppress(OSError):
                out += sorted(self.host(f"{base}/kubelet.service.d").glob("*.conf"))
        return (*out, self.host("/etc/default/kubelet"), self.host("/etc/sysconfig/kubelet"))

    @property
    def soci_binaries(self) -> tuple[Path, ...]:
        """Where a node installs soci-snapshotter-grpc (the SOCI snapshotter daemon)."""
        return (
            self.host("/usr/bin/soci-snapshotter-grpc"),
            self.host("/usr/local/bin/soci-snapshotter-grpc"),
        )

    @property
    def soci_units(self) -> tuple[Path, ...]:
        """systemd units of the SOCI snapshotter (a sign that images will be pulled with it)."""
        return (
            self.host("/etc/systemd/system/soci-snapshotter.service"),
            self.host("/usr/lib/systemd/system/soci-snapshotter.service"),
        )


def child(base: Path, name: str) -> Path:
    """``base / name`` for a single path component, refusing anything that could leave ``base``."""
    if not name or name in {".", ".."} or "/" in name or "\\" in name or "\x00" in name:
        raise UnsafePathError(f"{name!r}: not a safe file name under {base}")
    p = base / name
    if p.parent != base:
        raise UnsafePathError(f"{name!r}: escapes {base}")
    return p
