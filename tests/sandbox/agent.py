"""``nodeagent run`` as a real process on the sandbox node (integration tests, bench, demo).

    agent = sb.nodeagent(node)            # started; proxy on agent.proxy_endpoint
    text = agent.scrape()                 # GET /metrics
    agent.stop()                          # SIGTERM; returns the exit code
    agent.kill(); agent.start()           # crash and restart on the same root

Its root (``--root``) is a private dir: the proxy socket, status file and last-used state live
under it. stdout/stderr (the JSON log lines) go to ``agent.log_path``. With ``agent.held`` set (a
``HeldSocket``, tests/sandbox/activation.py), every start runs the daemon under
systemd-socket-activate with that socket passed, as systemd's nodeagent.socket would.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from nodeagent.util.paths import Paths
from tests.sandbox.activation import HeldSocket
from tests.sandbox.process import Daemon, RunsDaemon, SandboxError

REPO = Path(__file__).resolve().parents[2]


class NodeAgent(RunsDaemon):
    def __init__(self, workdir: Path, cri_endpoint: str, config: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.config_path = workdir / "config.yaml"
        self.log_path = workdir / "nodeagent.util.log"
        doc: dict[str, Any] = {
            "apiVersion": "nodeagent.io/v1alpha1",
            "kind": "NodeAgentConfig",
            "cri": {"endpoint": cri_endpoint, "proxySocket": "/run/nodeagent/cri.sock"},
            "metrics": {"listen": "127.0.0.1:0"},
        }
        for key, value in (config or {}).items():
            if isinstance(value, dict) and isinstance(doc.get(key), dict):
                doc[key] = {**doc[key], **value}
            else:
                doc[key] = value
        self.config = doc
        self._daemon: Daemon | None = None
        self.env: dict[str, str] = {}
        self.held: HeldSocket | None = None  # socket activation: the socket systemd would hold

    @property
    def proxy_socket(self) -> Path:
        return Paths(self.root).host(str(self.config["cri"]["proxySocket"]))

    @property
    def proxy_endpoint(self) -> str:
        return "unix://" + str(self.proxy_socket)

    @property
    def status_file(self) -> Path:
        return Paths(self.root).daemon_status_file

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.status_file.read_text())
        return data

    @property
    def metrics_url(self) -> str:
        return f"http://{self.status()['metrics']['listen']}"

    def start(self, timeout: float = 20.0, env: dict[str, str] | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        started = time.time()
        argv = [
            sys.executable,
            "-m",
            "nodeagent",
            "run",
            "-c",
            str(self.config_path),
            "--root",
            str(self.root),
        ]
        full_env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONPATH": str(REPO),
            **self.env,
            **(env or {}),
        }
        fds: tuple[int, ...] = ()
        if self.held is not None:
            argv, full_env, fds = self.held.launch(argv, full_env)
        self._daemon = Daemon("nodeagent", argv, self.log_path, env=full_env, cwd=REPO, pass_fds=fds)
        try:
            self._daemon.start()
        finally:
            for fd in fds:
                os.close(fd)  # the child's copy; the HeldSocket keeps its own
        if self.held is not None:
            self.held.wake()
        daemon = self._daemon

        def ready() -> bool:
            if not self.status_file.exists():
                return False
            st = self.status()
            return bool(
                st.get("state") == "running"
                and st.get("pid") == daemon.pid
                and st["startedAt"] >= started - 1
            )

        daemon.start_and_wait("nodeagent", ready, timeout, interval=0.02, stop=self.stop, started=True)

    def stop(self, timeout: float = 20.0) -> int | None:
        return self._daemon.stop(timeout=timeout) if self._daemon else None

    def kill(self) -> None:
        if self._daemon is not None:
            self._daemon.kill()

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.metrics_url + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def scrape(self) -> str:
        status, text = self.get("/metrics")
        if status != 200:
            raise SandboxError(f"/metrics answered {status}")
        return text

    def log_lines(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines (other lines, e.g. tracebacks, are skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out
