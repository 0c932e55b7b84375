"""nodeagent's NodeConfig drop-in next to typical user-data NodeConfigs, judged by real programs.

For each user-data (cluster details only; plus a version-2 containerd fragment; plus a version-3 one;
plus kubelet ``maxPods``), ``nodeagent apply --flavor eks-al2023`` runs against a fake IMDSv2 serving
that user-data, on a tree whose ``usr/bin/containerd`` is containerd 2.2.9 (as AL2023 ships). Then:

- **nodeadm** (2026-02-13 main, ``v0.0.0-20260213141146-147b13ea3f4a``; testbins) reads the
  user-data's NodeConfig parts with our drop-in as the last part (drop-ins win) from the fake IMDS
  (``AWS_EC2_METADATA_SERVICE_ENDPOINT``): ``nodeadm config check`` must accept it; and
  ``nodeadm config dump -c imds://user-data -c file://ROOT/etc/eks/nodeadm.d/`` (the sources
  nodeadm-run reads, in its order; the real MIME user-data, nodeagent's own part included; a
  ``file://`` source may be a directory) must show the merged NodeConfig with the user's cluster,
  ``maxPods`` and containerd fragment keys and nodeagent's kubelet pull settings and containerd
  fragment keys (ours win a key both set). nodeadm merges the ``spec.containerd.config`` strings as
  TOML and re-serialises them when there are two, so the keys are compared, not the text;
- **the containerd config current nodeadm writes** from those fragments is assembled the way
  nodeadm's source does it (``internal/containerd/config.go``: version-3 template when the merged
  fragments mention ``io.containerd.cri.v1.images``/``runtime``, else version 2; fragments merged
  into it key by key; ``containerd config migrate`` after a version-2 template; only the template
  keys that matter here, labelled below), and **containerd 2.2.9** judges it: ``containerd config
  dump`` must show the user's setting and nodeagent's values in effect, and containerd started on it
  must take the pull path nodeagent said it would, never falling back to local pull because of us.
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomlkit
import yaml

from nodeagent.eks.userdata import (
    CONTENT_TYPE,
    NODECONFIG_CONTENT_TYPE,
    ClusterDetails,
    nodeconfig,
    render_mime,
)
from tests.fakes.imds import FakeImds
from tests.integration.test_apply_pullpath import FALLBACK, PullNode, built
from tests.integration.test_eks_userdata import apply_process
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

CLUSTER = ClusterDetails(
    "my-cluster", "https://ABCD.gr7.us-west-2.eks.amazonaws.com", "Y2E=", "10.100.0.0/16"
)
NODEAGENT_PART = """apiVersion: nodeagent.io/v1alpha1
kind: NodeAgentConfig
kubelet:
  maxParallelImagePulls: 4
containerd:
  maxConcurrentDownloads: 6
  imagePullProgressTimeout: 7m
  restartCommand: []
"""
V2_FRAGMENT = '[plugins."io.containerd.grpc.v1.cri".containerd]\ndiscard_unpacked_layers = false\n'
V3_FRAGMENT = "[plugins.'io.containerd.cri.v1.images']\ndiscard_unpacked_layers = false\n"
# The image keys of nodeadm's containerd templates (awslabs/amazon-eks-ami nodeadm/internal/containerd/
# config.template.toml and config2.template.toml), the ones this test is about; nothing else of them.
NODEADM_TEMPLATE = {
    2: (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\ndiscard_unpacked_layers = true\n'
        '[plugins."io.containerd.grpc.v1.cri"]\nsandbox_image = "localhost/kubernetes/pause"\n'
        '[plugins."io.containerd.grpc.v1.cri".registry]\n'
        'config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"\n'
    ),
    3: (
        "version = 3\n[plugins.'io.containerd.cri.v1.images']\ndiscard_unpacked_layers = true\n"
        "[plugins.'io.containerd.cri.v1.images'.pinned_images]\nsandbox = \"localhost/kubernetes/pause\"\n"
        "[plugins.'io.containerd.cri.v1.images'.registry]\n"
        'config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"\n'
    ),
}
V3_MARKERS = ("io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime")


def user_nodeconfig(case: str) -> dict[str, Any]:
    doc = nodeconfig(CLUSTER)
    if case == "v2":
        doc["spec"]["containerd"] = {"config": V2_FRAGMENT}
    elif case == "v3":
        doc["spec"]["containerd"] = {"config": V3_FRAGMENT}
    elif case == "maxpods":
        doc["spec"]["kubelet"] = {"config": {"maxPods": 58}}
    return doc


def flat(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every leaf key of a TOML document with its table path."""
    out: dict[tuple[str, ...], Any] = {}
    for k, v in doc.items():
        out.update(flat(v, (*prefix, k)) if isinstance(v, dict) else {(*prefix, k): v})
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def nodeadm_containerd_config(fragments: list[str], containerd: Path, work: Path) -> str:
    """The config.toml current nodeadm writes for containerd 2.x (its steps, from its source)."""
    merged: dict[str, Any] = {}
    for f in fragments:
        merged = merge(merged, tomllib.loads(f))
    text = "".join(fragments)
    version = 3 if any(m in text for m in V3_MARKERS) else 2
    config = merge(tomllib.loads(NODEADM_TEMPLATE[version]), merged)
    path = work / "nodeadm-config.toml"
    path.write_text(tomlkit.dumps(config))
    if version == 2:  # nodeadm runs `containerd config migrate` after a version-2 template
        out = subprocess.run(
            [str(containerd), "--config", str(path), "config", "migrate"],
            capture_output=True,
            text=True,
            check=True,
        )
        path.write_text(out.stdout)
    return path.read_text()


@pytest.mark.parametrize("case", ["cluster", "v2", "v3", "maxpods"])
def test_nodeadm_merge_keeps_user_and_nodeagent_values(sandbox: Sandbox, tmp_path: Path, case: str) -> None:
    containerd = built("containerd")
    nodeadm = built("nodeadm")
    root = tmp_path / "T"
    for d in ("etc/nodeagent", "etc/eks/nodeadm.d", "usr/bin"):
        (root / d).mkdir(parents=True)
    (root / "usr/bin/containerd").symlink_to(containerd)
    (root / "etc/nodeagent/config.yaml").write_text(
        "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\ncontainerd:\n  restartCommand: []\n"
    )
    user = user_nodeconfig(case)
    user_text = "---\n" + yaml.safe_dump(user, sort_keys=False)
    user_data = render_mime([(CONTENT_TYPE, NODEAGENT_PART), (NODECONFIG_CONTENT_TYPE, user_text)])
    with FakeImds(user_data.encode()) as fake:
        cp = apply_process(root, fake.endpoint)
    assert cp.returncode == 0, cp.stderr
    dropin_text = (root / "etc/eks/nodeadm.d/90-nodeagent.yaml").read_text()
    dropin = yaml.safe_load(dropin_text)
    ours = dropin["spec"]["containerd"]["config"]
    # the fragment's version follows the user's fragment, and without one the installed containerd 2.2.9
    assert any(m in ours for m in V3_MARKERS) == (case != "v2"), ours
    assert dropin["spec"]["kubelet"]["config"]["maxParallelImagePulls"] == 4

    # nodeadm reads that user-data with our drop-in as its last part from the fake IMDS,
    # decodes every part, merges them and checks the result
    judged = render_mime([(NODECONFIG_CONTENT_TYPE, user_text), (NODECONFIG_CONTENT_TYPE, dropin_text)])
    with FakeImds(judged.encode()) as fake:
        check = subprocess.run(
            [str(nodeadm), "config", "check", "--config-source", "imds://user-data"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "AWS_EC2_METADATA_SERVICE_ENDPOINT": fake.endpoint},
        )
        assert "/latest/user-data" in [p for _, p, st in fake.requests if st == 200]
    assert check.returncode == 0 and "Configuration is valid" in check.stderr, check.stderr[-2000:]

    # the pinned nodeadm (2026-02) dumps the NodeConfig nodeadm-run would act on: the real user-data
    # (MIME, nodeagent's own part included) from the fake IMDS, then the drop-in directory, in that order
    with FakeImds(user_data.encode()) as fake:
        dumped = subprocess.run(
            [
                str(nodeadm),
                "config",
                "dump",
                "-c",
                "imds://user-data",
                "-c",
                f"file://{root / 'etc/eks/nodeadm.d'}/",
                "-o",
                str(tmp_path / "dump.json"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "AWS_EC2_METADATA_SERVICE_ENDPOINT": fake.endpoint},
        )
        assert "/latest/user-data" in [p for _, p, st in fake.requests if st == 200]
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    spec = json.loads((tmp_path / "dump.json").read_text())["spec"]
    assert spec["cluster"] == user["spec"]["cluster"]  # the user's
    kubelet = spec["kubelet"]["config"]
    for key, value in dropin["spec"]["kubelet"]["config"].items():  # nodeagent's pull settings
        assert kubelet[key] == value, (key, kubelet)
    if case == "maxpods":
        assert kubelet["maxPods"] == 58  # the user's
    merged_toml = flat(tomllib.loads(spec["containerd"]["config"]))
    expected = flat(tomllib.loads(user["spec"].get("containerd", {}).get("config", "")))
    expected.update(flat(tomllib.loads(ours)))  # the drop-in comes last and wins a key both set
    assert merged_toml == expected, spec["containerd"]["config"]
    if case in ("v2", "v3"):  # the user's discard_unpacked_layers = false kept beside nodeagent's keys
        assert [v for k, v in merged_toml.items() if k[-1] == "discard_unpacked_layers"] == [False]

    # containerd 2.2.9 on the config nodeagent's and the user's fragments give
    fragments = [f for f in (user["spec"].get("containerd", {}).get("config"), ours) if f]
    written = nodeadm_containerd_config(fragments, containerd, tmp_path)
    dump = subprocess.run(
        [str(containerd), "--config", str(tmp_path / "nodeadm-config.toml"), "config", "dump"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    effective = tomllib.loads(dump)["plugins"]
    images = effective["io.containerd.cri.v1.images"]
    user_discard_off = case in ("v2", "v3")
    assert images["discard_unpacked_layers"] is (not user_discard_off)  # the user's setting holds
    assert images["image_pull_progress_timeout"] == "7m0s"  # nodeagent's
    transfer = effective["io.containerd.transfer.v1.local"]["max_concurrent_downloads"]
    if user_discard_off:  # the transfer path: nodeagent's value there, the CRI one left at 3
        assert (images["max_concurrent_downloads"], transfer) == (3, 6)
        assert images["registry"]["config_path"] == "/etc/containerd/certs.d"
    else:  # nodeadm's discard_unpacked_layers = true forces local pull: the CRI value counts
        assert images["max_concurrent_downloads"] == 6
        assert images["registry"]["config_path"] == "/etc/containerd/certs.d:/etc/docker/certs.d"

    # start it (daemon paths moved into the sandbox): the pull path apply announced, no fallback of ours
    node = PullNode(sandbox, containerd)
    doc = tomlkit.parse(written)
    for key in ("root", "state"):
        doc[key] = str(node.work / key)
    doc["grpc"] = {"address": str(node.sock)}
    doc["ttrpc"] = {"address": str(node.sock) + ".ttrpc"}
    node.config_toml.write_text(tomlkit.dumps(doc))
    node.start()
    log = node.log_text()
    fallbacks = [ln for ln in log.splitlines() if FALLBACK in ln]
    note = [ln for ln in cp.stdout.splitlines() if ln.startswith("note: containerd download concurrency")]
    if user_discard_off:
        assert fallbacks == [] and "through the transfer service" in note[0]
    else:
        assert fallbacks and all("'DiscardUnpackedLayers'" in ln for ln in fallbacks), fallbacks
        assert "discard_unpacked_layers = true" in note[0]


# --- containerd.snapshotter: soci on eks-al2023 ------------------------------------------------
SOCI_CONFIG = (
    "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\ncontainerd:\n  restartCommand: []\n"
    "  snapshotter: soci\n  soci:\n    restartCommand: []\n"
)
# nodeadm's template lines for UseSOCISnapshotter (nodeadm/internal/containerd/config.template.toml:
# the CRI snapshotter keys and the proxy plugin), in version 3 (the fragment's version here)
NODEADM_SOCI_TEMPLATE = (
    "[plugins.'io.containerd.cri.v1.images']\nsnapshotter = \"soci\"\ndisable_snapshot_annotations = false\n"
    '[proxy_plugins.soci]\ntype = "snapshot"\n'
    'address = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"\n'
    '[proxy_plugins.soci.exports]\nroot = "/var/lib/soci-snapshotter-grpc"\n'
)


def nodeadm_judges(
    nodeadm: Path, user_text: str, dropin_text: str, tmp_path: Path, name: str
) -> dict[str, Any]:
    """``nodeadm config check`` on the user-data NodeConfig with the drop-in as its last part (must be
    valid), and the NodeConfig spec ``nodeadm config dump`` shows for the same two sources."""
    judged = render_mime([(NODECONFIG_CONTENT_TYPE, user_text), (NODECONFIG_CONTENT_TYPE, dropin_text)])
    with FakeImds(judged.encode()) as fake:
        env = {**os.environ, "AWS_EC2_METADATA_SERVICE_ENDPOINT": fake.endpoint}
        check = subprocess.run(
            [str(nodeadm), "config", "check", "--config-source", "imds://user-data"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        out = tmp_path / f"{name}.json"
        dumped = subprocess.run(
            [str(nodeadm), "config", "dump", "-c", "imds://user-data", "-o", str(out)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    assert check.returncode == 0 and "Configuration is valid" in check.stderr, check.stderr[-2000:]
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    spec: dict[str, Any] = json.loads(out.read_text())["spec"]
    return spec


def test_nodeadm_judges_the_soci_settings(tmp_path: Path) -> None:
    """``containerd.snapshotter: soci`` with ``--flavor eks-al2023``, judged by nodeadm, containerd 2.2.9
    and soci-snapshotter-grpc v0.16.1:

    - on this 2-vCPU machine (below nodeadm's FastImagePull minimum of 4 CPUs and 7 GiB) apply writes
      SOCI's config file and puts the proxy plugin and CRI snapshotter keys into the NodeConfig's
      containerd fragment; nodeadm accepts the NodeConfig and its dump keeps every one of those keys
      next to the user's; containerd runs CRI with snapshotter soci through the proxy plugin on the
      config nodeadm writes from it; soci-snapshotter-grpc reads the file apply wrote;
    - for an 8-vCPU, 16 GiB node (the same render, node facts of that size) the drop-in carries
      ``featureGates.FastImagePull: true`` and no SOCI keys of its own: nodeadm accepts the gate and
      its dump has it; containerd on nodeadm's template with SOCI plus our fragment is valid and
      keeps snapshot annotations on.
    """
    import dataclasses

    from nodeagent.apply.facts import gather
    from nodeagent.apply.targets import nodeadm as nodeadm_target
    from nodeagent.config.loader import load_text
    from nodeagent.util.paths import Paths

    containerd = built("containerd")
    nodeadm = built("nodeadm")
    soci = built("soci-snapshotter")
    root = tmp_path / "T"
    for d in ("etc/nodeagent", "etc/eks/nodeadm.d", "usr/bin", "usr/local/bin"):
        (root / d).mkdir(parents=True)
    (root / "usr/bin/containerd").symlink_to(containerd)
    (root / "usr/local/bin/soci-snapshotter-grpc").symlink_to(soci)
    (root / "etc/nodeagent/config.yaml").write_text(SOCI_CONFIG)
    user = user_nodeconfig("v3")
    user_text = "---\n" + yaml.safe_dump(user, sort_keys=False)
    with FakeImds(render_mime([(NODECONFIG_CONTENT_TYPE, user_text)]).encode()) as fake:
        cp = apply_process(root, fake.endpoint)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert (
        "snapshotter soci configured directly (nodeadm's FastImagePull would not apply: 2 CPUs" in cp.stdout
    )
    dropin_text = (root / "etc/eks/nodeadm.d/90-nodeagent.yaml").read_text()
    dropin = yaml.safe_load(dropin_text)
    assert "featureGates" not in dropin["spec"]
    ours = flat(tomllib.loads(dropin["spec"]["containerd"]["config"]))
    soci_keys = {
        ("proxy_plugins", "soci", "type"): "snapshot",
        ("proxy_plugins", "soci", "address"): "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock",
        ("proxy_plugins", "soci", "exports", "root"): "/var/lib/soci-snapshotter-grpc",
        ("plugins", "io.containerd.cri.v1.images", "snapshotter"): "soci",
        ("plugins", "io.containerd.cri.v1.images", "disable_snapshot_annotations"): False,
    }
    assert {k: ours.get(k) for k in soci_keys} == soci_keys, ours

    spec = nodeadm_judges(nodeadm, user_text, dropin_text, tmp_path, "direct")
    merged = flat(tomllib.loads(spec["containerd"]["config"]))
    assert {k: merged.get(k) for k in soci_keys} == soci_keys, spec["containerd"]["config"]
    assert (
        merged[("plugins", "io.containerd.cri.v1.images", "discard_unpacked_layers")] is False
    )  # the user's
    assert not spec.get("featureGates", {}).get("FastImagePull")

    # containerd 2.2.9 on the config nodeadm writes (no FastImagePull: its template has no SOCI part)
    written = nodeadm_containerd_config(
        [V3_FRAGMENT, dropin["spec"]["containerd"]["config"]], containerd, tmp_path
    )
    assert 'snapshotter = "soci"' in written
    dump = tomllib.loads(
        subprocess.run(
            [str(containerd), "--config", str(tmp_path / "nodeadm-config.toml"), "config", "dump"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    plugin = dump["proxy_plugins"]["soci"]
    assert (plugin["type"], plugin["address"], plugin["exports"]["root"]) == (
        "snapshot",
        "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock",
        "/var/lib/soci-snapshotter-grpc",
    ), plugin
    images = dump["plugins"]["io.containerd.cri.v1.images"]
    assert (images["snapshotter"], images["disable_snapshot_annotations"]) == ("soci", False)
    # soci-snapshotter-grpc's own view of the config file apply wrote for it
    soci_file = root / "etc/soci-snapshotter-grpc/config.toml"
    soci_dump = subprocess.run(
        [str(soci), "--config", str(soci_file), "config", "dump"], capture_output=True, text=True, timeout=60
    )
    assert soci_dump.returncode == 0, soci_dump.stderr
    par = tomllib.loads(soci_dump.stdout)["pull_modes"]["parallel_pull_unpack"]
    assert par["enable"] is True
    assert (
        par["max_concurrent_downloads_per_image"]
        == tomllib.loads(soci_file.read_text())["pull_modes"]["parallel_pull_unpack"][
            "max_concurrent_downloads_per_image"
        ]
    )

    # an 8-vCPU, 16 GiB node: the same render with node facts of that size
    config = load_text(SOCI_CONFIG)
    user_data = render_mime([(NODECONFIG_CONTENT_TYPE, user_text)]).encode()
    facts = dataclasses.replace(gather(Paths(root), user_data=user_data), cpus=8, memory_bytes=16 << 30)
    doc, _, notes = nodeadm_target.node_config(config, facts)
    assert doc["spec"]["featureGates"] == {"FastImagePull": True}
    assert any("nodeadm's FastImagePull feature gate" in n for n in notes), notes
    gated = flat(tomllib.loads(doc["spec"]["containerd"]["config"]))
    assert not [k for k in gated if "proxy_plugins" in k or k[-1] == "snapshotter"], gated  # nodeadm's job
    gate_text = nodeadm_target.render_text(doc)
    spec = nodeadm_judges(nodeadm, user_text, gate_text, tmp_path, "gate")
    assert spec["featureGates"] == {"FastImagePull": True}, spec
    assert flat(tomllib.loads(spec["containerd"]["config"])) == {
        **flat(tomllib.loads(V3_FRAGMENT)),
        **gated,
    }
    # nodeadm's template with UseSOCISnapshotter, then the merged fragments: what containerd runs
    nodeadm_containerd_config(
        [NODEADM_SOCI_TEMPLATE, V3_FRAGMENT, doc["spec"]["containerd"]["config"]], containerd, tmp_path
    )
    dump = tomllib.loads(
        subprocess.run(
            [str(containerd), "--config", str(tmp_path / "nodeadm-config.toml"), "config", "dump"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    images = dump["plugins"]["io.containerd.cri.v1.images"]
    assert (images["snapshotter"], images["disable_snapshot_annotations"]) == ("soci", False)
    assert dump["proxy_plugins"]["soci"]["type"] == "snapshot"
