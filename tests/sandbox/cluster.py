"""A one-node cluster in the sandbox: the real control plane (controlplane.py), a containerd that runs
pods, optionally nodeagent in front of it, and the real kubelet registered against the API server with
the node's client certificate (realclients' ``Kubelet`` fixture, given ``--kubeconfig``).

    c = one_node_cluster(sb, reg, nodeagent=True)          # everything started; the Node is registered
    c.cp.create(pod_manifest("web", c.node_name, [("app", img.reference)]))
    c.cp.wait_running("web")

With ``nodeagent=True`` the kubelet's ``imageServiceEndpoint`` is nodeagent's proxy, and nodeagent's
``podPulls.kubeconfig`` is the same node kubeconfig the kubelet uses (copied to the path it has on an
AL2023 node under nodeagent's ``--root``).
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from typing import Any

from tests.sandbox import testbins
from tests.sandbox.agent import NodeAgent
from tests.sandbox.containerd import Containerd
from tests.sandbox.controlplane import ControlPlane
from tests.sandbox.kubelet import Kubelet
from tests.sandbox.process import wait_until
from tests.sandbox.registry import Registry
from tests.sandbox.stack import Sandbox

NODE_KUBECONFIG = "/var/lib/kubelet/kubeconfig"


@dataclass
class Cluster:
    cp: ControlPlane
    node: Containerd
    kubelet: Kubelet
    agent: NodeAgent | None

    @property
    def node_name(self) -> str:
        return self.kubelet.node_name


def one_node_cluster(
    sb: Sandbox,
    registry: Registry,
    *,
    nodeagent: bool = True,
    agent_config: dict[str, Any] | None = None,
    containerd: dict[str, Any] | None = None,
    kubelet_config: dict[str, Any] | None = None,
) -> Cluster:
    node, _pause = sb.pod_node(registry, **(containerd or {}))
    agent = None
    if nodeagent:
        cfg = {"podPulls": {"kubeconfig": NODE_KUBECONFIG}}
        for k, v in (agent_config or {}).items():
            cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
        agent = sb.nodeagent(node, start=False, config=cfg)
    kl = Kubelet(
        sb.dir / f"kubelet-{uuid.uuid4().hex[:6]}",
        runtime_endpoint=node.endpoint,
        image_endpoint=agent.proxy_endpoint if agent is not None else None,
        config={"registerNode": True, **(kubelet_config or {})},
    )
    cp = ControlPlane(sb.dir / "cp", node_name=kl.node_name)
    sb.callback(cp.stop)
    cp.start()
    sb.pids.extend(cp.pids)
    if agent is not None:
        # nodeagent reads registry endpoints from containerd's hosts dir (its default path under --root)
        hosts = agent.root / "etc/containerd/certs.d"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.symlink_to(node.hosts_dir, target_is_directory=True)
        target = agent.root / NODE_KUBECONFIG.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cp.node_kubeconfig, target)
        agent.start()
        sb.pids.append(agent.pid or 0)
    # The kubelet fixture runs standalone by default; the node identity comes in through --kubeconfig.
    wrapper = kl.workdir / "kubelet-with-kubeconfig"
    kl.workdir.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\nexec {testbins.path("kubelet")} --kubeconfig={cp.node_kubeconfig} "$@"\n')
    wrapper.chmod(0o755)
    kl.binary = str(wrapper)
    sb.callback(kl.stop)
    kl.start(timeout=180)
    if kl.pid is not None:
        sb.pids.append(kl.pid)
    wait_until(f"node {kl.node_name} registered", lambda: cp.get(f"/api/v1/nodes/{kl.node_name}"), 120)
    return Cluster(cp, node, kl, agent)
