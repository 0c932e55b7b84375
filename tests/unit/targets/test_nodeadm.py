import copy
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from nodeagent.targets import is_owned, nodeadm
from tests.unit.targets.helpers import DATA, config, facts


def _crd_schema() -> dict[str, Any]:
    """The NodeConfig v1alpha1 OpenAPI schema from the CRD, made strict for the test.

    Two adjustments, both toward Kubernetes semantics: ``kubelet.config`` values are
    ``runtime.RawExtension`` (any JSON value, nodeadm's InlineDocument), which controller-gen
    renders as ``type: object`` + ``x-kubernetes-preserve-unknown-fields``; scalars such as
    ``serializeImagePulls: false`` are what nodeadm documents, so that ``type`` is dropped. And every
    object with declared properties gets ``additionalProperties: false`` so a misspelt key fails.
    """
    crd = yaml.safe_load((DATA / "nodeadm-nodeconfig-crd.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("x-kubernetes-preserve-unknown-fields"):
                node.pop("type", None)
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


@pytest.mark.parametrize("existing_version", [None, 2, 3])
def test_node_config_validates_against_crd_and_toml_parses(
    tmp_path: Path, existing_version: int | None
) -> None:
    existing = None if existing_version is None else f"version = {existing_version}\n"
    cfg = config("containerd:\n  mirrors:\n    docker.io:\n      - endpoint: https://m.example\n")
    plan = nodeadm.render(cfg, facts(tmp_path, containerd_config=existing))
    (f,) = plan.files
    assert f.path == tmp_path / "etc/eks/nodeadm.d/90-nodeagent.yaml"
    assert is_owned(f.content)
    doc = yaml.safe_load(f.content)
    jsonschema.validate(doc, _crd_schema())
    assert doc["apiVersion"] == "node.eks.aws/v1alpha1" and doc["kind"] == "NodeConfig"
    kc = doc["spec"]["kubelet"]["config"]
    assert kc["serializeImagePulls"] is False and kc["maxParallelImagePulls"] >= 1
    toml = tomllib.loads(doc["spec"]["containerd"]["config"])
    # no containerd binary in the tree: a previous config.toml is the fallback, else 2.x is assumed
    table = "io.containerd.grpc.v1.cri" if existing_version == 2 else "io.containerd.cri.v1.images"
    images = toml["plugins"][table]
    assert images["registry"]["config_path"] == "/etc/containerd/certs.d:/etc/docker/certs.d"
    assert images["image_pull_progress_timeout"] == "5m0s"
    assert any("containerd version unknown" in w for w in plan.warnings)


def test_strict_schema_catches_a_misspelt_key() -> None:
    bad = {"apiVersion": "node.eks.aws/v1alpha1", "kind": "NodeConfig", "spec": {"kubelett": {}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _crd_schema())


def test_spegel_mirror_warns_about_nodeadm_discarding_layers(tmp_path: Path) -> None:
    cfg = config("containerd:\n  mirrors:\n    docker.io:\n      - endpoint: http://127.0.0.1:30020\n")
    plan = nodeadm.render(cfg, facts(tmp_path, containerd_config="version = 2\n"))
    assert any("discard_unpacked_layers" in w for w in plan.warnings)
