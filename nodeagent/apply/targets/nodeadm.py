"""EKS AL2023: a NodeConfig (node.eks.aws/v1alpha1) drop-in for nodeadm.

nodeadm rewrites /etc/containerd/config.toml and the kubelet config on every boot, so on AL2023 the
settings go where nodeadm reads them: ``nodeadm-run.service`` loads ``imds://user-data`` and then
``file:///etc/eks/nodeadm.d/`` (every ``*.yaml``/``*.yml``/``*.json`` in file-name order), and merges
them with later sources taking precedence: ``spec.kubelet.config`` is merged key by key into the
KubeletConfiguration, ``spec.containerd.config`` strings are merged as TOML, key by key. Our file
sorts late so its values win over user data and earlier drop-ins.

**The containerd fragment's version** (nodeadm ``internal/containerd/config.go``): with containerd 2.x
nodeadm uses its version-3 template when the merged ``spec.containerd.config`` mentions
``io.containerd.cri.v1.images`` or ``io.containerd.cri.v1.runtime``, else its version-2 template,
merges the fragments into it and runs ``containerd config migrate``; with containerd 1.x it always
uses the version-2 template (and refuses version-3 fragments). A version-3 fragment of ours would
therefore switch a user's version-2 fragment off (its keys land in a version-3 file, where
containerd ignores them). So ours follows the others nodeadm merges (user-data parts, other
drop-ins): version 3 when any of them is version 3, version 2 when they are all version 2, and
with none, the major version of the installed containerd (facts: ``/etc/eks/containerd-version.txt``
or ``containerd --version``), never the config.toml of a previous boot (there is none at AMI build
time); that file is only the fallback when no binary answers.

**Download concurrency** follows the pull path of the config nodeadm will write: both templates set
``discard_unpacked_layers = true`` (and the SOCI variant ``disable_snapshot_annotations = false``),
which force containerd 2.1+ to local pull, so the CRI value counts; a user fragment that sets
``discard_unpacked_layers = false`` opens the transfer service, and then the transfer service's
value counts (``targets.containerd.pull_path``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from nodeagent.apply.facts import NodeConfigSource, NodeFacts
from nodeagent.apply.targets import DesiredFile, TargetPlan, kubelet, owned_header, pullpath
from nodeagent.apply.targets import containerd as ctd
from nodeagent.apply.targets.mirrors import spegel_mirrors
from nodeagent.config.model import Config

API_VERSION = "node.eks.aws/v1alpha1"
KIND = "NodeConfig"
DROPIN_NAME = "90-nodeagent.yaml"
# nodeadm's containerd templates set these (nodeadm/internal/containerd/config*.template.toml)
NODEADM_CONFIG_PATH = "/etc/containerd/certs.d:/etc/docker/certs.d"
NODEADM_DISCARDS_UNPACKED_LAYERS = True
# nodeadm's test for its version-3 template (Version3configInNodeConfig)
V3_MARKERS = ("io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime")
# nodeadm's SOCI snapshotter (feature gate FastImagePull) is used from 4 CPUs and 7 GiB on
SOCI_MIN_CPUS, SOCI_MIN_MEMORY = 4, 7 * 2**30


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str)


def is_v3_fragment(text: str) -> bool:
    return any(m in text for m in V3_MARKERS)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _spec(src: NodeConfigSource, *keys: str) -> Any:
    t: Any = src.doc.get("spec")
    for k in keys:
        if not isinstance(t, Mapping):
            return None
        t = t.get(k)
    return t


@dataclass
class Containerd:
    """What nodeadm will do with containerd, and how our fragment fits it."""

    version: int  # config version of our fragment
    settings: dict[str, Any]  # CRI image settings of the config nodeadm writes (v3 names)
    config_path: str  # registry config_path of that config, before ours
    warnings: list[str] = field(default_factory=list)


def _installed_major(facts: NodeFacts, warnings: list[str]) -> int:
    if facts.containerd_version is not None:
        return facts.containerd_version[0]
    text = facts.containerd_config
    if text:
        try:
            v = tomllib.loads(text).get("version")
        except tomllib.TOMLDecodeError:
            v = None
        if v in ctd.SUPPORTED_VERSIONS:
            major = 1 if v == 2 else 2
            warnings.append(
                f"containerd version unknown (no binary under the root answered --version); "
                f"{facts.paths.containerd_config} is version {v}, so containerd {major}.x is assumed"
            )
            return major
    warnings.append(
        "containerd version unknown (no binary under the root answered --version, no config.toml): "
        "containerd 2.x (what AL2023 ships) is assumed for the NodeConfig containerd fragment"
    )
    return 2


def containerd_plan(facts: NodeFacts) -> Containerd:
    """The fragment version and the containerd config nodeadm will write from the other sources."""
    warnings: list[str] = list(facts.nodeconfig_warnings)
    fragments: list[tuple[str, str, dict[str, Any]]] = []
    for src in facts.nodeconfigs:
        text = _spec(src, "containerd", "config")
        if not isinstance(text, str) or not text.strip():
            continue
        try:
            fragments.append((src.where, text, tomllib.loads(text)))
        except tomllib.TOMLDecodeError as e:
            warnings.append(
                f"{src.where}: spec.containerd.config is not valid TOML ({e}); nodeadm will fail on it"
            )
    v3 = [w for w, t, _ in fragments if is_v3_fragment(t)]
    v2 = [w for w, t, _ in fragments if not is_v3_fragment(t)]
    major = _installed_major(facts, warnings)
    if major >= 2:
        version = 3 if v3 or not v2 else 2
        if v3 and v2:
            warnings.append(
                f"{', '.join(v2)}: version-2 containerd settings next to version-3 ones ({', '.join(v3)}): "
                "nodeadm uses its version-3 template and containerd ignores the version-2 keys; "
                "write them as version 3"
            )
    else:
        version = 2
        if v3:
            warnings.append(
                f"{', '.join(v3)}: version-3 containerd settings with containerd {major}.x: "
                "nodeadm refuses them (only containerd 2.x reads version 3)"
            )
    merged: dict[str, Any] = {}
    for _, _, doc in fragments:
        merged = _merge(merged, doc)
    settings: dict[str, Any] = {"discard_unpacked_layers": NODEADM_DISCARDS_UNPACKED_LAYERS}
    gates: dict[str, Any] = {}
    for src in facts.nodeconfigs:
        g = _spec(src, "featureGates")
        if isinstance(g, Mapping):
            gates.update(g)
    soci = gates.get("FastImagePull") is True and version == 3
    if soci and facts.cpus >= SOCI_MIN_CPUS and facts.memory_bytes >= SOCI_MIN_MEMORY:
        settings["disable_snapshot_annotations"] = False
    settings.update(pullpath.cri_image_settings(merged, version))
    reg = pullpath.get_in(merged, *pullpath.image_table_keys(version), "registry", "config_path")
    config_path = reg if isinstance(reg, str) and reg else NODEADM_CONFIG_PATH
    return Containerd(version, settings, config_path, warnings)


def node_config(config: Config, facts: NodeFacts) -> tuple[dict[str, Any], list[str], list[str]]:
    """(NodeConfig document, warnings, notes)."""
    from nodeagent.apply.targets import soci as soci_target

    plan = containerd_plan(facts)
    warnings = plan.warnings
    v = ctd.values(config, facts)
    gate = soci_by_feature_gate(config, facts, plan.version)
    if gate or not soci_target.enabled(config):
        v = dataclasses.replace(v, snapshotter=())
    if soci_target.enabled(config):
        plan.settings["disable_snapshot_annotations"] = False  # nodeadm's template or ours
    containerd = facts.containerd_version
    path = pullpath.pull_path(containerd, plan.settings)
    where = (
        f"plugins.{pullpath.V3_TRANSFER}"
        if path.transfer
        else f"plugins.{pullpath.image_table_keys(plan.version)[1]}"
    )
    notes = [
        f"NodeConfig containerd fragment is version {plan.version} "
        f"(containerd {pullpath.version_text(containerd)}{', other fragments' if facts.nodeconfigs else ''})",
        pullpath.downloads_note(path, where),
    ]
    toml_fragment = ctd.fragment(
        plan.version,
        v,
        pullpath.wanted_config_path(plan.config_path, v.hosts_dir, path),
        transfer=path.transfer,
    )
    lost = pullpath.dropped_dirs(plan.config_path, v.hosts_dir, path)
    if lost:
        warnings.append(pullpath.transfer_config_path_warning(lost, v.hosts_dir, path))
    spegel = spegel_mirrors(config)
    if spegel and plan.settings.get("discard_unpacked_layers") is True:
        warnings.append(
            "nodeadm's containerd config sets discard_unpacked_layers = true and a Spegel mirror is "
            f"configured ({spegel[0]}): layers are dropped after unpacking, so Spegel has nothing to serve"
        )
    spec: dict[str, Any] = {
        "kubelet": {"config": kubelet.settings(config, facts)},
        "containerd": {"config": toml_fragment},
    }
    if soci_target.enabled(config):
        notes.append(soci_eks_note(gate, config, facts, plan.version))
    if gate:
        spec["featureGates"] = {"FastImagePull": True}
    doc = {"apiVersion": API_VERSION, "kind": KIND, "spec": spec}
    return doc, warnings, notes


def soci_by_feature_gate(config: Config, facts: NodeFacts, version: int) -> bool:
    """SOCI parallel pull through nodeadm's FastImagePull gate: only where nodeadm honours it
    (containerd config version 3, at least 4 CPUs and 7 GiB: nodeadm's UseSOCISnapshotter) and no
    concurrency value is set explicitly (nodeadm writes its own fixed soci-snapshotter config)."""
    sc = config.containerd.soci
    if config.containerd.snapshotter != "soci" or sc.pull_mode != "parallel":
        return False
    explicit = [
        sc.max_concurrent_downloads,
        sc.max_concurrent_downloads_per_image,
        sc.chunk_size_mib,
        sc.max_concurrent_unpacks,
        sc.max_concurrent_unpacks_per_image,
    ]
    if any(x != "auto" for x in explicit) or not sc.discard_unpacked_layers:
        return False
    if sc.config_file != "/etc/soci-snapshotter-grpc/config.toml":
        return False
    return version == 3 and facts.cpus >= SOCI_MIN_CPUS and facts.memory_bytes >= SOCI_MIN_MEMORY


def soci_eks_note(gate: bool, config: Config, facts: NodeFacts, version: int) -> str:
    if gate:
        return (
            "snapshotter soci: nodeadm's FastImagePull feature gate (this node has "
            f"{facts.cpus} CPUs and {facts.memory_gib:.1f} GiB, nodeadm's minimum is {SOCI_MIN_CPUS} CPUs "
            f"and {SOCI_MIN_MEMORY // 2**30} GiB): nodeadm writes soci-snapshotter's config with its own "
            "fixed values (20 downloads per image, 16mb chunks, 12 unpacks per image), not the sized ones"
        )
    why = (
        f"containerd config version {version}"
        if version != 3
        else f"{facts.cpus} CPUs and {facts.memory_gib:.1f} GiB, below nodeadm's minimum of "
        f"{SOCI_MIN_CPUS} CPUs and {SOCI_MIN_MEMORY // 2**30} GiB"
        if facts.cpus < SOCI_MIN_CPUS or facts.memory_bytes < SOCI_MIN_MEMORY
        else f"pull mode {config.containerd.soci.pull_mode} or values set in the nodeagent config"
    )
    return (
        f"snapshotter soci configured directly (nodeadm's FastImagePull would not apply: {why}): "
        f"{config.containerd.soci.config_file} and the NodeConfig's containerd fragment"
    )


def render_text(doc: dict[str, Any]) -> str:
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    return owned_header("nodeadm drop-in") + "---\n" + body


def render(config: Config, facts: NodeFacts) -> TargetPlan:
    plan = TargetPlan("nodeadm")
    doc, warnings, notes = node_config(config, facts)
    plan.warnings.extend(warnings)
    plan.notes.extend(notes)
    plan.files.append(DesiredFile(facts.paths.nodeadm_dropin_dir / DROPIN_NAME, render_text(doc)))
    return plan
