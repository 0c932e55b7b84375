"""``Sandbox``: one owner for everything a test or the demo starts, torn down in reverse order.

    with Sandbox() as sb:                       # a short private dir under /tmp; containerd_line=...
        reg = sb.registry()                     # started docker-registry
        img = sb.image(reg, layers=2, layer_size=1 << 20)
        node = sb.containerd(registries=[reg])  # started containerd with hosts.toml for reg
        ...
    # here: every process stopped by PID, every mount under the dir unmounted, loop devices
    # detached, the dir deleted -- also when the body raised.

The pytest fixtures in tests/conftest.py are thin wrappers around this class.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from nodeagent.config.model import CriConfig
from nodeagent.util.paths import Paths
from tests.sandbox.activation import HeldSocket
from tests.sandbox.agent import NodeAgent
from tests.sandbox.containerd import Containerd, ContainerdLine, Mirror, default_line
from tests.sandbox.loopfs import LoopFs
from tests.sandbox.mounts import unmount_all_under
from tests.sandbox.net import HungServer, RefusedPort, ThrottleProxy
from tests.sandbox.oci import PushedImage, build_image, push_image
from tests.sandbox.process import SandboxError
from tests.sandbox.registry import Registry
from tests.sandbox.soci import SociSnapshotter

PAUSE_REPOSITORY = "sandbox/pause"


class Sandbox:
    def __init__(
        self, base: Path | None = None, prefix: str = "na-", containerd_line: ContainerdLine | None = None
    ) -> None:
        """``containerd_line``: the release line ``containerd()`` starts (default: ``default_line()``,
        i.e. ``$NODEAGENT_CONTAINERD_LINE`` or Debian's 1.6)."""
        self._line: ContainerdLine | None = containerd_line or default_line()
        self.line_read = False  # whether anyone asked for the line (to pass it to a subprocess)
        self.containerds: list[Containerd] = []  # every node made here (tests check lines with it)
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=base or "/tmp"))
        self._stack = contextlib.ExitStack()
        self._seq = itertools.count(1)
        self._closed = False
        self.pids: list[int] = []  # every daemon PID started here (for cleanup assertions)

    @property
    def containerd_line(self) -> ContainerdLine | None:
        """The line ``containerd()`` starts; None when this sandbox must start no containerd."""
        self.line_read = True
        return self._line

    @containerd_line.setter
    def containerd_line(self, line: ContainerdLine | None) -> None:
        self._line = line

    def _name(self, kind: str) -> Path:
        return self.dir / f"{kind}{next(self._seq)}"

    def _track(self, pid: int | None) -> None:
        if pid is not None:
            self.pids.append(pid)

    def callback(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` at teardown (before what was registered earlier)."""
        self._stack.callback(fn, *args)

    # --- components -----------------------------------------------------------------------
    def registry(self, **kw: Any) -> Registry:
        """A started registry (kwargs: auth=(user, pw), proxy_of=Registry|url, port=...)."""
        reg = Registry(self._name("registry"), **kw)
        self._stack.callback(reg.stop)
        reg.start()
        self._track(reg.pid)
        return reg

    def image(
        self, registry: Registry, repository: str | None = None, tag: str = "v1", **build: Any
    ) -> PushedImage:
        """Build an image (``build_image`` kwargs) and push it; a unique repository unless named."""
        repo = repository or f"test/img{next(self._seq)}"
        return push_image(registry, repo, tag, build_image(**build))

    def pause_image(self, registry: Registry) -> PushedImage:
        """A busybox image whose entrypoint sleeps: a pod sandbox image that really runs."""
        return push_image(registry, PAUSE_REPOSITORY, "v1", build_image(layers=0, busybox=True))

    def containerd(
        self,
        registries: Sequence[Registry] = (),
        *,
        mirrors: dict[str, Sequence[Mirror]] | None = None,
        start: bool = True,
        **kw: Any,
    ) -> Containerd:
        """A containerd of ``self.containerd_line`` (kwargs: root_dir, pods, sandbox_image, cri_options,
        transfer_options, line, snapshotter) with a hosts.toml (plain HTTP) for each registry;
        ``mirrors`` maps a registry host to mirror entries."""
        if "line" not in kw:
            if self._line is None:
                raise SandboxError(
                    "this test is marked no_containerd but starts a containerd: remove the marker "
                    "so it runs on every containerd line"
                )
            kw["line"] = self._line
        node = Containerd(self._name("node"), **kw)
        self.containerds.append(node)
        self._stack.callback(node.stop)
        for reg in registries:
            node.write_hosts_toml(reg.host, reg.url, (mirrors or {}).get(reg.host, ()))
        if start:
            node.start()
            self._track(node.pid)
            if node.snapshotter is not None:
                self._track(node.snapshotter.pid)
        return node

    def soci_snapshotter(self, **kw: Any) -> SociSnapshotter:
        """A SOCI snapshotter for ``containerd(..., snapshotter=...)`` (kwargs: mode, root_dir,
        parallel); started and stopped with that containerd."""
        return SociSnapshotter(self._name("soci"), **kw)

    def pod_node(self, registry: Registry, **kw: Any) -> tuple[Containerd, PushedImage]:
        """containerd able to run real pods (private mount namespace, cgroup2 only), with a
        runnable pause image pushed to ``registry`` as its sandbox image."""
        pause = self.pause_image(registry)
        node = self.containerd([registry], pods=True, sandbox_image=pause.reference, **kw)
        return node, pause

    def nodeagent(
        self,
        upstream: Containerd | str,
        *,
        start: bool = True,
        config: dict[str, Any] | None = None,
        socket_activated: bool = False,
    ) -> NodeAgent:
        """``nodeagent run`` proxying ``upstream`` (a Containerd or an endpoint), with its own
        ``--root``; ``config`` entries are merged over the defaults (metrics on 127.0.0.1:0).
        ``socket_activated``: the proxy socket is held here (``agent.held``, as systemd's
        nodeagent.socket holds it) and every start passes it through systemd-socket-activate."""
        endpoint = upstream.endpoint if isinstance(upstream, Containerd) else upstream
        agent = NodeAgent(self._name("agent"), endpoint, config)
        if socket_activated:  # at ListenStream=: cri.proxySocket, whose default it is when that is off
            listen = str(agent.config["cri"].get("proxySocket") or CriConfig().proxy_socket)
            agent.held = HeldSocket(Paths(agent.root).host(listen))
            self._stack.callback(agent.held.close)
        self._stack.callback(agent.stop)
        if start:
            agent.start()
            self._track(agent.pid)
        return agent

    def loopfs(self, size_mb: int = 200) -> LoopFs:
        fs = LoopFs(self._name("disk"), size_mb)
        self._stack.callback(fs.destroy)
        fs.create()
        return fs

    def hung_server(self) -> HungServer:
        return self._stack.enter_context(HungServer())

    def refused_port(self) -> RefusedPort:
        return self._stack.enter_context(RefusedPort())

    def throttle_proxy(
        self, upstream: Registry | str, rate: int, total_rate: int | None = None
    ) -> ThrottleProxy:
        target = upstream.host if isinstance(upstream, Registry) else upstream
        return self._stack.enter_context(ThrottleProxy(target, rate, total_rate=total_rate))

    # --- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._stack.close()
        finally:
            unmount_all_under(self.dir)
            if os.path.isdir(self.dir):
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
