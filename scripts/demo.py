#!/usr/bin/env python3
"""nodeagent's main job, end to end, against a sandbox node (run it with ``sudo bash scripts/demo.sh``).

The sandbox node is real: containerd (Debian's 1.6; ``NODEAGENT_CONTAINERD_LINE=2.2`` for the 2.x line
built by tests/sandbox/testbins.py) with its own root/state/socket under a temp dir, a
local docker-registry with images built on the spot, and nodeagent talking CRI to it. Nothing on
the machine outside that temp dir is changed, and everything started is stopped on exit.

The demo is an ordered list of steps (``STEPS``). Each step is a function ``step(ctx) -> None``
that does one part of the job through nodeagent's own commands or modules and tells the reader
what happened with ``ctx.say()``. Features add their step to ``STEPS`` where it belongs in the
node's life (setup, validate, apply, prefetch, pulls through the proxy, eviction, ...), using what
earlier steps left in ``ctx``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import calendar
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.sandbox (the sandbox node) lives beside the package

from nodeagent.util import humanize, proc  # noqa: E402
from tests.sandbox import Containerd, PushedImage, Registry, Sandbox  # noqa: E402


def human_bytes(n: float) -> str:
    return humanize.size(n, binary=True)


@dataclass
class Context:
    """What the steps share. Add fields (or use ``extra``) for what your step leaves for later ones."""

    sb: Sandbox
    registry: Registry | None = None
    node: Containerd | None = None
    images: dict[str, PushedImage] = field(default_factory=dict)
    config_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def say(self, text: str = "") -> None:
        for line in text.splitlines() or [""]:
            print(f"      {line}", flush=True)

    def nodeagent(self, *args: str, check: bool = True, timeout: float = 120) -> proc.Result:
        """Run the real ``nodeagent`` command line (as installed in the venv) and show it."""
        argv = [sys.executable, "-m", "nodeagent", *args]
        self.say(f"$ nodeagent {' '.join(shlex.quote(a) for a in args)}")
        r = proc.run(argv, timeout=timeout, check=False)
        out = (r.stdout + r.stderr).decode(errors="replace").rstrip()
        if out:
            self.say("\n".join("  " + line for line in out.splitlines()))
        if check and r.returncode != 0:
            raise RuntimeError(f"nodeagent {args[0]} exited with {r.returncode}")
        return r

    def need_node(self) -> tuple[Registry, Containerd]:
        assert self.registry is not None and self.node is not None, "the node step runs first"
        return self.registry, self.node


# --- steps -------------------------------------------------------------------------------------
def start_sandbox_node(ctx: Context) -> None:
    from nodeagent.cri.client import CriClient

    ctx.registry = ctx.sb.registry()
    ctx.say(f"registry    {ctx.registry.url}  (docker-registry, storage in {ctx.registry.storage})")
    ctx.node = ctx.sb.containerd([ctx.registry])
    ctx.say(f"containerd {ctx.node.line.name}  {ctx.node.endpoint}  (pid {ctx.node.pid})")
    ctx.say(f"            root {ctx.node.root}")
    ctx.say(f"            registry hosts dir {ctx.node.hosts_dir} (plain-HTTP hosts.toml for the registry)")

    async def version() -> Any:
        async with CriClient(ctx.node.endpoint) as cri:  # type: ignore[union-attr]
            return await cri.version()

    v = asyncio.run(version())
    ctx.say(f"CRI Version: {v.runtime_name} {v.runtime_version}, CRI API {v.runtime_api_version}")


def push_images(ctx: Context) -> None:
    registry, _ = ctx.need_node()
    plan = {
        "app": dict(layers=3, layer_size=4 << 20),
        "sidecar": dict(layers=1, layer_size=2 << 20),
    }
    for name, build in plan.items():
        img = ctx.sb.image(registry, f"demo/{name}", "v1", **build)
        ctx.images[name] = img
        ctx.say(
            f"{img.reference}  {len(img.layer_digests)} layer(s), {human_bytes(img.size)}, "
            f"digest {img.manifest_digest[:19]}..."
        )
    ctx.say("(layers are random bytes: incompressible, so sizes on disk are predictable)")


def write_config(ctx: Context) -> None:
    registry, node = ctx.need_node()
    path = ctx.sb.dir / "etc" / "nodeagent" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    prefetch = "\n".join(f"    - image: {img.reference}\n      required: true" for img in ctx.images.values())
    path.write_text(
        f"""# nodeagent config for the sandbox node (written by scripts/demo.py)
apiVersion: nodeagent.io/v1alpha1
kind: NodeAgentConfig
cri:
  endpoint: {node.endpoint}
  proxySocket: {ctx.sb.dir}/run/nodeagent/cri.sock
kubelet:
  serializeImagePulls: false
  maxParallelImagePulls: auto
containerd:
  maxConcurrentDownloads: auto
  hostsDir: {node.hosts_dir}
images:
  prefetch:
{prefetch}
  protect: ["{registry.host}/demo/app"]
eviction:
  enabled: true
  highThresholdPercent: 75
  lowThresholdPercent: 65
metrics:
  listen: 127.0.0.1:0
"""
    )
    ctx.config_path = path
    ctx.say(f"wrote {path}")


def validate_config(ctx: Context) -> None:
    assert ctx.config_path is not None
    ctx.nodeagent("validate", "-c", str(ctx.config_path))
    example = REPO / "docs" / "config.example.yaml"
    if example.exists():
        ctx.nodeagent("validate", "-c", str(example))
    broken = ctx.sb.dir / "broken.yaml"
    broken.write_text(
        ctx.config_path.read_text()
        .replace("lowThresholdPercent: 65", "lowThresholdPercent: 90")
        .replace("endpoint: unix://", "endpoint: unix:/")
        .replace("hostsDir:", "hostDir:")
    )
    ctx.say("and a broken copy (relative socket path, misspelt key, low threshold above high): exit 2")
    r = ctx.nodeagent("validate", "-c", str(broken), check=False)
    if r.returncode != 2:
        raise RuntimeError(f"validate on a broken config exited {r.returncode}, expected 2")


def apply_generic(ctx: Context) -> None:
    """nodeagent apply on a generic node's tree: dry-run diff, write, then a second run changes nothing."""
    registry, _ = ctx.need_node()
    assert ctx.config_path is not None
    root = ctx.sb.dir / "generic-node"  # a plain (non-EKS) node's tree with a stock containerd config
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(
        (REPO / "tests/data/containerd-1.6-config-default.toml").read_text()
    )
    (root / "etc/nodeagent").mkdir(parents=True)
    (root / "etc/nodeagent/config.yaml").write_text(
        "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\n"
        "containerd:\n  restartCommand: []   # the demo's containerd is not this tree's\n"
        f"  mirrors:\n    docker.io:\n      - endpoint: {registry.url}\n        dialTimeout: 500ms\n"
    )
    ctx.say(
        "stock `containerd config default` (1.6) + a docker.io mirror; first a dry run (diff, no writes):"
    )
    ctx.nodeagent("apply", "--root", str(root), "--flavor", "generic", "--dry-run")
    if (root / "etc/kubernetes").exists():
        raise RuntimeError("--dry-run wrote files")
    ctx.nodeagent("apply", "--root", str(root), "--flavor", "generic", check=False)
    for f in sorted(p for p in root.rglob("*") if p.is_file() and "nodeagent" not in p.parts):
        ctx.say(f"  {f.relative_to(root)}")
    ctx.say("again, same input:")
    again = ctx.nodeagent("apply", "--root", str(root), "--flavor", "generic")
    if b"nothing to change" not in again.stdout:
        raise RuntimeError("the second apply changed files")


def cri_round_trip(ctx: Context) -> None:
    from nodeagent.cri.client import CriClient

    _, node = ctx.need_node()
    img = ctx.images["app"]

    async def body() -> None:
        async with CriClient(node.endpoint) as cri:
            before = (await cri.image_fs_info()).image_filesystems[0].used_bytes.value
            t0 = time.monotonic()
            ref = await cri.pull_image(img.reference)
            took = time.monotonic() - t0
            ctx.say(f"PullImage {img.reference}: {took:.2f} s -> {ref[:19]}...")
            for i in await cri.list_images():
                ctx.say(
                    f"ListImages: {', '.join(i.repo_tags)}  {human_bytes(i.size)}  "
                    f"{', '.join(d.split('@')[1][:19] + '...' for d in i.repo_digests)}"
                )
            after = before
            deadline = time.monotonic() + 5
            while after <= before and time.monotonic() < deadline:  # stats refresh every second
                await asyncio.sleep(0.3)
                fs = (await cri.image_fs_info()).image_filesystems[0]
                after, mountpoint = fs.used_bytes.value, fs.fs_id.mountpoint
            ctx.say(
                f"ImageFsInfo: {mountpoint} uses {human_bytes(after)} ({human_bytes(after - before)} more)"
            )
            await cri.remove_image(img.reference)
            left = [i for i in await cri.list_images() if i.id == ref]
            ctx.say(f"RemoveImage {img.reference}: {'still listed!' if left else 'gone from ListImages'}")
            if left:
                raise RuntimeError("image still listed after RemoveImage")

    asyncio.run(body())
    blobs = ctx.registry.blob_requests() if ctx.registry else []
    ctx.say(f"registry served {len(blobs)} blob request(s) for the pull (from its access log)")


def proxy_and_metrics(ctx: Context) -> None:
    """nodeagent run in front of the sandbox containerd: pulls through its CRI socket, one JSON log
    line per pull, /metrics, nodeagent status."""
    registry, node = ctx.need_node()
    img = ctx.images["app"]
    agent = ctx.sb.nodeagent(node)
    ready = next((e for e in agent.log_lines() if e.get("msg") == "ready"), {})
    ctx.say(f"nodeagent run: proxy on {agent.proxy_socket}, metrics on {agent.status()['metrics']['listen']}")
    ctx.say(f"  (daemon start to READY: {ready.get('startup_seconds', 0) * 1000:.0f} ms)")

    async def body() -> None:
        from nodeagent.cri.client import CriClient, CriError

        async with CriClient(agent.proxy_endpoint) as cri:
            for ref in (img.reference, img.reference, f"{registry.host}/demo/missing:1"):
                try:
                    await cri.pull_image(ref)
                    ctx.say(f"PullImage {ref} via nodeagent: ok")
                except CriError as e:
                    ctx.say(f"PullImage {ref} via nodeagent: {e.code.name if e.code else e}")
            st = await cri.image_status(img.reference)
            ctx.say(f"ImageStatus {img.reference}: {'present' if st.HasField('image') else 'absent'}")

    asyncio.run(body())
    deadline = time.monotonic() + 10
    pulls: list[dict[str, Any]] = []
    while len(pulls) < 3 and time.monotonic() < deadline:
        pulls = [e for e in agent.log_lines() if e.get("msg") == "pull"]
        time.sleep(0.1)
    ctx.say("per-pull log lines (JSON on stdout / journald):")
    for e in pulls:
        ctx.say("  " + json.dumps(e, separators=(",", ":")))
    ctx.say("/metrics (pull series):")
    for line in agent.scrape().splitlines():
        if line.startswith(
            (
                "nodeagent_image_pulls_total",
                "nodeagent_image_pull_bytes_total",
                "nodeagent_image_cache_requests",
            )
        ) or (line.startswith("nodeagent_image_pull_duration_seconds_count")):
            if "_created" in line:
                continue
            ctx.say("  " + line)
    ctx.say("fleet view of these series: monitoring/ (scrape config, recording and alert rules, Grafana")
    ctx.say("  dashboard), docs/monitoring.md")
    time.sleep(1.2)  # the status file is rewritten within a second of a change
    ctx.nodeagent("status", "--root", str(agent.root), check=False)
    if agent.stop() != 0:
        raise RuntimeError("nodeagent run did not exit 0 on SIGTERM")
    ctx.say("SIGTERM: drained and exited 0")
    if len(pulls) < 3 or [e["result"] for e in pulls] != ["success", "success", "not_found"]:
        raise RuntimeError(f"unexpected pull records: {[e.get('result') for e in pulls]}")


def socket_activation(ctx: Context) -> None:
    """The proxy socket held by systemd's nodeagent.socket (played here: this demo holds it and starts
    the daemon through systemd-socket-activate): a SIGKILLed daemon refuses nothing."""
    import socket

    import grpc

    from nodeagent.cri.gen import cri_api_pb2 as cri
    from nodeagent.cri.gen import cri_api_pb2_grpc as cri_grpc

    _, node = ctx.need_node()
    img = ctx.images["app"]
    agent = ctx.sb.nodeagent(node, start=False, socket_activated=True)
    agent.start()
    first = agent.pid
    ctx.say(f"systemd-socket-activate passed {agent.proxy_socket} (LISTEN_FDS) to nodeagent run, pid {first}")
    ctx.nodeagent("status", "--root", str(agent.root), check=False)
    agent.kill()
    ctx.say("SIGKILL: no daemon now; the socket stays open (held as nodeagent.socket holds it)")
    with grpc.insecure_channel(agent.proxy_endpoint) as ch:
        waiting = cri_grpc.ImageServiceStub(ch).ImageStatus.future(
            cri.ImageStatusRequest(image=cri.ImageSpec(image=img.reference)), timeout=30
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.setblocking(False)
            err = s.connect_ex(str(agent.proxy_socket))
        time.sleep(1.0)
        ctx.say(f"a connect() meanwhile: {os.strerror(err) if err else 'accepted into the backlog'}")
        ctx.say(f"an ImageStatus meanwhile: {'answered?!' if waiting.done() else 'waiting, not refused'}")
        agent.start()  # what Restart=always does, RestartSec= later
        present = waiting.result(timeout=30).HasField("image")
    ctx.say(f"restarted (pid {agent.pid}): the waiting ImageStatus was answered: image present = {present}")
    if err or not present or agent.stop() != 0:
        raise RuntimeError("a call was refused or not answered across the restart")


def eks_user_data(ctx: Context) -> None:
    """EKS: a node group's settings in launch-template user-data, read back through IMDSv2 by apply."""
    from tests.fakes.imds import FakeImds  # a FAKE IMDSv2 on loopback (EC2 is not here)

    registry, _ = ctx.need_node()
    assert ctx.config_path is not None
    group = ctx.sb.dir / "nodegroup.yaml"
    group.write_text(
        "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\n"
        "kubelet:\n  registryPullQPS: 25\n"
        f"containerd:\n  mirrors:\n    docker.io:\n      - endpoint: {registry.url}\n"
    )
    ctx.say("the node group's settings (registryPullQPS, a docker.io mirror) rendered as user-data:")
    user_data = ctx.nodeagent("userdata", "-c", str(group), "--format", "al2023").stdout
    root = ctx.sb.dir / "eks-node"  # an EKS AL2023 node's tree: baked config + nodeadm present
    (root / "etc/nodeagent").mkdir(parents=True)
    (root / "etc/nodeagent/config.yaml").write_text(ctx.config_path.read_text())
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/nodeadm").write_text("")  # stand-in: apply detects the eks-al2023 flavor by it
    with FakeImds(user_data) as imds:
        ctx.say(f"fake IMDSv2 at {imds.endpoint} serves it; apply merges it over the baked config:")
        ctx.nodeagent("apply", "--root", str(root), "--imds-endpoint", imds.endpoint)
        ctx.say("IMDS requests: " + ", ".join(f"{m} {p} -> {code}" for m, p, code in imds.requests))
    dropin = (root / "etc/eks/nodeadm.d/90-nodeagent.yaml").read_text()
    qps = [line.strip() for line in dropin.splitlines() if "registryPullQPS" in line]
    ctx.say(f"nodeadm drop-in: {', '.join(qps)} (baked default 10, user-data 25)")
    if qps != ["registryPullQPS: 25"]:
        raise RuntimeError("the user-data setting did not reach the nodeadm drop-in")
    hosts = next(root.rglob("docker.io/hosts.toml"))
    ctx.say(f"mirror: {hosts.relative_to(root)} lists {registry.url}")
    if registry.url not in hosts.read_text():
        raise RuntimeError("the user-data mirror is not in hosts.toml")


def prefetch_images(ctx: Context) -> None:
    assert ctx.config_path is not None
    root = str(ctx.config_path.parent.parent.parent)  # the config sits at <root>/etc/nodeagent/config.yaml
    ctx.say(
        "before the kubelet starts: pull images.prefetch through CRI (not a terminal: one line per event)"
    )
    ctx.nodeagent("prefetch", "--root", root)
    ctx.say("again, as on the next boot: every image is already there and skipped")
    r = ctx.nodeagent("prefetch", "--root", root)
    if b" pulled" in r.stdout.split(b"IMAGE", 1)[-1]:
        raise RuntimeError("second prefetch pulled again")


def mirror_health(ctx: Context) -> None:
    """A hung mirror (accepts TCP, never answers) first in hosts.toml: stock containerd vs nodeagent."""
    from nodeagent.apply.targets.mirrors import render_hosts_toml
    from nodeagent.config.model import Mirror
    from nodeagent.cri.client import CriClient

    registry, _ = ctx.need_node()
    hung = ctx.sb.hung_server()
    img = ctx.images["sidecar"]

    def node_with_hung_mirror() -> tuple[Containerd, Path]:
        node = ctx.sb.containerd([])
        path = node.hosts_dir / registry.host / "hosts.toml"
        path.parent.mkdir(parents=True)
        path.write_text(render_hosts_toml(registry.host, [Mirror(hung.url)]))
        return node, path

    async def pull(endpoint: str, deadline: float) -> float | None:
        async with CriClient(endpoint) as cri:
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(cri.pull_image(img.reference), deadline)
            except TimeoutError:
                return None
            return time.monotonic() - t0

    stock, _ = node_with_hung_mirror()
    ctx.say(f"hung mirror {hung.url} listed first in {registry.host}/hosts.toml")
    took = asyncio.run(pull(stock.endpoint, 10))
    ctx.say(
        "stock containerd: "
        + ("still hanging after 10 s, cancelled" if took is None else f"pulled in {took:.2f} s")
    )
    stock.stop()

    node, path = node_with_hung_mirror()
    agent = ctx.sb.nodeagent(
        node,
        start=False,
        config={
            "containerd": {
                "hostsDir": "/etc/containerd/certs.d",
                "mirrors": {registry.host: [{"endpoint": hung.url}]},
            }
        },
    )
    link = agent.root / "etc/containerd/certs.d"
    link.parent.mkdir(parents=True)
    link.symlink_to(node.hosts_dir)  # the daemon's hosts dir (under its --root) is the node's
    agent.start()
    took = asyncio.run(pull(agent.proxy_endpoint, 60))
    if took is None:
        raise RuntimeError("the pull through nodeagent did not finish")
    line: dict[str, Any] = {}
    for _ in range(100):  # the per-pull log line is written just after the pull returns
        line = next((x for x in agent.log_lines() if x.get("image") == img.reference), {})
        if line:
            break
        time.sleep(0.05)
    ctx.say(
        f"with nodeagent run (default mirrorHealth settings): pulled in {took:.2f} s through the proxy, "
        f"retried once ({line.get('retry_reason', 'no retry logged')})"
    )
    hosts = [x for x in path.read_text().splitlines() if x.startswith("[host.")]
    ctx.say(f"{registry.host}/hosts.toml now lists {hosts or 'no mirror: containerd goes to the registry'}")
    for m in agent.scrape().splitlines():
        if m.startswith(("nodeagent_mirror_up{", "nodeagent_mirror_failovers_total{")):
            ctx.say(m)
    agent.stop()
    node.stop()


def eviction(ctx: Context) -> None:
    """A 200 MB image filesystem and 20 MiB images pulled one after the other through nodeagent run:
    the eviction loop removes the least recently used ones so that no pull fails for space."""
    from tests.integration.eviction_churn import push_churn_images, run_with_agent

    registry, _ = ctx.need_node()
    images = push_churn_images(ctx.sb, registry, count=8)
    ctx.say("8 distinct 20 MiB images; containerd's image store on a loop-mounted 200 MB ext4;")
    ctx.say("nodeagent run with eviction thresholds 60% / 40%, minUnusedAge 0s:")
    run, agent = run_with_agent(ctx.sb, registry, images)
    ctx.say(run.report())
    for e in run.log:
        if e.get("msg") == "image evicted":
            ctx.say(f"log: image evicted {e['image']} (freed {human_bytes(e['freed_bytes'])})")
            break
    for m in agent.scrape().splitlines():
        if m.startswith(("nodeagent_image_evict", "nodeagent_imagefs_used_ratio")) and "_created" not in m:
            ctx.say(m)
    ctx.say("what the policy would do now, and why, for every image:")
    ctx.nodeagent("evict", "--dry-run", "-c", str(agent.config_path), "--root", str(agent.root))
    agent.stop()
    if run.failures or not run.evictions:
        raise RuntimeError(f"{len(run.failures)} pull(s) failed, {run.evictions} eviction(s)")


def authenticated_mirror(ctx: Context) -> None:
    """An htpasswd pull-through mirror (as an ECR pull-through cache needs credentials) whose login
    comes from a credential-provider plugin speaking the kubelet's exec protocol: apply writes it
    into the mirror's [host] (mode 0600), containerd pulls through the mirror authenticated."""
    import base64
    import secrets

    from nodeagent.cri.client import CriClient
    from nodeagent.util.paths import Paths
    from tests.integration.test_mirror_credentials import (
        HOSTS_DIR,
        auth_users,
        containerd_requests,
        install_plugin,
        make_agent,
        nodeagent_cli,
    )

    upstream = ctx.sb.registry()
    logins = [(f"tok{i}", f"demo-{secrets.token_hex(8)}") for i in range(4)]
    mirror = ctx.sb.registry(auth=logins[0], more_users=logins[1:], proxy_of=upstream)
    img = ctx.sb.image(upstream, "demo/private", "v1", layers=1, layer_size=1 << 20)
    ctx.say(f"upstream {upstream.url} (anonymous); mirror {mirror.url}: htpasswd, pull-through cache of it")
    node = ctx.sb.containerd([])
    agent = make_agent(
        ctx.sb,
        node,
        {
            "containerd": {
                "hostsDir": HOSTS_DIR,
                "mirrors": {upstream.host: [{"endpoint": mirror.url, "credentials": {"from": "provider"}}]},
            }
        },
    )
    install_plugin(agent, mirror, logins)
    ctx.say("mirror config: credentials: {from: provider}  (the kubelet's credential provider config;")
    ctx.say("  here a test plugin that issues a new short-lived login on every run, as ECR's does)")
    ctx.say("$ nodeagent apply --dry-run --flavor eks-al2023   (credentials masked in the diff)")
    dry = nodeagent_cli(agent, "apply", "--dry-run", "--flavor", "eks-al2023")
    for line in dry.stdout.splitlines():
        if "Authorization" in line or line.startswith(("+[host", "+server")):
            ctx.say("  " + line)
    done = nodeagent_cli(agent, "apply", "--flavor", "eks-al2023")
    if done.returncode != 0:
        raise RuntimeError(f"apply failed: {done.stderr.strip()}")
    hosts = Paths(agent.root).host(f"{HOSTS_DIR}/{upstream.host}/hosts.toml")
    ctx.say(f"apply wrote {upstream.host}/hosts.toml, mode {hosts.stat().st_mode & 0o777:o}")
    agent.start()

    async def pull() -> None:
        async with CriClient(agent.proxy_endpoint) as cri:
            await cri.pull_image(img.reference, timeout=60.0)

    asyncio.run(pull())
    users = sorted(set(auth_users(mirror, "/blobs/sha256:")))
    ctx.say(f"PullImage {img.reference} via nodeagent: ok")
    ctx.say(
        f"mirror access log: blob GETs authenticated as {users}; containerd requests to the upstream: "
        f"{len(containerd_requests(upstream))}"
    )
    for m in agent.scrape().splitlines():
        if m.startswith(("nodeagent_mirror_auth_ok{", "nodeagent_mirror_up{")):
            ctx.say(m)
    text = agent.log_path.read_text() + agent.status_file.read_text()
    leaked = [p for _, p in logins if p in text or base64.b64encode(p.encode()).decode() in text]
    ctx.say(f"passwords in the daemon log or status file: {len(leaked)}")
    agent.stop()
    node.stop()
    if not users or containerd_requests(upstream) or leaked:
        raise RuntimeError("the pull did not go through the authenticated mirror alone, or a secret leaked")


def pod_aware_pulls(ctx: Context) -> None:
    """The real kube-apiserver (etcd, Node authorizer, NodeRestriction) and the real kubelet; a pod
    with an init container and two containers, three 6 MiB images from a registry capped at 4 MiB/s
    per connection. nodeagent sees the pod bound to its node and pulls all three at once; the kubelet,
    which pulls one image per container just before starting it, finds them present or joins."""
    from tests.sandbox.cluster import one_node_cluster
    from tests.sandbox.controlplane import pod_manifest
    from tests.sandbox.oci import build_image, push_image

    reg = ctx.sb.registry()
    throttle = ctx.sb.throttle_proxy(reg, 4 << 20)
    ctx.say("starting etcd, kube-apiserver, containerd that runs pods, nodeagent run, the kubelet ...")
    t0 = time.monotonic()
    fs = ctx.sb.loopfs(320)  # the image store on its own disk: the host's usage must not decide the run
    c = one_node_cluster(ctx.sb, reg, containerd={"root_dir": fs.mountpoint / "root"})
    c.node.write_hosts_toml(throttle.address, f"http://{throttle.address}")
    ctx.say(
        f"node {c.node_name} registered ({time.monotonic() - t0:.0f} s); kubelet's image endpoint: "
        "nodeagent's proxy; nodeagent watches the node's pods with the kubelet's kubeconfig"
    )
    refs = []
    for name in ("init", "app", "sidecar"):
        img = push_image(
            reg, f"demo/pod-{name}", "v1", build_image(layers=1, layer_size=6 << 20, busybox=True)
        )
        refs.append(img.reference.replace(reg.host, throttle.address, 1))
    created = time.time()
    c.cp.create(
        pod_manifest("web", c.node_name, [("app", refs[1]), ("sidecar", refs[2])], init=[("init", refs[0])])
    )
    c.cp.wait_running("web")
    running = time.time() - created
    assert c.agent is not None
    recs = [x for x in c.agent.log_lines() if x.get("msg") == "pull" and x.get("image") in refs]
    ctx.say("pull log lines (start and end relative to the pod's creation):")

    def ended(r: dict[str, Any]) -> float:  # the line is written when the pull ends
        return calendar.timegm(time.strptime(r["ts"][:19], "%Y-%m-%dT%H:%M:%S")) + float(r["ts"][19:-1])

    for r in sorted(recs, key=lambda x: ended(x) - x["duration_seconds"]):
        end = ended(r) - created
        start = end - r["duration_seconds"]
        ctx.say(
            f"  {r['origin']:<8} {r['image'].split('/', 1)[1]:<22} {start:5.2f} s -> {end:5.2f} s  "
            f"{r['result']}{'  (joined the pull in flight)' if r.get('joined') else ''}"
        )
    one = max((r["duration_seconds"] for r in recs if r.get("origin") == "pod"), default=0)
    ctx.say(
        f"pod Running {running:.1f} s after creation; one image takes {one:.1f} s at this rate, the kubelet"
    )
    ctx.say(f"  alone pulls them one after the other (about {3 * one:.1f} s of pulls before Running)")
    for m in c.agent.scrape().splitlines():
        if m.startswith(
            (
                "nodeagent_pod_pulls_pods_total{",
                "nodeagent_pod_pulls_images_total{",
                "nodeagent_image_pull_joins_total{",
            )
        ):
            ctx.say(m)
    if not any(r.get("origin") == "pod" for r in recs):
        raise RuntimeError("nodeagent did not pull the pod's images")


def soci_parallel_pull(ctx: Context) -> None:
    """containerd 2.2 (the EKS line) with soci-snapshotter-grpc, both restarted by ``nodeagent apply``
    with the values nodeagent sized for this machine; a pull through nodeagent's proxy is then
    prepared by SOCI's parallel pull and unpack, layer by layer."""
    from nodeagent.cri.client import CriClient
    from tests.integration.test_soci import SociNode
    from tests.sandbox.containerd import EKS_LINE

    registry, _ = ctx.need_node()
    own = ctx.sb.containerd_line
    ctx.sb.containerd_line = EKS_LINE  # SOCI is a proxy snapshotter of containerd 1.7+/2.x
    try:
        node = SociNode(ctx.sb, Path(EKS_LINE.binary()))
    finally:
        ctx.sb.containerd_line = own
    node.plain_http(registry.host)
    node.write_soci_config()
    node.start()
    ctx.say(
        f"containerd {EKS_LINE.name} on {node.sock}; config: containerd.snapshotter: soci (pullMode auto)"
    )
    r = ctx.nodeagent("apply", "--root", str(node.root), "--flavor", "generic", "-c", str(node.config_yaml))
    if b"soci-snapshotter restarted and serving" not in r.stdout:
        raise RuntimeError("apply did not bring soci-snapshotter up")
    img = ctx.sb.image(registry, "demo/soci", "v1", layers=3, layer_size=8 << 20)
    agent = ctx.sb.nodeagent(f"unix://{node.sock}")

    async def pull() -> float:
        async with CriClient(agent.proxy_endpoint) as cri:
            t0 = time.monotonic()
            await cri.pull_image(img.reference, timeout=120)
            return time.monotonic() - t0

    took = asyncio.run(pull())
    prepared = node.soci_log.read_text(errors="replace").count("preparing snapshot with parallel pull/unpack")
    ctx.say(f"PullImage {img.reference} ({human_bytes(img.size)}) via nodeagent: {took:.2f} s;")
    ctx.say(f"  soci-snapshotter log: {prepared} layer(s) prepared with parallel pull/unpack")
    agent.stop()
    if prepared != len(img.layer_digests):
        raise RuntimeError("SOCI did not prepare every layer with parallel pull")


Step = Callable[[Context], None]
STEPS: list[tuple[str, Step]] = [
    ("Start a sandbox node: containerd + local registry", start_sandbox_node),
    ("Push test images to the local registry", push_images),
    ("Write nodeagent's config for this node", write_config),
    ("nodeagent validate", validate_config),
    ("nodeagent apply (generic): kubelet drop-in, containerd config patch, hosts.toml", apply_generic),
    ("EKS: node-group settings from user-data through (fake) IMDSv2, nodeagent apply", eks_user_data),
    ("nodeagent prefetch: images on disk before the first pod", prefetch_images),
    ("Pull, list, inspect and remove an image through nodeagent's CRI client", cri_round_trip),
    ("nodeagent run: the kubelet's CRI image proxy, per-pull log lines and /metrics", proxy_and_metrics),
    ("Socket activation: the daemon is SIGKILLed and restarted, no call refused", socket_activation),
    ("Mirror health: a hung mirror costs seconds, not minutes", mirror_health),
    ("Authenticated mirror: credentials from the kubelet's credential provider", authenticated_mirror),
    ("Pod-aware pulls: the real kubelet and API server; a pod's images pulled at once", pod_aware_pulls),
    (
        "SOCI: containerd 2.2 + soci-snapshotter sized by nodeagent, parallel pull and unpack",
        soci_parallel_pull,
    ),
    ("Eviction: pulls into a nearly full image filesystem keep succeeding", eviction),
]


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--keep", action="store_true", help="leave the sandbox running until Enter is pressed")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: needs root (containerd, mounts): sudo bash scripts/demo.sh", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)  # clean up on SIGTERM too, not only on Ctrl-C
    print("nodeagent demo: the main job against a sandbox node (real containerd, local registry)\n")
    started = time.monotonic()
    with Sandbox(prefix="nodeagent-demo-") as sb:
        atexit.register(sb.close)  # last resort if the interpreter exits some other way
        ctx = Context(sb)
        print(f"sandbox dir: {sb.dir}\n")
        for n, (title, step) in enumerate(STEPS, 1):
            print(f"[{n}/{len(STEPS)}] {title}", flush=True)
            t0 = time.monotonic()
            try:
                step(ctx)
            except Exception as e:
                print(f"      FAILED: {e}", file=sys.stderr)
                if ctx.node is not None:
                    print(f"      containerd log: {ctx.node.log_path}", file=sys.stderr)
                print("\ncleaning up the sandbox node", file=sys.stderr)
                return 1
            print(f"      ok ({time.monotonic() - t0:.1f} s)\n", flush=True)
        if args.keep:
            input("sandbox still running; press Enter to stop it and clean up ")
        print("cleaning up: stopping containerd and the registry by PID, removing", sb.dir)
    print(f"\ndemo finished in {time.monotonic() - started:.1f} s: every step passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
