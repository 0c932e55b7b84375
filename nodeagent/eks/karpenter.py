"""Karpenter: an EC2NodeClass (``karpenter.k8s.aws/v1``) whose ``userData`` is nodeagent's MIME part
(``eks/userdata.py``) without a NodeConfig (Karpenter appends its own, last), and an example NodePool.

No startup taint by default: the node's own identity may not remove a taint from its Node (the
NodeRestriction admission plugin refuses any taint change by a node after registration), and the
kubelet already starts only after prefetch (docs/boot-sequence.md), so a taint alone would only keep
the node empty. Opt-in (``remover_image``, ``--startup-taint``): the NodePool carries the startup
taint ``nodeagent.io/images-not-ready:NoSchedule`` and the output adds what removes it, ``nodeagent
taint-remover`` with its service account and exactly the RBAC it needs (``remover_manifests``;
eks/taintremover.py).
"""

from __future__ import annotations

from typing import Any

import yaml

from nodeagent.eks.userdata import DEFAULT_AMI_TAG, UserDataError, dump_yaml, render_al2023

REMOVER_NAME = "nodeagent-taint-remover"
REMOVER_NAMESPACE = "kube-system"
# Exactly what ``nodeagent taint-remover`` needs (tests/integration/test_karpenter_taint.py shows that
# dropping any verb breaks it and that nothing more is granted): list + watch every Node, patch one.
REMOVER_RULES = [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch", "patch"]}]


def startup_taint() -> dict[str, str]:
    from nodeagent.images.readiness import TAINT_EFFECT, TAINT_KEY

    return {"key": TAINT_KEY, "effect": TAINT_EFFECT}


def remover_manifests(image: str, max_wait: str = "15m") -> list[dict[str, Any]]:
    """ServiceAccount, ClusterRole, ClusterRoleBinding and Deployment of ``nodeagent taint-remover``
    (``image`` holds the nodeagent package with its ``nodeagent`` entry point; docs/eks.md)."""
    from nodeagent.images.readiness import TAINT_KEY

    meta = {"name": REMOVER_NAME, "namespace": REMOVER_NAMESPACE}
    labels = {"app.kubernetes.io/name": REMOVER_NAME}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": REMOVER_NAME},
            "rules": REMOVER_RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": REMOVER_NAME},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": REMOVER_NAME},
            "subjects": [{"kind": "ServiceAccount", "name": REMOVER_NAME, "namespace": REMOVER_NAMESPACE}],
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {**meta, "labels": dict(labels)},
            "spec": {
                # one is enough; two would be harmless (every removal is conditional on the version seen)
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": dict(labels)},
                "template": {
                    "metadata": {"labels": dict(labels)},
                    "spec": {
                        "serviceAccountName": REMOVER_NAME,
                        "priorityClassName": "system-cluster-critical",
                        # it may have to run on a node that still carries the taint it removes
                        "tolerations": [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [
                            {
                                "name": "taint-remover",
                                "image": image,
                                "command": ["nodeagent", "taint-remover", f"--max-wait={max_wait}"],
                                "resources": {
                                    "requests": {"cpu": "10m", "memory": "64Mi"},
                                    "limits": {"memory": "256Mi"},
                                },
                                "securityContext": {
                                    "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]},
                                },
                            }
                        ],
                    },
                },
            },
        },
    ]


def render_karpenter(
    config_text: str,
    *,
    name: str = "nodeagent",
    cluster_name: str = "${CLUSTER_NAME}",
    ami_tag: tuple[str, str] = DEFAULT_AMI_TAG,
    remover_image: str | None = None,
    max_wait: str = "15m",
) -> str:
    """EC2NodeClass + example NodePool (two YAML documents); with ``remover_image`` (the opt-in
    startup taint) the NodePool carries the startup taint and the remover's objects follow it."""
    node_class = {
        "apiVersion": "karpenter.k8s.aws/v1",
        "kind": "EC2NodeClass",
        "metadata": {"name": name},
        "spec": {
            # AL2023: Karpenter generates the NodeConfig (cluster details, maxPods, labels, taints)
            # and appends it as the LAST part after the parts of userData below.
            "amiFamily": "AL2023",
            "amiSelectorTerms": [{"tags": {ami_tag[0]: ami_tag[1]}}],
            "role": f"KarpenterNodeRole-{cluster_name}",
            "subnetSelectorTerms": [{"tags": {"karpenter.sh/discovery": cluster_name}}],
            "securityGroupSelectorTerms": [{"tags": {"karpenter.sh/discovery": cluster_name}}],
            "metadataOptions": {
                "httpEndpoint": "enabled",
                "httpProtocolIPv6": "disabled",
                "httpPutResponseHopLimit": 1,
                "httpTokens": "required",
            },
            "userData": render_al2023(config_text),
        },
    }
    node_pool: dict[str, Any] = {
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodePool",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "spec": {
                    "nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": name},
                    "requirements": [
                        {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
                        {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]},
                    ],
                }
            },
        },
    }
    pool_note = (
        "# Example NodePool. No startup taint: the kubelet starts only after nodeagent-prefetch, so a node\n"
        "# gets pods once prefetch finished or ran out of its budget (docs/eks.md, 'Image readiness').\n"
    )
    if remover_image is None:
        return "---\n" + dump_yaml(node_class) + "---\n" + pool_note + dump_yaml(node_pool)
    node_pool["spec"]["template"]["spec"]["startupTaints"] = [startup_taint()]
    pool_note = (
        "# Example NodePool with the opt-in startup taint: nodeagent on the node sets the condition\n"
        "# nodeagent.io/ImagesReady=True once its required images are present, and the taint remover below\n"
        f"# removes the taint then (or {max_wait} after registration). Apply both (docs/eks.md,\n"
        "# 'Image readiness').\n"
    )
    remover_note = (
        "# nodeagent taint-remover: the only thing that removes the startup taint (a node may not change\n"
        "# its own taints). RBAC: nodes list, watch, patch; nothing else.\n"
    )
    docs = "".join("---\n" + dump_yaml(d) for d in remover_manifests(remover_image, max_wait))
    head = "---\n" + dump_yaml(node_class) + "---\n" + pool_note + dump_yaml(node_pool)
    return head + "---\n" + remover_note + docs.removeprefix("---\n")


def karpenter_user_data(rendered: str) -> str:
    """The ``userData`` of the EC2NodeClass in ``render_karpenter``'s output."""
    for doc in yaml.safe_load_all(rendered):
        if isinstance(doc, dict) and doc.get("kind") == "EC2NodeClass":
            return str(doc["spec"]["userData"])
    raise UserDataError("no EC2NodeClass in the output")
