"""User-data: reading nodeagent's MIME part back (tolerant of encodings) and rendering al2023/karpenter."""

from __future__ import annotations

import base64
import email
import email.policy
import gzip
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from nodeagent import config
from nodeagent.eks import karpenter, userdata
from nodeagent.eks.userdata import ClusterDetails, UserDataError, nodeagent_parts

DATA = Path(__file__).resolve().parent.parent / "data"
CA = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode()
CLUSTER = ClusterDetails("my-cluster", "https://ABCD.gr7.us-west-2.eks.amazonaws.com", CA, "10.100.0.0/16")
CONFIG = """apiVersion: nodeagent.io/v1alpha1
kind: NodeAgentConfig
kubelet:
  maxParallelImagePulls: 8
containerd:
  mirrors:
    docker.io:
      - endpoint: https://111122223333.dkr.ecr.us-west-2.amazonaws.com/v2/docker-hub
        overridePath: true
"""


def nodeconfig_schema() -> dict[str, Any]:
    crd = yaml.safe_load((DATA / "nodeadm-nodeconfig-crd.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def karpenter_schema(kind: str) -> dict[str, Any]:
    doc = yaml.safe_load((DATA / "karpenter-v1.schema.yaml").read_text())
    return {"$schema": doc["$schema"], "$defs": doc["$defs"], "$ref": f"#/$defs/{kind}"}


def mime_parts(text: str) -> list[tuple[str, str]]:
    msg = email.message_from_string(text, policy=email.policy.compat32)
    assert msg.is_multipart() and not msg.defects
    return [(p.get_content_type(), p.get_payload()) for p in msg.get_payload()]  # type: ignore[union-attr]


# --- al2023 rendering ---------------------------------------------------------------------------
def test_al2023_is_mime_with_our_part_then_nodeconfig() -> None:
    parts = mime_parts(userdata.render_al2023(CONFIG, CLUSTER))
    assert [c for c, _ in parts] == ["application/nodeagent.yaml", "application/node.eks.aws"]
    assert parts[0][1] == CONFIG


def test_nodeconfig_part_validates_against_crd_and_has_nodeadm_required_fields() -> None:
    _, body = mime_parts(userdata.render_al2023(CONFIG, CLUSTER))[1]
    doc = yaml.safe_load(body)
    jsonschema.validate(doc, nodeconfig_schema())
    assert doc["apiVersion"] == "node.eks.aws/v1alpha1" and doc["kind"] == "NodeConfig"
    # nodeadm's ValidateNodeConfig rejects a config missing any of these four
    c = doc["spec"]["cluster"]
    assert all(c[k] for k in ("name", "apiServerEndpoint", "certificateAuthority", "cidr"))
    assert base64.b64decode(c["certificateAuthority"], validate=True)


def test_crd_schema_catches_wrong_types() -> None:
    bad = {"apiVersion": "node.eks.aws/v1alpha1", "kind": "NodeConfig", "spec": {"cluster": {"name": 3}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, nodeconfig_schema())


def test_without_cluster_details_only_our_part() -> None:
    assert [c for c, _ in mime_parts(userdata.render_al2023(CONFIG))] == ["application/nodeagent.yaml"]


def test_round_trip_to_the_same_validated_config() -> None:
    rendered = userdata.render_al2023(CONFIG, CLUSTER).encode()
    ((where, text),) = nodeagent_parts(rendered)
    assert "part 1" in where
    assert config.load_text(text) == config.load_text(CONFIG)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "bad name!", "--cluster-name"),
        ("api_server_endpoint", "http://x", "https://"),
        ("certificate_authority", "not base64!", "--certificate-authority"),
        ("cidr", "10.100.0.1/16", "--cidr"),
    ],
)
def test_cluster_details_checked(field: str, value: str, message: str) -> None:
    import dataclasses

    (problem,) = dataclasses.replace(CLUSTER, **{field: value}).problems()
    assert message in problem


def test_boundary_in_content_refused() -> None:
    with pytest.raises(UserDataError, match="boundary"):
        userdata.render_al2023(CONFIG + f"# --{userdata.BOUNDARY}\n")


# --- reading: tolerated encodings ------------------------------------------------------------------
def mime(*parts: tuple[str, str, dict[str, str]]) -> bytes:
    out = ["MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="XX"', ""]
    for ctype, body, headers in parts:
        out += ["--XX", f"Content-Type: {ctype}", *[f"{k}: {v}" for k, v in headers.items()], "", body]
    out += ["--XX--", ""]
    return "\n".join(out).encode()


SHELL = ("text/x-shellscript", "#!/bin/bash\necho hi", {})


def only_text(data: bytes) -> str:
    ((_, text),) = nodeagent_parts(data)
    return text


def test_plain_part_among_others() -> None:
    assert only_text(mime(SHELL, ("application/nodeagent.yaml", CONFIG, {}))) == CONFIG


def test_whole_user_data_gzipped() -> None:
    assert only_text(gzip.compress(mime(("application/nodeagent.yaml", CONFIG, {})))).startswith(CONFIG)


def test_whole_user_data_base64() -> None:
    assert only_text(base64.b64encode(mime(("application/nodeagent.yaml", CONFIG, {})))).startswith(CONFIG)


def test_whole_user_data_gzip_then_base64() -> None:
    data = base64.b64encode(gzip.compress(mime(("application/nodeagent.yaml", CONFIG, {}))))
    assert only_text(data).startswith(CONFIG)


def test_part_with_transfer_encoding_base64() -> None:
    b64 = base64.encodebytes(CONFIG.encode()).decode()
    part = ("application/nodeagent.yaml", b64, {"Content-Transfer-Encoding": "base64"})
    assert only_text(mime(part)) == CONFIG


def test_part_base64_without_header_as_karpenter_leaves_it() -> None:
    b64 = base64.b64encode(CONFIG.encode()).decode()
    assert only_text(mime(("application/nodeagent.yaml", b64, {}))) == CONFIG


def test_part_gzipped_and_base64() -> None:
    b64 = base64.encodebytes(gzip.compress(CONFIG.encode())).decode()
    part = ("application/nodeagent.yaml", b64, {"Content-Transfer-Encoding": "base64"})
    assert only_text(mime(part)) == CONFIG


def test_single_part_document_of_our_type() -> None:
    assert only_text(b"MIME-Version: 1.0\nContent-Type: application/nodeagent.yaml\n\na: 1\n") == "a: 1\n"


def test_content_type_parameters_and_case() -> None:
    part = ("Application/NodeAgent.yaml; charset=utf-8", CONFIG, {})
    assert only_text(mime(part)).startswith(CONFIG)


def test_nested_multipart_and_several_parts_in_order() -> None:
    inner = (
        'Content-Type: multipart/mixed; boundary="YY"\n\n'
        "--YY\nContent-Type: application/nodeagent.yaml\n\nb: 2\n--YY--\n"
    )
    outer = (
        'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="XX"\n\n'
        "--XX\nContent-Type: application/nodeagent.yaml\n\na: 1\n"
        f"--XX\n{inner}"
        "--XX--\n"
    ).encode()
    found = nodeagent_parts(outer)
    assert [t.strip() for _, t in found] == ["a: 1", "b: 2"]
    assert "part 2, part 1" in found[1][0]


@pytest.mark.parametrize(
    "data",
    [
        None,
        b"",
        b"  \n",
        b"#!/bin/bash\necho hello\n",
        b"#cloud-config\npackages: [jq]\n",
        b"apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec: {}\n",
        mime(SHELL, ("application/node.eks.aws", "kind: NodeConfig", {})),
    ],
)
def test_user_data_without_our_part(data: bytes | None) -> None:
    assert nodeagent_parts(data) == []


# --- reading: errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (gzip.compress(b"MIME-Version: 1.0\n")[:-6], "gzip data is truncated"),
        (b"\x1f\x8b\x08\x00garbage-garbage", "gzip data is corrupt"),
        (b"MIME-Version: 1.0\nContent-Type: multipart/mixed\n\n--XX\n\nx\n", "not a valid MIME multi-part"),
        (
            b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="XX"\n\n--XX\n'
            b"Content-Type: application/nodeagent.yaml\n\na: 1\n",
            "not a valid MIME multi-part",
        ),
        (b"# application/nodeagent.yaml\nkubelet: {}\n", "is not a MIME multi-part document"),
        (b"apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\n", "bare NodeAgentConfig"),
    ],
)
def test_bad_user_data_is_reported(data: bytes, message: str) -> None:
    with pytest.raises(UserDataError, match=message) as e:
        nodeagent_parts(data)
    assert str(e.value).startswith("user-data")


def test_part_not_utf8() -> None:
    data = mime(("application/nodeagent.yaml", "x", {})).replace(b"\nx\n", b"\n\xff\xfe\n")
    with pytest.raises(UserDataError, match=r"user-data part 1 \(application/nodeagent.yaml\): not UTF-8"):
        nodeagent_parts(data)


def test_gzip_bomb_bounded() -> None:
    with pytest.raises(UserDataError, match="more than"):
        nodeagent_parts(gzip.compress(b"a" * (userdata.MAX_DECODED_BYTES + 10)))


# --- karpenter ---------------------------------------------------------------------------------------------
def karpenter_docs(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    node_class, node_pool = yaml.safe_load_all(text)
    return node_class, node_pool


def test_karpenter_objects_validate_against_v1_fields() -> None:
    nc, np = karpenter_docs(karpenter.render_karpenter(CONFIG, cluster_name="my-cluster"))
    jsonschema.validate(nc, karpenter_schema("EC2NodeClass"))
    jsonschema.validate(np, karpenter_schema("NodePool"))
    assert nc["spec"]["amiSelectorTerms"] == [{"tags": {"nodeagent.io/baked": "true"}}]
    assert np["spec"]["template"]["spec"]["nodeClassRef"]["name"] == nc["metadata"]["name"]
    # no startup taint: a node may not remove taints from its own Node (NodeRestriction), and
    # nothing else in this project removes one (docs/eks.md)
    assert "startupTaints" not in np["spec"]["template"]["spec"]


def test_karpenter_opt_in_startup_taint_comes_with_its_remover() -> None:
    text = karpenter.render_karpenter(
        CONFIG, remover_image="registry.example/nodeagent:0.1.0", max_wait="20m"
    )
    _, np, sa, role, binding, deploy = yaml.safe_load_all(text)
    jsonschema.validate(np, karpenter_schema("NodePool"))
    assert np["spec"]["template"]["spec"]["startupTaints"] == [
        {"key": "nodeagent.io/images-not-ready", "effect": "NoSchedule"}
    ]
    assert "taints" not in np["spec"]["template"]["spec"]  # a startup taint, not a permanent one
    assert [d["kind"] for d in (sa, role, binding, deploy)] == [
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment",
    ]  # fmt: skip
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch", "patch"]}]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["tolerations"] == [
        {"key": "nodeagent.io/images-not-ready", "operator": "Exists", "effect": "NoSchedule"}
    ]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/nodeagent:0.1.0"
    assert container["command"] == ["nodeagent", "taint-remover", "--max-wait=20m"]
    assert "&id" not in text  # plain YAML, no anchors


def test_karpenter_schema_rejects_misnamed_field() -> None:
    nc, _ = karpenter_docs(karpenter.render_karpenter(CONFIG))
    nc["spec"]["amiSelector"] = nc["spec"].pop("amiSelectorTerms")  # the pre-v1beta1 name
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(nc, karpenter_schema("EC2NodeClass"))


def test_karpenter_userdata_survives_karpenter_merge() -> None:
    """Karpenter (AL2023) re-serialises each custom part with only its Content-Type header and appends
    its own NodeConfig last (pkg/providers/amifamily/bootstrap/nodeadm.go): our part must survive."""
    nc, _ = karpenter_docs(karpenter.render_karpenter(CONFIG))
    parts = mime_parts(nc["spec"]["userData"])
    assert [c for c, _ in parts] == ["application/nodeagent.yaml"]  # no NodeConfig: Karpenter adds it
    merged = userdata.render_mime(
        [*parts, ("application/node.eks.aws", "# Karpenter Generated NodeConfig\n")]
    )
    ((_, text),) = nodeagent_parts(base64.b64encode(merged.encode()))
    assert config.load_text(text) == config.load_text(CONFIG)


def test_nodeconfig_parts_as_nodeadm_reads_them() -> None:
    from nodeagent.eks.userdata import nodeconfig_parts, render_al2023

    nc = "apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec: {}\n"
    assert nodeconfig_parts(nc.encode()) == [("user-data", nc)]  # a bare NodeConfig
    assert nodeconfig_parts(b"#!/bin/sh\necho hi\n") == []
    assert nodeconfig_parts(None) == []
    mime = render_al2023("apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\n", CLUSTER)
    ((where, text),) = nodeconfig_parts(mime.encode())
    assert where == "user-data part 2 (application/node.eks.aws)" and "kind: NodeConfig" in text
