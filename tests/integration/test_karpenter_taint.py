"""Why ``nodeagent userdata --format karpenter`` renders no startup taint (issue 15), checked against a
real kube-apiserver with ``--authorization-mode=Node,RBAC`` and the ``NodeRestriction`` admission
plugin, as on EKS (tests/sandbox/controlplane.py).

The node's own identity (``system:node:<name>`` in ``system:nodes``, the kubelet's client certificate:
the only Kubernetes identity on a node) may register its Node with a taint, may change its Node
otherwise, but may not remove the taint afterwards. So nothing on the node can lift an
image-readiness startup taint, and a rendered taint would keep every node empty.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeagent import userdata
from tests.sandbox import Sandbox
from tests.sandbox.controlplane import ControlPlane

TAINT = {"key": "nodeagent.io/images-not-ready", "value": "true", "effect": "NoSchedule"}
CONFIG = Path(__file__).resolve().parents[2] / "bootstrap/config/karpenter.yaml"


def call(
    cp: ControlPlane, kubeconfig: Path, method: str, path: str, body: Any, content_type: str
) -> tuple[int, str]:
    """One request with the client certificate of ``kubeconfig``: the node's is what the kubelet (or
    anything on the node holding its kubeconfig) presents."""
    user = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]
    ctx = ssl.create_default_context(cafile=str(cp.pki.ca_crt))
    ctx.load_cert_chain(user["client-certificate"], user["client-key"])
    req = urllib.request.Request(cp.server + path, data=json.dumps(body).encode(), method=method)
    req.add_header("Content-Type", content_type)
    req.add_header("Accept", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


MERGE = "application/merge-patch+json"


@pytest.mark.no_containerd
def test_the_node_identity_cannot_remove_its_taint_so_no_startup_taint_is_rendered(sandbox: Sandbox) -> None:
    cp = ControlPlane(sandbox.dir / "cp", node_name="na-taint-node")
    sandbox.callback(cp.stop)
    cp.start()
    sandbox.pids.extend(cp.pids)
    node = f"/api/v1/nodes/{cp.node_name}"

    # registration with the taint is allowed (the kubelet's registerWithTaints, Karpenter's startupTaints)
    status, body = call(
        cp,
        cp.node_kubeconfig,
        "POST",
        "/api/v1/nodes",
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": cp.node_name}, "spec": {"taints": [TAINT]}},
        "application/json",
    )
    assert status == 201, body
    # the node may change its own Node (a label outside the restricted domains) ...
    label = {"metadata": {"labels": {"example.com/ready": "1"}}}
    status, body = call(cp, cp.node_kubeconfig, "PATCH", node, label, MERGE)
    assert status == 200, body
    # ... but not remove (or change) its taints: NodeRestriction refuses
    status, body = call(cp, cp.node_kubeconfig, "PATCH", node, {"spec": {"taints": None}}, MERGE)
    assert status == 403, body
    assert json.loads(body)["message"].endswith(f'node "{cp.node_name}" is not allowed to modify taints')
    assert TAINT in cp.get(node)["spec"]["taints"]  # (next to TaintNodesByCondition's not-ready taint)
    # a cluster identity with RBAC on nodes (what a remover would need) can
    status, body = call(cp, cp.admin_kubeconfig, "PATCH", node, {"spec": {"taints": None}}, MERGE)
    assert status == 200, body
    assert "taints" not in cp.get(node)["spec"]

    # hence the rendered NodePool carries no startup taint
    _, pool = yaml.safe_load_all(userdata.render_karpenter(userdata.compact_config(CONFIG.read_text())))
    assert "startupTaints" not in pool["spec"]["template"]["spec"]
    assert "taints" not in pool["spec"]["template"]["spec"]
