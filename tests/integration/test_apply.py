"""``nodeagent apply`` against real containerd (1.6 and 2.x) and docker-registry pull-through mirrors.

What users rely on: after ``apply --flavor generic`` on a stock containerd config, containerd
(restarted by ``containerd.restartCommand`` from the files apply wrote) pulls through the mirror
written to hosts.toml, falls back to the registry when the mirror is down, and an ``overridePath``
mirror works the same way. A containerd that does not come back after the change gets its previous
config back and apply exits 1. A kill -9 at any moment of an apply leaves every file old or new.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomlkit
import yaml

from nodeagent.cri.client import CriClient
from tests.sandbox import PushedImage, Registry, Sandbox
from tests.sandbox.containerd import cri_version

DATA = Path(__file__).resolve().parents[1] / "data"
RESTART = Path(__file__).with_name("restart_containerd.py")
HEADER = {"apiVersion": "nodeagent.io/v1alpha1", "kind": "NodeAgentConfig"}


class Node:
    """A rooted tree T with a stock containerd config, and the containerd started from T's files."""

    def __init__(self, sandbox: Sandbox) -> None:
        line = sandbox.containerd_line
        assert line is not None
        self.line = line
        self.work = sandbox.dir / f"apply-node-{random.randrange(1 << 30)}"
        self.root = self.work / "T"
        self.sock = self.work / "containerd.sock"
        self.pidfile = self.work / "containerd.pid"
        self.log = self.work / "containerd.log"
        self.config_toml = self.root / "etc/containerd/config.toml"
        self.config_yaml = self.root / "etc/nodeagent/config.yaml"
        # hostsDir is a host path: apply writes it under --root, containerd reads it as written in
        # config_path. A symlink from the host path to its place under T gives containerd the
        # node's view of that directory (as if T were /).
        self.hosts_dir = self.work / "certs.d"
        (self.root / str(self.hosts_dir).lstrip("/")).mkdir(parents=True)
        self.hosts_dir.symlink_to(self.root / str(self.hosts_dir).lstrip("/"))
        self.config_toml.parent.mkdir(parents=True)
        self.config_yaml.parent.mkdir(parents=True)
        if line.major >= 2:  # apply reads the installed version from it (the pull path follows it)
            (self.root / "usr/bin").mkdir(parents=True)
            (self.root / "usr/bin/containerd").symlink_to(line.binary())
        # the stock `containerd config default`, with only the daemon's own paths moved into the
        # sandbox (so it runs next to anything else on this machine); apply's keys are untouched
        if line.major < 2:
            doc = tomlkit.parse((DATA / "containerd-1.6-config-default.toml").read_text())
        else:
            stock = subprocess.run(
                [line.binary(), "config", "default"], capture_output=True, text=True, check=True
            )
            doc = tomlkit.parse(stock.stdout)
            doc["imports"] = []  # the host's /etc/containerd/conf.d is not this node's
            nri = doc["plugins"]["io.containerd.nri.v1.nri"]  # type: ignore[index]
            nri["socket_path"] = str(self.work / "nri.sock")  # type: ignore[index]
        doc["root"] = str(self.work / "root")
        doc["state"] = str(self.work / "state")
        doc["grpc"]["address"] = str(self.sock)  # type: ignore[index]
        doc["ttrpc"]["address"] = str(self.sock) + ".ttrpc"  # type: ignore[index]
        self.config_toml.write_text(tomlkit.dumps(doc))
        sandbox.callback(self.stop)

    @property
    def endpoint(self) -> str:
        return f"unix://{self.sock}"

    def restart_command(self, *extra: str) -> list[str]:
        return [
            *(sys.executable, str(RESTART), str(self.pidfile), str(self.config_toml), str(self.log)),
            *("--containerd", self.line.binary(), *extra),
        ]

    def write_config(self, containerd: dict, **top: object) -> None:  # type: ignore[type-arg]
        containerd = {"hostsDir": str(self.hosts_dir), **containerd}
        doc = {
            **HEADER,
            "cri": {"endpoint": self.endpoint, "proxySocket": ""},
            "containerd": containerd,
            **top,
        }
        self.config_yaml.write_text(yaml.safe_dump(doc))

    def start(self) -> None:
        subprocess.run(self.restart_command(), check=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                cri_version(self.endpoint, timeout=1.0)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"containerd did not start:\n{self.log.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.1)

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    def apply(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nodeagent", "apply", "--root", str(self.root), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **(env or {})},
        )

    def pull(self, reference: str) -> str:
        async def body() -> str:
            async with CriClient(self.endpoint) as cri:
                return await cri.pull_image(reference, timeout=60)

        return asyncio.run(body())


@pytest.fixture
def node(sandbox: Sandbox) -> Iterator[Node]:
    n = Node(sandbox)
    yield n
    n.stop()


def test_generic_apply_mirror_fallback_and_override_path(
    node: Node,
    sandbox: Sandbox,
    registry_factory: Callable[..., Registry],
    image_factory: Callable[..., PushedImage],
) -> None:
    a = registry_factory()
    mirror_a = registry_factory(proxy_of=a)
    b = registry_factory()
    mirror_b = registry_factory(proxy_of=b)
    node.write_config(
        {
            "restartCommand": node.restart_command(),
            "maxConcurrentDownloads": 4,
            "mirrors": {
                a.host: [{"endpoint": mirror_a.url}],
                # overridePath: the endpoint's path is the API root, as for ECR pull-through caches
                b.host: [{"endpoint": mirror_b.url + "/v2", "overridePath": True}],
            },
        }
    )
    node.start()  # containerd on the stock config (config_path = "")
    stock_pid = node.pid()

    r = node.apply("--flavor", "generic")
    assert r.returncode == 0, r.stderr
    assert "containerd: restarted, CRI answers" in r.stdout
    assert node.pid() != stock_pid  # restarted through restartCommand, on the written config
    plugins = tomlkit.parse(node.config_toml.read_text())["plugins"]
    if node.line.major < 2:
        cri = plugins["io.containerd.grpc.v1.cri"]  # type: ignore[index]
        assert cri["max_concurrent_downloads"] == 4  # type: ignore[index]
        assert cri["registry"]["config_path"] == str(node.hosts_dir)  # type: ignore[index]
    else:
        # containerd 2.x (version-3 config): CRI pulls go through the transfer service, whose own
        # table holds the download concurrency; the hosts directory is the CRI images plugin's
        assert plugins["io.containerd.transfer.v1.local"]["max_concurrent_downloads"] == 4  # type: ignore[index]
        images = plugins["io.containerd.cri.v1.images"]  # type: ignore[index]
        assert images["registry"]["config_path"] == str(node.hosts_dir)  # type: ignore[index]

    img_a = image_factory(layers=2, layer_size=1 << 20, to=a, repository="apply/through-mirror")
    assert node.pull(img_a.reference) == img_a.image_id
    assert set(img_a.layer_digests) <= mirror_a.blob_digests_served()  # the mirror's log shows them

    mirror_a.stop()
    img_a2 = image_factory(layers=1, layer_size=1 << 20, to=a, repository="apply/fallback", seed=7)
    mark = a.mark()
    assert node.pull(img_a2.reference) == img_a2.image_id  # the mirror is down: straight from A
    assert set(img_a2.layer_digests) <= {r.digest for r in a.requests_since(mark) if r.is_blob}

    img_b = image_factory(layers=2, layer_size=1 << 20, to=b, repository="apply/override-path")
    assert node.pull(img_b.reference) == img_b.image_id
    assert set(img_b.layer_digests) <= mirror_b.blob_digests_served()

    # a second apply with the same input (mirror back up: apply leaves out mirrors that do not
    # answer at apply time) writes nothing and restarts nothing
    mirror_a.start()
    pid = node.pid()
    report = node.root / "var/lib/nodeagent/apply-report.json"  # the run record, not configuration
    before = {p: p.stat().st_mtime_ns for p in node.root.rglob("*") if p.is_file() and p != report}
    r = node.apply("--flavor", "generic")
    assert r.returncode == 0, r.stderr
    assert "nothing to change" in r.stdout and node.pid() == pid
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_unhealthy_containerd_gets_previous_config_back(node: Node) -> None:
    original = node.config_toml.read_bytes()
    # fault injection: the restart "service" refuses to start containerd on a config holding this
    node.write_config(
        {
            "restartCommand": node.restart_command("--fail-if-contains", "max_concurrent_downloads = 9"),
            "maxConcurrentDownloads": 9,
        }
    )
    node.start()
    r = node.apply("--flavor", "generic")
    assert r.returncode == 1
    assert "containerd: not healthy after the config change" in r.stderr
    assert "containerd is healthy on it" in r.stderr
    assert node.config_toml.read_bytes() == original
    cri_version(node.endpoint)  # running again, on the restored stock config


# --- kill -9 at any moment ----------------------------------------------------------------------

FAULT_CONFIG = {
    "restartCommand": [],  # file writes only; the restart path is covered above
    "maxConcurrentDownloads": 5,
    "mirrors": {
        "docker.io": [{"endpoint": "https://mirror.example", "overridePath": True}],
        "quay.io": [{"endpoint": "http://127.0.0.1:30020"}],
        "_default": [{"endpoint": "https://cache.example"}],
    },
}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _prepare(base: Path) -> Path:
    root = base / "T"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(
        (DATA / "containerd-1.6-config-default.toml").read_text()
    )
    (root / "etc/nodeagent").mkdir(parents=True)
    cfg = {**HEADER, "cri": {"proxySocket": ""}, "containerd": FAULT_CONFIG}
    (root / "etc/nodeagent/config.yaml").write_text(yaml.safe_dump(cfg))
    stale = root / "etc/containerd/certs.d/gone.io/hosts.toml"  # ours, no longer configured
    stale.parent.mkdir(parents=True)
    stale.write_text(
        '# Managed by nodeagent (registry mirrors for gone.io): ...\nserver = "https://gone.io"\n'
    )
    return root


FAULT_POINTS = Path(__file__).with_name("apply_fault_points.py")


def _apply_cmd(root: Path, fault_delay: float | None = None) -> list[str]:
    """``nodeagent apply``; with ``fault_delay``, through apply_fault_points.py (a pause announced
    on stderr before each write step)."""
    args = ["apply", "--root", str(root), "--flavor", "generic"]
    if fault_delay is None:
        return [sys.executable, "-m", "nodeagent", *args]
    return [sys.executable, str(FAULT_POINTS), str(fault_delay), *args]


def _check_old_or_new(root: Path, old: dict[str, bytes], new: dict[str, bytes], what: str) -> None:
    report = "var/lib/nodeagent/apply-report.json"
    now = _snapshot(root)
    for name in set(old) | set(new) | set(now):
        if name == report:
            continue
        if Path(name).name.startswith(".") and name.endswith(".tmp"):
            continue  # write_atomic's temp file: never read by anyone, removed by the next apply
        assert now.get(name) in (old.get(name), new.get(name)), f"{what}: {name} is neither old nor new"


def test_kill_9_at_every_write_point_and_at_random_times_leaves_old_or_new_files(tmp_path: Path) -> None:
    ref = _prepare(tmp_path / "ref")
    old = _snapshot(ref)
    r = subprocess.run(_apply_cmd(ref, fault_delay=0.001), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    points = [ln for ln in r.stderr.splitlines() if ln.startswith("fault-point ")]
    # kubelet drop-in, containerd backup, containerd config, 3 hosts.toml, removal of gone.io
    assert len(points) == 7, points
    new = _snapshot(ref)
    assert "etc/containerd/certs.d/gone.io/hosts.toml" not in new

    runs: list[tuple[str, float | int]] = [("point", k) for k in range(1, len(points) + 1)]
    rng = random.Random(1234)
    runs += [("random", rng.uniform(0.05, 0.8)) for _ in range(12)]
    for i, (kind, at) in enumerate(runs):
        root = _prepare(tmp_path / f"run{i}")
        p = subprocess.Popen(
            _apply_cmd(root, fault_delay=0.2 if kind == "point" else None),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            if kind == "point":
                assert p.stderr is not None
                for line in p.stderr:
                    if line.startswith(f"fault-point {at} "):
                        time.sleep(rng.uniform(0, 0.25))  # before, or in the middle of, the write
                        break
            else:
                time.sleep(float(at))
            p.send_signal(signal.SIGKILL)
        finally:
            p.wait(timeout=30)
            if p.stderr is not None:
                p.stderr.close()
        _check_old_or_new(root, old, new, f"{kind} {at}")
        # and the next apply finishes the job, cleaning any temp file left behind
        r = subprocess.run(_apply_cmd(root), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        final = {k: v for k, v in _snapshot(root).items() if k != "var/lib/nodeagent/apply-report.json"}
        assert final == {k: v for k, v in new.items() if k != "var/lib/nodeagent/apply-report.json"}
