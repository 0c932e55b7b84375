"""The real kubelet (k8s.io/kubernetes, built by testbins) in standalone mode: no API server, static
pods from a directory, next to a sandbox containerd that can run pods (``Sandbox.pod_node``).

    kl = start_kubelet(sb, node, dropins=[nodeagent_dropin])   # started, healthz answers
    kl.add_pod(static_pod("web", [("app", image.reference)]))  # writes manifests/web.yaml
    pod = kl.wait_running("web")                                # status from the kubelet's /pods
    kl.remove_pod("web"); kl.wait_gone("web")

Settings known to work on these VMs (../shared/notes/sandbox-node.md): cgroupfs driver, no QoS
cgroups, ``enforceNodeAllocatable: []`` (restated in a ``--config-dir`` drop-in, since the kubelet
re-encodes the main file and drops empty lists), swap allowed, host-network pods (no CNI), and
``localStorageCapacityIsolation: true``: with a CRI stats provider (containerd) the kubelet's
cAdvisor keeps filesystem stats only then, and without them ``/stats/summary``, image GC and the
eviction manager fail ("cannot find filesystem info for device"). Every port is ephemeral
(``port``, ``healthzPort``; ``readOnlyPort: 0``), the root, cert, pod-log and volume-plugin dirs
are private, and the node name (``--hostname-override``) is unique, so several kubelets can run
on one machine. The kubelet creates no iptables chains here
(``makeIPTablesUtilChains: false``).

Host state the kubelet changes whatever its flags say, restored by the last fixture to stop:

- it creates ``/var/lib/kubelet`` (its device manager's socket is always
  ``/var/lib/kubelet/device-plugins/kubelet.sock``: a second kubelet replaces the first one's, which
  no test here uses), ``/usr/libexec/kubernetes`` and ``/var/log/containers``;
- it sets six kernel sysctls (``vm.overcommit_memory``, ``kernel.panic``, ...) to its own values.

What the host had before the first sandbox kubelet started is recorded once in
``/run/nodeagent-sandbox-kubelet/host.json``; every fixture registers its kubelet there, and when
the last one stops, and no other kubelet process runs on the machine, the recorded sysctls are
restored and only the dirs that did not exist before are removed. The links the kubelet left in
``/var/log/containers`` that point into this kubelet's dir are removed at each stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.sandbox import testbins
from tests.sandbox.agent import REPO, NodeAgent
from tests.sandbox.containerd import Containerd
from tests.sandbox.net import free_port
from tests.sandbox.process import Daemon, RunsDaemon, SandboxError, wait_until
from tests.sandbox.stack import Sandbox

HOST_DIRS = (Path("/var/lib/kubelet"), Path("/usr/libexec/kubernetes"), Path("/var/log/containers"))
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
STATE_DIR = Path("/run/nodeagent-sandbox-kubelet")
API_VERSION = "kubelet.config.k8s.io/v1beta1"
DROPIN = Path("etc/kubernetes/kubelet.conf.d/90-nodeagent.conf")


# --- host state shared by every sandbox kubelet on the machine ------------------------------------
@contextlib.contextmanager
def _host_lock() -> Iterator[Path]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield STATE_DIR / "host.json"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_sysctls() -> dict[str, str]:
    return {k: (Path("/proc/sys") / k).read_text().strip() for k in SYSCTLS}


def _kubelet_pids() -> list[int]:
    """Running processes whose program is a kubelet (any kubelet, ours or anybody's)."""
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if p.info.get("name") == "kubelet" or (cmd and os.path.basename(cmd[0]) == "kubelet"):
            found.append(p.info["pid"])
    return found


def _owner(workdir: Path) -> str:
    return f"{os.getpid()}:{workdir}"


def _alive(owner: str) -> bool:
    """An owner is alive while its test process runs and its work dir exists."""
    pid, _, workdir = owner.partition(":")
    return pid.isdigit() and psutil.pid_exists(int(pid)) and Path(workdir).exists()


def _register(owner: str) -> None:
    """Record the host's state (first kubelet only) and register ``owner`` as a user of it."""
    with _host_lock() as path:
        state: dict[str, Any]
        if path.exists():
            state = json.loads(path.read_text())
        else:
            state = {
                "absent_dirs": [str(d) for d in HOST_DIRS if not d.exists()],
                "sysctls": _read_sysctls(),
                "users": [],
            }
        state["users"] = sorted({*state["users"], owner})
        path.write_text(json.dumps(state, indent=2))


def _unregister(owner: str, own_logs: Path) -> None:
    """Drop ``owner``; the last user, with no other kubelet running, restores the host."""
    with _host_lock() as path:
        logs = Path("/var/log/containers")
        if logs.is_dir():
            for link in logs.iterdir():
                with contextlib.suppress(OSError):
                    if link.is_symlink() and os.readlink(link).startswith(str(own_logs) + "/"):
                        link.unlink()
        if not path.exists():
            return
        state = json.loads(path.read_text())
        users = [u for u in state["users"] if u != owner and _alive(u)]
        state["users"] = users
        if users or _kubelet_pids():
            path.write_text(json.dumps(state, indent=2))
            return
        for key, value in state["sysctls"].items():
            with contextlib.suppress(OSError):
                current = (Path("/proc/sys") / key).read_text().strip()
                if current != value:
                    (Path("/proc/sys") / key).write_text(value + "\n")
        for d in state["absent_dirs"]:
            shutil.rmtree(d, ignore_errors=True)
        path.unlink()


# --- pods -----------------------------------------------------------------------------------------
def static_pod(
    name: str,
    containers: Sequence[tuple[str, str]],
    *,
    namespace: str = "default",
    command: Sequence[str] | None = None,
    pull_policy: str = "IfNotPresent",
) -> dict[str, Any]:
    """A host-network static pod manifest: ``containers`` as (name, image) pairs."""
    spec_containers = []
    for cname, image in containers:
        c: dict[str, Any] = {"name": cname, "image": image, "imagePullPolicy": pull_policy}
        if command:
            c["command"] = list(command)
        spec_containers.append(c)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "hostNetwork": True,
            "terminationGracePeriodSeconds": 1,
            "restartPolicy": "Always",
            "containers": spec_containers,
        },
    }


class Kubelet(RunsDaemon):
    def __init__(
        self,
        workdir: Path,
        *,
        runtime_endpoint: str,
        image_endpoint: str | None = None,
        dropins: Sequence[Path] = (),
        config: Mapping[str, Any] | None = None,
        binary: str | None = None,
        verbosity: int = 2,
    ) -> None:
        self.workdir = workdir
        self.root_dir = workdir / "root"
        self.cert_dir = workdir / "pki"
        self.manifests = workdir / "manifests"
        self.config_path = workdir / "kubelet.yaml"
        self.config_dir = workdir / "kubelet.conf.d"
        self.pod_logs_dir = workdir / "pod-logs"
        self.log_path = workdir / "kubelet.log"
        self.binary = binary or str(testbins.path("kubelet"))
        self.node_name = f"na-{uuid.uuid4().hex[:10]}"
        self.port = free_port()
        self.healthz_port = free_port()
        self.runtime_endpoint = runtime_endpoint
        self.image_endpoint = image_endpoint
        self.dropins = list(dropins)
        self.verbosity = verbosity
        doc: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            # also what makes the kubelet's cAdvisor keep filesystem stats (with a CRI stats
            # provider): without it /stats/summary, image GC and the eviction manager all fail
            "localStorageCapacityIsolation": True,
            "makeIPTablesUtilChains": False,
            "staticPodPath": str(self.manifests),
            "fileCheckFrequency": "5s",
            "containerRuntimeEndpoint": runtime_endpoint,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "address": "127.0.0.1",
            "port": self.port,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.healthz_port,
            "readOnlyPort": 0,
            "podLogsDir": str(self.pod_logs_dir),
            "volumePluginDir": str(workdir / "volume-plugins"),
        }
        if image_endpoint:
            doc["imageServiceEndpoint"] = image_endpoint
        doc.update(config or {})
        self.config = doc
        self._daemon: Daemon | None = None
        self._registered = False

    # --- process --------------------------------------------------------------------------
    def write_config(self) -> None:
        for d in (self.root_dir, self.cert_dir, self.manifests, self.config_dir, self.pod_logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        # --config-dir re-encodes the main file and drops empty lists: restate them in a drop-in
        restated = {"apiVersion": API_VERSION, "kind": "KubeletConfiguration", "enforceNodeAllocatable": []}
        (self.config_dir / "10-sandbox.conf").write_text(yaml.safe_dump(restated, sort_keys=False))
        for src in self.dropins:
            shutil.copyfile(src, self.config_dir / src.name)

    def start(self, timeout: float = 90.0) -> None:
        if self.running:
            raise SandboxError(f"kubelet {self.node_name}: already running")
        self.write_config()
        if not self._registered:
            _register(_owner(self.workdir))
            self._registered = True
        argv = [
            self.binary,
            f"--config={self.config_path}",
            f"--config-dir={self.config_dir}",
            f"--root-dir={self.root_dir}",
            f"--cert-dir={self.cert_dir}",
            f"--hostname-override={self.node_name}",
            f"--v={self.verbosity}",
            # the events of a kubelet without an API server are only logged, at level 3
            "--vmodule=event=3",
        ]
        self._daemon = Daemon(f"kubelet {self.node_name}", argv, self.log_path)

        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.healthz_port}/healthz", timeout=2) as r:
                return bool(r.status == 200)

        self._daemon.start_and_wait(
            "kubelet healthz", healthy, timeout, interval=0.2, stop=self.stop, log_lines=30
        )

    def stop(self, timeout: float = 20.0) -> int | None:
        code = self._daemon.stop(timeout=timeout) if self._daemon else None
        if self._registered:
            _unregister(_owner(self.workdir), self.pod_logs_dir)
            self._registered = False
        return code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- the kubelet's own API (https, anonymous, AlwaysAllow) ---------------------------------------
    def get(self, path: str, timeout: float = 5.0) -> Any:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the kubelet's self-signed serving certificate
        url = f"https://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
            return json.load(r)

    def pods(self) -> list[dict[str, Any]]:
        """The kubelet's pods (static pods carry their status), from its ``/pods`` endpoint."""
        items: list[dict[str, Any]] = self.get("/pods").get("items") or []
        return items

    def pod(self, name: str) -> dict[str, Any] | None:
        full = f"{name}-{self.node_name}"  # static pods are named after the node
        return next((p for p in self.pods() if p["metadata"]["name"] == full), None)

    # --- static pods ----------------------------------------------------------------------------------
    def add_pod(self, manifest: Mapping[str, Any]) -> Path:
        """Write a static pod manifest atomically (the kubelet ignores dot files)."""
        name = manifest["metadata"]["name"]
        path = self.manifests / f"{name}.yaml"
        tmp = self.manifests / f".{name}.yaml.tmp"
        tmp.write_text(yaml.safe_dump(dict(manifest), sort_keys=False))
        os.replace(tmp, path)
        return path

    def remove_pod(self, name: str) -> None:
        (self.manifests / f"{name}.yaml").unlink(missing_ok=True)

    def wait_running(self, name: str, timeout: float = 120.0, interval: float = 0.2) -> dict[str, Any]:
        """Wait until the pod is Running with every container running and ready; return it."""
        got: dict[str, Any] = {}

        def running() -> bool:
            if self._daemon is not None:
                self._daemon.check_alive()
            pod = self.pod(name)
            if pod is None:
                return False
            got.clear()
            got.update(pod)
            return pod_running(pod)

        try:
            wait_until(f"static pod {name} Running on {self.node_name}", running, timeout, interval)
        except SandboxError as e:
            raise SandboxError(f"{e}\nlast status: {json.dumps(got.get('status'))[:2000]}") from None
        return got

    def wait_gone(self, name: str, timeout: float = 60.0) -> None:
        wait_until(f"static pod {name} gone from {self.node_name}", lambda: self.pod(name) is None, timeout)

    def summary(self) -> dict[str, Any]:
        """``/stats/summary``: the kubelet's view of the node, including its image filesystem."""
        data: dict[str, Any] = self.get("/stats/summary")
        return data


def pod_running(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    want = len(pod["spec"]["containers"])
    return (
        status.get("phase") == "Running"
        and len(containers) == want
        and all(c.get("ready") and "running" in (c.get("state") or {}) for c in containers)
    )


def start_kubelet(
    sb: Sandbox,
    node: Containerd,
    *,
    image_endpoint: str | None = None,
    dropins: Sequence[Path] = (),
    config: Mapping[str, Any] | None = None,
    start: bool = True,
) -> Kubelet:
    """A kubelet for ``node`` (started with ``pods=True``), stopped at the sandbox's teardown."""
    kl = Kubelet(
        sb.dir / f"kubelet-{uuid.uuid4().hex[:6]}",
        runtime_endpoint=node.endpoint,
        image_endpoint=image_endpoint,
        dropins=dropins,
        config=config,
    )
    sb.callback(kl.stop)
    if start:
        kl.start()
        if kl.pid is not None:
            sb.pids.append(kl.pid)
    return kl


def nodeagent_dropin(workdir: Path, agent: NodeAgent, config: Mapping[str, Any] | None = None) -> Path:
    """The kubelet drop-in ``nodeagent apply --flavor generic`` writes for ``agent`` (its real socket
    as ``cri.proxySocket``), on a root of its own; ``config`` entries are merged into apply's config."""
    root = workdir / "apply-root"
    cfg = root / "etc/nodeagent/config.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "apiVersion": "nodeagent.io/v1alpha1",
        "kind": "NodeAgentConfig",
        "cri": {"endpoint": agent.config["cri"]["endpoint"], "proxySocket": str(agent.proxy_socket)},
        **(config or {}),
    }
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    argv = [sys.executable, "-m", "nodeagent", "apply", "--root", str(root), "--flavor", "generic"]
    r = subprocess.run(
        [*argv, "--imds", "off"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)},
    )
    if r.returncode != 0:
        raise SandboxError(f"nodeagent apply --flavor generic: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return root / DROPIN
