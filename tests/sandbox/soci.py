"""soci-snapshotter-grpc (v0.16.1, built by tests/sandbox/testbins.py) as the proxy snapshotter of a
sandbox containerd 2.x, for tests that need a SOCI node without going through ``nodeagent apply``
(test_soci.py judges what apply writes; these nodes are for eviction, bake and lazy loading on SOCI).

    soci = SociSnapshotter(tmp / "soci", mode="parallel")
    node = Containerd(tmp / "node", snapshotter=soci, pods=True, line=EKS_LINE)
    node.start()   # soci-snapshotter-grpc, then containerd in its mount namespace
    node.stop()    # both, by PID

soci-snapshotter-grpc starts first, as its systemd unit orders it (``Before=containerd.service``):
containerd's CRI plugin checks at start-up that each image is unpacked in the snapshotter, and an
image it cannot check (proxy snapshotter not answering) is left out of CRI's image list until it is
pulled again. With ``pods=True`` soci-snapshotter-grpc starts in a new private mount namespace (the
cgroup2-only one containerd needs for pods) and containerd joins it (``nsenter -t PID -m``): the
FUSE mounts of lazy loading must be visible to the containerd that mounts a container's rootfs on
them. Its content store is containerd's
(``[content_store] type = "containerd"``, as nodeadm and ``nodeagent apply`` configure it), and
its root (``exports.root``) is the directory CRI ImageFsInfo reports for the image filesystem.
"""

from __future__ import annotations

import json
import shlex
import socket
from collections.abc import Mapping
from pathlib import Path

from tests.sandbox.process import Daemon, RunsDaemon, SandboxError

NAME = "soci"
MODES = ("parallel", "lazy", "off")


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return json.dumps(v)  # a JSON string is a TOML basic string


class SociSnapshotter(RunsDaemon):
    def __init__(
        self,
        workdir: Path,
        *,
        mode: str = "parallel",
        root_dir: Path | None = None,
        parallel: Mapping[str, object] | None = None,
    ) -> None:
        """``parallel``: extra ``[pull_modes.parallel_pull_unpack]`` keys (soci's own names)."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {MODES}")
        self.workdir = workdir
        self.mode = mode
        self.root = root_dir if root_dir is not None else workdir / "root"
        self.address = workdir / "soci.sock"
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "soci.log"
        self.parallel = dict(parallel or {})

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshotter" / "snapshots"

    def render_config(self, containerd_socket: Path) -> str:
        ctd = _toml(str(containerd_socket))
        par = {"enable": self.mode == "parallel", **self.parallel}
        lines = [
            "[content_store]",
            'type = "containerd"',
            f"containerd_address = {ctd}",
            "",
            "[pull_modes.soci_v1]",
            "enable = false",
            "",
            "[pull_modes.soci_v2]",
            f"enable = {_toml(self.mode == 'lazy')}",
            "",
            "[pull_modes.parallel_pull_unpack]",
            *(f"{k} = {_toml(v)}" for k, v in par.items()),
        ]
        return "\n".join(lines) + "\n"

    def binary(self) -> str:
        from tests.sandbox import testbins

        return str(testbins.path("soci-snapshotter", "soci-snapshotter-grpc"))

    def start(self, containerd_socket: Path, private_ns: bool, timeout: float = 30.0) -> None:
        """Start for ``containerd_socket``'s containerd (which may start after it), in a new private
        mount namespace that sees only a cgroup2 mount when ``private_ns`` (containerd then joins
        it); wait until the socket accepts connections."""
        if self.running:
            raise SandboxError(f"soci-snapshotter-grpc at {self.address}: already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render_config(containerd_socket))
        if self.address.exists():
            self.address.unlink()
        argv = [
            self.binary(),
            *("--address", str(self.address), "--root", str(self.root)),
            *("--config", str(self.config_path), "--log-level", "debug"),
        ]
        if private_ns:
            inner = "umount -R /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup && exec " + " ".join(
                shlex.quote(a) for a in argv
            )
            # unshare execs sh, which execs soci-snapshotter-grpc: the PID we hold is its own
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", inner]
        self._daemon = Daemon("soci-snapshotter-grpc", argv, self.log_path)

        def ready() -> bool:
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(self.address))
                except OSError:
                    return False
            return True

        self._daemon.start_and_wait(
            f"soci-snapshotter-grpc at {self.address}", ready, timeout, stop=self.stop
        )

    def stop(self, timeout: float = 10.0) -> None:
        if self._daemon is not None:
            self._daemon.stop(timeout=timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
