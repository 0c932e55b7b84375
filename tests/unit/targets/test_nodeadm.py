import copy
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from nodeagent.apply.facts import NodeConfigSource
from nodeagent.apply.targets import is_owned, nodeadm
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


# --- the containerd fragment next to the other NodeConfigs nodeadm merges ----------------------------

V2_USER = '[plugins."io.containerd.grpc.v1.cri".containerd]\ndiscard_unpacked_layers = false\n'
V3_USER = "[plugins.'io.containerd.cri.v1.runtime'.containerd]\ndefault_runtime_name = \"runc\"\n"


def _src(where: str, toml: str | None = None, **spec: object) -> NodeConfigSource:
    if toml is not None:
        spec["containerd"] = {"config": toml}
    return NodeConfigSource(
        where, {"apiVersion": "node.eks.aws/v1alpha1", "kind": "NodeConfig", "spec": spec}
    )


def _fragment(tmp_path: Path, *sources: NodeConfigSource, version: tuple[int, int, int] | None = (2, 2, 9)):  # type: ignore[no-untyped-def]
    plan = nodeadm.render(config(), facts(tmp_path, containerd_version=version, nodeconfigs=sources))
    doc = yaml.safe_load(plan.files[0].content)
    return tomllib.loads(doc["spec"]["containerd"]["config"]), plan


@pytest.mark.parametrize(
    ("sources", "containerd", "table"),
    [
        ((), (2, 2, 9), "io.containerd.cri.v1.images"),  # nothing else: the installed containerd
        ((), (1, 7, 27), "io.containerd.grpc.v1.cri"),
        (("v2",), (2, 2, 9), "io.containerd.grpc.v1.cri"),  # nodeadm: v2 template + config migrate
        (("v3",), (2, 2, 9), "io.containerd.cri.v1.images"),
        (("v2", "v3"), (2, 2, 9), "io.containerd.cri.v1.images"),  # nodeadm picks v3 anyway
        (("none",), (2, 2, 9), "io.containerd.cri.v1.images"),  # a NodeConfig without containerd settings
    ],
)
def test_fragment_version_matches_what_nodeadm_will_merge(
    tmp_path: Path, sources: tuple[str, ...], containerd: tuple[int, int, int], table: str
) -> None:
    texts = {"v2": V2_USER, "v3": V3_USER, "none": None}
    srcs = [_src(f"user-data part {i}", texts[s], cluster={"name": "c"}) for i, s in enumerate(sources, 1)]
    toml, plan = _fragment(tmp_path, *srcs, version=containerd)
    assert set(toml["plugins"]) <= {table, "io.containerd.transfer.v1.local"} and table in toml["plugins"]
    assert nodeadm.is_v3_fragment(plan.files[0].content) == (table == "io.containerd.cri.v1.images")
    mixed = any("version-2 containerd settings next to version-3" in w for w in plan.warnings)
    assert mixed == (sources == ("v2", "v3"))


def test_version_3_user_fragment_with_containerd_1_warns(tmp_path: Path) -> None:
    toml, plan = _fragment(tmp_path, _src("user-data", V3_USER), version=(1, 7, 27))
    assert "io.containerd.grpc.v1.cri" in toml["plugins"]
    assert any("nodeadm refuses them" in w for w in plan.warnings)


def test_nodeadm_template_forces_local_pull_so_cri_value_counts(tmp_path: Path) -> None:
    toml, plan = _fragment(tmp_path)
    images = toml["plugins"]["io.containerd.cri.v1.images"]
    assert (
        images["max_concurrent_downloads"] >= 3 and "io.containerd.transfer.v1.local" not in toml["plugins"]
    )
    assert "discard_unpacked_layers = true" in plan.notes[1]


@pytest.mark.parametrize(
    "user", [V2_USER, "[plugins.'io.containerd.cri.v1.images']\ndiscard_unpacked_layers = false\n"]
)
def test_user_turning_discard_off_opens_the_transfer_service(tmp_path: Path, user: str) -> None:
    toml, plan = _fragment(tmp_path, _src("user-data", user))
    (table,) = set(toml["plugins"]) - {"io.containerd.transfer.v1.local"}
    assert "max_concurrent_downloads" not in toml["plugins"][table]  # a CRI value would force local pull
    assert toml["plugins"]["io.containerd.transfer.v1.local"]["max_concurrent_downloads"] >= 3
    assert "through the transfer service" in plan.notes[1]
    # the transfer service reads config_path as one directory: nodeadm's two-directory value would
    # make it find no hosts.toml at all
    assert toml["plugins"][table]["registry"]["config_path"] == "/etc/containerd/certs.d"
    assert any("hosts.toml files in /etc/docker/certs.d are not read" in w for w in plan.warnings)


def test_soci_feature_gate_forces_local_pull_on_big_nodes(tmp_path: Path) -> None:
    user = _src("user-data", "[plugins.'io.containerd.cri.v1.images']\ndiscard_unpacked_layers = false\n")
    gate = _src("/etc/eks/nodeadm.d/10-soci.yaml", featureGates={"FastImagePull": True})
    toml, plan = _fragment(tmp_path, user, gate)
    assert "disable_snapshot_annotations = false" in plan.notes[1]
    assert "io.containerd.transfer.v1.local" not in toml["plugins"]


def test_user_config_path_is_kept_behind_ours(tmp_path: Path) -> None:
    user = "[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = \"/opt/certs.d\"\n"
    toml, _ = _fragment(tmp_path, _src("user-data", user))
    path = toml["plugins"]["io.containerd.cri.v1.images"]["registry"]["config_path"]
    assert path == "/etc/containerd/certs.d:/opt/certs.d"


def test_unreadable_user_fragment_is_reported(tmp_path: Path) -> None:
    _, plan = _fragment(tmp_path, _src("user-data part 2", "[plugins\n"))
    assert any(
        w.startswith("user-data part 2: spec.containerd.config is not valid TOML") for w in plan.warnings
    )
