"""Why ``nodeagent userdata --format karpenter`` renders no startup taint (issue 15), checked against a
real kube-apiserver with ``--authorization-mode=Node,RBAC`` and the ``NodeRestriction`` admission
plugin, as on EKS (tests/sandbox/controlplane.py).

The node's own identity (``system:node:<name>`` in ``system:nodes``, the kubelet's client certificate:
the only Kubernetes identity on a node) may register its Node with a taint, may change its Node
otherwise, but may not remove the taint afterwards. So nothing on the node can lift an
image-readiness startup taint, and a rendered taint would keep every node empty: by default none is
rendered. The opt-in (``--startup-taint``) renders the taint together with ``nodeagent taint-remover``
and its RBAC; the tests below run that flow against the real API server and kube-scheduler, and end
to end with the real kubelet, containerd and ``nodeagent run``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeagent.eks import karpenter, userdata
from nodeagent.images import readiness
from nodeagent.podpulls import kube
from tests.sandbox import Sandbox
from tests.sandbox.cluster import one_node_cluster
from tests.sandbox.controlplane import ControlPlane, pod_manifest
from tests.sandbox.oci import build_image, push_image
from tests.sandbox.process import Daemon, SandboxError, wait_until

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
    _, pool = yaml.safe_load_all(karpenter.render_karpenter(userdata.compact_config(CONFIG.read_text())))
    assert "startupTaints" not in pool["spec"]["template"]["spec"]
    assert "taints" not in pool["spec"]["template"]["spec"]


# --- the opt-in startup taint and its remover ---------------------------------------------------------------
REMOVER_IMAGE = (
    "registry.example/nodeagent:test"  # the Deployment is created, never run (no controllers here)
)
KEEP = {"key": "example.com/keep", "value": "1", "effect": "PreferNoSchedule"}  # someone else's taint
CAPACITY = {"cpu": "2", "memory": "4Gi", "pods": "110"}


class Remover:
    """``nodeagent taint-remover`` as a real process with the given kubeconfig; its JSON log lines."""

    def __init__(self, sandbox: Sandbox, kubeconfig: Path, name: str) -> None:
        self.log = sandbox.dir / f"{name}.log"
        argv = [
            sys.executable,
            "-m",
            "nodeagent",
            "taint-remover",
            f"--kubeconfig={kubeconfig}",
            "--max-wait=0",
        ]
        self.proc = Daemon(name, argv, self.log)
        self.proc.start()
        sandbox.pids.append(self.proc.pid or 0)
        sandbox.callback(self.proc.stop)

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def wait_for(
        self, what: str, match: Callable[[dict[str, Any]], bool], timeout: float = 60
    ) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            self.proc.check_alive()
            found[:] = [ln for ln in self.lines() if match(ln)]
            return bool(found)

        try:
            wait_until(what, seen, timeout, interval=0.1)
        except SandboxError as e:
            raise SandboxError(f"{e}\n{self.log.read_text()[-3000:]}") from None
        return found[-1]


def refused_to(verb: str) -> Callable[[dict[str, Any]], bool]:
    """A remover log line carrying the API server's 403 for ``verb`` on nodes."""
    if verb == "watch":  # the watch's HTTP error carries no reason (lightkube); the remover names it
        return lambda line: str(line.get("error", "")) == "watch nodes: API server answered 403"
    return lambda line: f'cannot {verb} resource "nodes"' in str(line.get("error", ""))


def register(cp: ControlPlane, name: str, taints: list[dict[str, str]]) -> None:
    """What the kubelet does at registration with ``registerWithTaints`` (Karpenter passes its startupTaints
    that way), with the node's own certificate: create the Node, then report its capacity."""
    kubeconfig = cp.workdir / f"{name}.kubeconfig"
    if name == cp.node_name:
        kubeconfig = cp.node_kubeconfig
    else:
        cert, key = cp.pki.issue(name, f"/O=system:nodes/CN=system:node:{name}")
        cp.write_kubeconfig(kubeconfig, cert, key, name)
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"taints": taints}}
    status, body = call(cp, kubeconfig, "POST", "/api/v1/nodes", node, "application/json")
    assert status == 201, body
    cap = {"status": {"capacity": CAPACITY, "allocatable": CAPACITY}}
    status, body = call(cp, kubeconfig, "PATCH", f"/api/v1/nodes/{name}/status", cap, MERGE)
    assert status == 200, body


def set_condition(kubeconfig: Path, node: str, missing: list[str]) -> None:
    """The node reports ImagesReady through nodeagent's own code (lightkube, the node identity)."""

    async def main() -> None:
        client = kube.load_client(kubeconfig)
        try:
            await kube.set_node_condition(client, node, readiness.condition(missing, 1, datetime.now(UTC)))
        finally:
            await client.close()

    asyncio.run(main())


def taint_keys(cp: ControlPlane, node: str) -> list[str]:
    return [t["key"] for t in cp.get(f"/api/v1/nodes/{node}")["spec"].get("taints", [])]


def bearer(cp: ControlPlane, kubeconfig: Path, method: str, path: str, body: Any = None) -> int:
    token = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
    ctx = ssl.create_default_context(cafile=str(cp.pki.ca_crt))
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(cp.server + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", MERGE)
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.mark.no_containerd
def test_opt_in_startup_taint_is_removed_by_the_rendered_remover_once_images_are_ready(
    sandbox: Sandbox,
) -> None:
    """The documented flow against the real kube-apiserver (Node,RBAC + NodeRestriction) and the real
    kube-scheduler: the taint is there at registration and keeps a pod off the node; the node's identity
    reports nodeagent.io/ImagesReady; the rendered remover, with exactly the rendered RBAC, removes the
    taint when (and only when) the condition is True, keeps every other taint, and the pod is scheduled.
    Each of the three verbs is needed (a role without it gets 403 on the remover's own request) and
    nothing more is granted. The default rendering has no taint (the test above)."""
    cp = ControlPlane(sandbox.dir / "cp", node_name="na-taint-node")
    sandbox.callback(cp.stop)
    cp.start()
    cp.start_scheduler()
    sandbox.pids.extend(cp.pids)
    node = cp.node_name

    # what the user applies: the rendered NodePool's startup taint and the remover's objects, verbatim
    rendered = karpenter.render_karpenter(
        userdata.compact_config(CONFIG.read_text()), remover_image=REMOVER_IMAGE
    )
    docs = list(yaml.safe_load_all(rendered))
    (pool,) = [d for d in docs if d["kind"] == "NodePool"]
    startup_taints = pool["spec"]["template"]["spec"]["startupTaints"]
    manifests = [d for d in docs if d["kind"] not in ("EC2NodeClass", "NodePool")]
    assert [d["kind"] for d in manifests] == [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
    ]
    for d in manifests:
        cp.apply(d)  # the API server accepts every object as rendered (the Deployment included)
    sa = manifests[0]["metadata"]
    full = cp.service_account_kubeconfig(sa["namespace"], sa["name"], sandbox.dir / "remover.kubeconfig")

    # --- less RBAC is refused: a role without one verb makes that request of the remover fail ---------
    rules = manifests[1]["rules"]
    assert rules == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch", "patch"]}]
    register(cp, "na-taint-rbac", [*startup_taints])
    rbac_node = cp.workdir / "na-taint-rbac.kubeconfig"
    set_condition(rbac_node, "na-taint-rbac", ["registry.example/required:1"])
    for verb in ("list", "watch", "patch"):
        if verb == "patch":  # now only RBAC stands between a remover and this node's taint
            set_condition(rbac_node, "na-taint-rbac", [])
        name = f"remover-without-{verb}"
        cp.apply(
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": "default"}}
        )
        verbs = [v for v in rules[0]["verbs"] if v != verb]
        cp.apply({**manifests[1], "metadata": {"name": name}, "rules": [{**rules[0], "verbs": verbs}]})
        binding = manifests[2]
        cp.apply(
            {
                **binding,
                "metadata": {"name": name},
                "roleRef": {**binding["roleRef"], "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "default"}],
            }
        )
        kc = cp.service_account_kubeconfig("default", name, sandbox.dir / f"{name}.kubeconfig")
        remover = Remover(sandbox, kc, name)
        remover.wait_for(f"{name}: 403 on {verb}", refused_to(verb))
        remover.proc.stop()
        assert "nodeagent.io/images-not-ready" in taint_keys(cp, "na-taint-rbac"), verb
    # ... and the rendered role grants nothing beyond them (no get, no update, no status)
    assert bearer(cp, full, "GET", "/api/v1/nodes") == 200
    assert bearer(cp, full, "GET", "/api/v1/nodes/na-taint-rbac") == 403
    assert (
        bearer(cp, full, "PUT", "/api/v1/nodes/na-taint-rbac", {"metadata": {"name": "na-taint-rbac"}}) == 403
    )
    patch = {"status": {"conditions": [readiness.condition([], 1, datetime.now(UTC))]}}
    # it cannot fake readiness
    assert bearer(cp, full, "PATCH", "/api/v1/nodes/na-taint-rbac/status", patch) == 403
    assert bearer(cp, full, "DELETE", "/api/v1/nodes/na-taint-rbac") == 403
    cp.request("DELETE", "/api/v1/nodes/na-taint-rbac")  # one node for the flow, so the pod has one place

    # --- the flow ----------------------------------------------------------------------------------
    register(cp, node, [*startup_taints, KEEP])
    assert taint_keys(cp, node)[:2] == ["nodeagent.io/images-not-ready", "example.com/keep"]
    # The API server's TaintNodesByCondition admission adds node.kubernetes.io/not-ready at creation and
    # only kube-controller-manager's node lifecycle controller (not run here) lifts it once the kubelet
    # reports Ready; the pod tolerates that one taint, and nothing of ours.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
            "automountServiceAccountToken": False,
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoSchedule"}
            ],
        },
    }
    cp.apply(pod)

    def unschedulable() -> str:
        conds = cp.pod("web").get("status", {}).get("conditions", [])
        return next((c.get("message", "") for c in conds if c.get("reason") == "Unschedulable"), "")

    wait_until("the scheduler reports web unschedulable", unschedulable, 60)
    # ours is the one NoSchedule taint the pod does not tolerate (1.34 names no key in the message)
    assert "1 node(s) had untolerated taint(s)" in unschedulable()

    remover = Remover(sandbox, full, "taint-remover")
    remover.wait_for(
        "the remover sees the tainted node without the condition",
        lambda ln: ln.get("msg") == "taint remover: waiting" and ln.get("node") == node,
    )
    # the node reports images missing: still waiting, the taint stays
    set_condition(cp.node_kubeconfig, node, ["registry.example/required:1"])
    remover.wait_for(
        "the remover sees ImagesReady=False",
        lambda ln: (
            ln.get("node") == node and "is False: 1 of 1 required image(s) missing" in ln.get("reason", "")
        ),
    )
    assert "nodeagent.io/images-not-ready" in taint_keys(cp, node)
    assert not cp.pod("web")["spec"].get("nodeName")

    # the node reports its images present (its own identity may: NodeRestriction allows its status)
    set_condition(cp.node_kubeconfig, node, [])
    wait_until(
        "the startup taint removed", lambda: "nodeagent.io/images-not-ready" not in taint_keys(cp, node), 60
    )
    assert taint_keys(cp, node) == ["example.com/keep", "node.kubernetes.io/not-ready"]  # the others kept
    cond = next(
        c
        for c in cp.get(f"/api/v1/nodes/{node}")["status"]["conditions"]
        if c["type"] == readiness.CONDITION_TYPE
    )
    assert (cond["status"], cond["reason"]) == ("True", "RequiredImagesPresent")
    removed = remover.wait_for(
        "the removal logged",
        lambda ln: ln.get("msg") == "taint remover: taint removed" and ln.get("node") == node,
    )
    assert removed["node"] == node and "ImagesReady is True" in removed["reason"]
    # and the scheduler places the pod that had no toleration for it
    wait_until("web scheduled to the node", lambda: cp.pod("web")["spec"].get("nodeName") == node, 60)
    rss_kib = int(Path(f"/proc/{remover.proc.pid}/status").read_text().split("VmRSS:")[1].split()[0])
    print(f"taint-remover RSS {rss_kib / 1024:.1f} MiB")


def test_the_daemon_reports_images_ready_and_the_remover_lifts_the_kubelets_startup_taint() -> None:
    """End to end on a real node: the kubelet registers with the rendered startup taint
    (``registerWithTaints``, as Karpenter makes it), ``nodeagent run`` on the node reports
    ImagesReady=False while its required image is missing from the registry, keeps trying, reports True
    once it has pulled it; the remover then lifts the taint, the scheduler places a pod without a
    toleration for it, and the kubelet runs it. (Runs once, on the default containerd line, like the
    pod-pull tests: the containerd-specific part is prefetch's, tested per line in test_prefetch.py.)"""
    with Sandbox(prefix="na-taint-") as sb:
        reg = sb.registry()
        required = f"{reg.host}/taint/required:v1"  # not pushed yet
        rendered = karpenter.render_karpenter(
            userdata.compact_config(CONFIG.read_text()), remover_image=REMOVER_IMAGE
        )
        docs = list(yaml.safe_load_all(rendered))
        (pool,) = [d for d in docs if d["kind"] == "NodePool"]
        startup_taints = pool["spec"]["template"]["spec"]["startupTaints"]
        cluster = one_node_cluster(
            sb,
            reg,
            agent_config={"images": {"prefetch": [{"image": required, "required": True}]}},
            kubelet_config={"registerWithTaints": startup_taints},
        )
        cp, node = cluster.cp, cluster.node_name
        assert cluster.agent is not None
        cp.start_scheduler()
        sb.pids.extend(cp.pids)
        assert "nodeagent.io/images-not-ready" in taint_keys(cp, node)  # there at registration

        manifests = [d for d in docs if d["kind"] not in ("EC2NodeClass", "NodePool")]
        for d in manifests:
            cp.apply(d)
        sa = manifests[0]["metadata"]
        kc = cp.service_account_kubeconfig(sa["namespace"], sa["name"], sb.dir / "remover.kubeconfig")
        remover = Remover(sb, kc, "taint-remover")
        remover.wait_for(
            "the node reports its required image missing",
            lambda ln: (
                ln.get("node") == node
                and "is False: 1 of 1 required image(s) missing" in ln.get("reason", "")
            ),
            timeout=120,
        )
        assert "nodeagent.io/images-not-ready" in taint_keys(cp, node)
        wait_until(
            "nodeagent status names the missing image",
            lambda: (
                cluster.agent is not None
                and cluster.agent.status()["sections"]["imagesReady"]["missing"] == [required]
            ),
            30,
        )

        push_image(reg, "taint/required", "v1", build_image(layers=1, layer_size=1 << 20, busybox=True))
        wait_until(
            "the startup taint removed",
            lambda: "nodeagent.io/images-not-ready" not in taint_keys(cp, node),
            120,
        )
        conds = cp.get(f"/api/v1/nodes/{node}")["status"]["conditions"]
        (cond,) = [c for c in conds if c["type"] == readiness.CONDITION_TYPE]
        assert (cond["status"], cond["message"]) == ("True", "all 1 required image(s) present")
        assert {c["type"] for c in conds} >= {"Ready", "MemoryPressure"}  # the kubelet's stay next to ours
        agent = cluster.agent

        def reported_true() -> bool:  # the status file is written off the loop, a moment later
            section = agent.status()["sections"]["imagesReady"]
            return bool((section["reported"], section["missing"]) == ("True", []))

        wait_until("nodeagent status shows ImagesReady True", reported_true, 30)

        # a pod with no toleration for our taint (only for not-ready, which no controller lifts here)
        pod = pod_manifest("web", node, [("app", required)])
        del pod["spec"]["nodeName"]
        pod["spec"]["tolerations"] = [
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoSchedule"}
        ]
        cp.create(pod)
        running = cp.wait_running("web")
        assert running["spec"]["nodeName"] == node
