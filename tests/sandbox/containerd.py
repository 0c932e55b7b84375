"""A private containerd for tests and the demo, with its own root, state, socket, config and hosts
directory under one temp dir (see ../shared/notes/sandbox-node.md). Two release lines (``LINES``):
Debian's containerd 1.6 (version-2 config) and containerd 2.x built by ``tests.sandbox.testbins``
(version-3 config: ``io.containerd.cri.v1.images`` / ``io.containerd.cri.v1.runtime``, server keys
under ``io.containerd.grpc.v1.cri``).

    node = Containerd(tmp / "node", sandbox_image="127.0.0.1:5000/pause:v1", line=line("2.2"))
    node.start()                  # waits until CRI Version answers on node.endpoint
    node.write_hosts_toml("127.0.0.1:5000", "http://127.0.0.1:5000")
    ...
    node.kill(); node.start()     # crash + restart on the same root/state
    node.stop()                   # SIGTERM then SIGKILL, by PID; also kills this node's shims

``pods=True`` runs containerd in a private mount namespace that sees only a cgroup2 mount, which is
what RunPodSandbox needs on these hybrid-cgroup VMs. ``root_dir`` puts the image store on a given
directory (for example a small loop-mounted filesystem).
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.sandbox.process import Daemon, RunsDaemon, SandboxError, kill_tree, pids_mentioning

CRI_VERSION_METHOD = "/runtime.v1.RuntimeService/Version"


def cri_version(endpoint: str, timeout: float = 2.0) -> bytes:
    """Call CRI RuntimeService/Version with raw bytes (no generated stubs needed); return the reply."""
    import grpc  # lazy: only integration code needs it

    with grpc.insecure_channel(endpoint) as ch:
        call = ch.unary_unary(
            CRI_VERSION_METHOD,
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        reply: bytes = call(b"", timeout=timeout)
        return reply


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"unsupported TOML value {v!r}")


@dataclass(frozen=True)
class ContainerdLine:
    """One containerd release line: Debian's package (``testbin`` None) or a testbins entry."""

    name: str  # "1.6", "2.2", ...: major.minor, also the test id suffix
    testbin: str | None = None

    @property
    def major(self) -> int:
        return int(self.name.split(".")[0])

    @property
    def config_version(self) -> int:
        return 3 if self.major >= 2 else 2

    @property
    def id(self) -> str:
        return f"containerd{self.name}"

    def binary(self, name: str = "containerd") -> str:
        """The program (``containerd``, ``ctr``, ``containerd-shim-runc-v2``) of this line."""
        if self.testbin is None:
            return f"/usr/bin/{name}"
        # imported here: `python -m tests.sandbox.testbins` must not find itself already imported
        from tests.sandbox import testbins

        return str(testbins.path(self.testbin, name))

    def env(self) -> dict[str, str]:
        """The environment containerd runs in: this line's own shim first on PATH (containerd
        looks ``containerd-shim-runc-v2`` up on PATH before its own directory)."""
        env = dict(os.environ)
        if self.testbin is not None:
            env["PATH"] = f"{Path(self.binary()).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        return env


# The OCI runtime: Debian's crun without cgroup management (these VMs' hybrid cgroup layout).
CRUN_WRAPPER = '#!/bin/sh\nexec /usr/bin/crun --cgroup-manager=disabled "$@"\n'
# containerd 2.x writes runtime-spec 1.2 bundles; Debian 12's crun 1.8 refuses any ociVersion but
# 1.0.x ("unknown version specified") although it runs what the sandbox's pods use. The wrapper
# states 1.0.2 in the bundle before crun reads it (a test-harness shim, not containerd behaviour).
CRUN_WRAPPER_V2 = """#!/bin/sh
prev=
for a in "$@"; do
  case "$prev" in
    --bundle|-b) sed -i 's/"ociVersion": *"[^"]*"/"ociVersion":"1.0.2"/' "$a/config.json" ;;
  esac
  prev=$a
done
exec /usr/bin/crun --cgroup-manager=disabled "$@"
"""


# Debian 12's containerd (1.6.20, the oldest line nodeagent supports); the 2.x line current EKS AL2023
# AMIs ship (testbins "containerd"); the newest 2.x release (testbins "containerd-latest"). The names
# are the pins' major.minor (a unit test keeps them equal).
DEBIAN_LINE = ContainerdLine("1.6")
EKS_LINE = ContainerdLine("2.2", "containerd")
LATEST_LINE = ContainerdLine("2.4", "containerd-latest")
LINES: dict[str, ContainerdLine] = {ln.name: ln for ln in (DEBIAN_LINE, EKS_LINE, LATEST_LINE)}


def line(name: str) -> ContainerdLine:
    """A line by name (``1.6``, ``2.2``, ...) or by alias (``debian``, ``eks``, ``latest``)."""
    aliases = {"debian": DEBIAN_LINE, "eks": EKS_LINE, "latest": LATEST_LINE}
    found = aliases.get(name) or LINES.get(name.removeprefix("containerd"))
    if found is None:
        raise KeyError(f"no containerd line {name!r}; known: {', '.join(LINES)} (or debian, eks, latest)")
    return found


def default_line() -> ContainerdLine:
    """``$NODEAGENT_CONTAINERD_LINE`` (the demo, benchmarks, helper scripts), else Debian's 1.6."""
    return line(os.environ.get("NODEAGENT_CONTAINERD_LINE") or "1.6")


# version-3 homes of the CRI keys callers pass by their version-2 names (cri_options)
_V3_SERVER_KEYS = frozenset(
    {
        "disable_tcp_service",
        "stream_server_address",
        "stream_server_port",
        "stream_idle_timeout",
        "enable_tls_streaming",
    }
)
_V3_IMAGE_KEYS = frozenset(
    {
        "snapshotter",
        "disable_snapshot_annotations",
        "discard_unpacked_layers",
        "max_concurrent_downloads",
        "concurrent_layer_fetch_buffer",
        "image_pull_progress_timeout",
        "image_pull_with_sync_fs",
        "stats_collect_period",
        "use_local_image_pull",
    }
)


@dataclass(frozen=True)
class Mirror:
    """One ``[host."URL"]`` entry of a hosts.toml (tried before ``server``)."""

    url: str
    capabilities: Sequence[str] = ("pull", "resolve")
    override_path: bool = False


def hosts_toml(server: str, mirrors: Sequence[Mirror] = ()) -> str:
    """hosts.toml for a registry served over plain HTTP at ``server`` (e.g. ``http://127.0.0.1:5000``)."""
    lines = [f"server = {_toml_value(server)}", ""]
    for m in mirrors:
        lines.append(f"[host.{_toml_value(m.url)}]")
        lines.append("  capabilities = [" + ", ".join(_toml_value(c) for c in m.capabilities) + "]")
        if m.override_path:
            lines.append("  override_path = true")
        lines.append("")
    return "\n".join(lines)


class Containerd(RunsDaemon):
    def __init__(
        self,
        workdir: Path,
        *,
        root_dir: Path | None = None,
        pods: bool = False,
        sandbox_image: str = "registry.invalid/pause:none",
        cri_options: Mapping[str, object] | None = None,
        transfer_options: Mapping[str, object] | None = None,
        line: ContainerdLine | None = None,
    ) -> None:
        """``cri_options``: CRI plugin keys by their version-2 names (placed in the right version-3
        plugin on 2.x); ``transfer_options``: ``io.containerd.transfer.v1.local`` keys (2.x only)."""
        self.workdir = workdir
        self.root = root_dir if root_dir is not None else workdir / "root"
        self.state = workdir / "state"
        self.socket = workdir / "containerd.sock"
        self.hosts_dir = workdir / "certs.d"
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "containerd.log"
        self.runtime_wrapper = workdir / "crun-nocg"
        self.pods = pods
        self.sandbox_image = sandbox_image
        self.cri_options = dict(cri_options or {})
        self.transfer_options = dict(transfer_options or {})
        self.line = line or default_line()
        if self.transfer_options and self.line.major < 2:
            raise ValueError(f"transfer_options need containerd 2.x, not {self.line.id}")
        self._daemon: Daemon | None = None

    # --- what tests use -------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def write_hosts_toml(self, host: str, server: str | None = None, mirrors: Sequence[Mirror] = ()) -> Path:
        """Write ``certs.d/<host>/hosts.toml``; ``server`` defaults to ``http://<host>``."""
        if "/" in host or host in {"", ".", ".."}:
            raise ValueError(f"{host!r}: not a registry host")
        d = self.hosts_dir / host
        d.mkdir(parents=True, exist_ok=True)
        path = d / "hosts.toml"
        path.write_text(hosts_toml(server or f"http://{host}", mirrors))
        return path

    def render_config(self) -> str:
        return self._render_v3() if self.line.config_version == 3 else self._render_v2()

    def _header(self, version: int) -> str:
        return f"""version = {version}
root = {_toml_value(str(self.root))}
state = {_toml_value(str(self.state))}
[grpc]
  address = {_toml_value(str(self.socket))}
[ttrpc]
  address = {_toml_value(str(self.socket) + ".ttrpc")}
[debug]
  level = "info"
"""

    def _render_v2(self) -> str:
        cri = {"stats_collect_period": 1, "restrict_oom_score_adj": True, "sandbox_image": self.sandbox_image}
        cri.update(self.cri_options)
        cri_lines = "\n".join(f"  {k} = {_toml_value(v)}" for k, v in cri.items())
        return (
            self._header(2)
            + f"""[plugins."io.containerd.grpc.v1.cri"]
{cri_lines}
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = {_toml_value(str(self.hosts_dir))}
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    BinaryName = {_toml_value(str(self.runtime_wrapper))}
"""
        )

    def _render_v3(self) -> str:
        server: dict[str, object] = {}
        images: dict[str, object] = {"stats_collect_period": 1}
        runtime: dict[str, object] = {"restrict_oom_score_adj": True}
        for k, v in self.cri_options.items():
            if k == "sandbox_image":
                raise ValueError("pass sandbox_image=, not cri_options['sandbox_image']")
            (server if k in _V3_SERVER_KEYS else images if k in _V3_IMAGE_KEYS else runtime)[k] = v

        def body(d: Mapping[str, object]) -> str:
            return "".join(f"  {k} = {_toml_value(v)}\n" for k, v in d.items())

        img = 'plugins."io.containerd.cri.v1.images"'
        rt = 'plugins."io.containerd.cri.v1.runtime"'
        text = self._header(3)
        if server:
            text += '[plugins."io.containerd.grpc.v1.cri"]\n' + body(server)
        text += f"""[{img}]
{body(images)}  [{img}.pinned_images]
    sandbox = {_toml_value(self.sandbox_image)}
  [{img}.registry]
    config_path = {_toml_value(str(self.hosts_dir))}
[{rt}]
{body(runtime)}  [{rt}.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [{rt}.containerd.runtimes.runc.options]
    BinaryName = {_toml_value(str(self.runtime_wrapper))}
# NRI's socket is machine-wide (/var/run/nri/nri.sock): off, so sandbox nodes never share it
[plugins."io.containerd.nri.v1.nri"]
  disable = true
"""
        if self.transfer_options:
            text += '[plugins."io.containerd.transfer.v1.local"]\n' + body(self.transfer_options)
        return text

    def start(self, timeout: float = 30.0) -> None:
        """Start (or start again on the same dirs) and wait until CRI Version answers."""
        if self.running:
            raise SandboxError(f"containerd at {self.socket}: already running")
        for d in (self.workdir, self.root, self.state, self.hosts_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.runtime_wrapper.write_text(CRUN_WRAPPER_V2 if self.line.major >= 2 else CRUN_WRAPPER)
        self.runtime_wrapper.chmod(0o755)
        self.config_path.write_text(self.render_config())
        if self.socket.exists():  # left by a kill -9
            self.socket.unlink()
        cmd = [self.line.binary(), "--config", str(self.config_path)]
        if self.pods:
            inner = "umount -R /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup && exec " + " ".join(
                shlex.quote(c) for c in cmd
            )
            # unshare execs sh, which execs containerd: the PID we hold is containerd's.
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", inner]
        self._daemon = Daemon(f"containerd ({self.line.id})", cmd, self.log_path, env=self.line.env())

        def ready() -> bool:
            if not self.socket.exists():
                return False
            cri_version(self.endpoint, timeout=1.0)
            return True

        self._daemon.start_and_wait(f"containerd CRI at {self.endpoint}", ready, timeout, stop=self.stop)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM then SIGKILL containerd by PID, then kill this node's shims and their containers."""
        if self._daemon is not None:
            self._daemon.stop(timeout=timeout)
        self.kill_shims()

    def kill(self) -> None:
        """kill -9 containerd (shims and containers keep running, as on a real node)."""
        if self._daemon is not None:
            self._daemon.kill()

    def restart(self, timeout: float = 30.0) -> None:
        if self._daemon is not None:
            self._daemon.stop()
        self.start(timeout=timeout)

    def shim_pids(self) -> list[int]:
        """containerd-shim processes serving this node (their command line names our socket)."""
        return pids_mentioning(str(self.socket))

    def kill_shims(self) -> list[int]:
        pids = self.shim_pids()
        if self.running and self.pid in pids:
            pids.remove(self.pid)  # type: ignore[arg-type]
        return kill_tree(pids) if pids else []

    def content_bytes(self) -> int:
        """Bytes in the content store (compressed blobs) on disk."""
        blobs = self.root / "io.containerd.content.v1.content" / "blobs"
        return sum(p.stat().st_size for p in blobs.rglob("*") if p.is_file()) if blobs.exists() else 0

    def wait_stopped(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
