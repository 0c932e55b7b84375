"""EKS AL2023: a NodeConfig (node.eks.aws/v1alpha1) drop-in for nodeadm.

nodeadm rewrites /etc/containerd/config.toml and the kubelet config on every boot, so on AL2023 the
settings go where nodeadm reads them: ``nodeadm-run.service`` loads ``imds://user-data`` and then
``file:///etc/eks/nodeadm.d/`` (every ``*.yaml``/``*.yml``/``*.json`` in file-name order), and merges
them with later sources taking precedence: ``spec.kubelet.config`` is merged key by key into the
KubeletConfiguration, ``spec.containerd.config`` (TOML text) is merged into its containerd config
template. Our file sorts late so its values win over user data and earlier drop-ins.

The containerd fragment must match the config version nodeadm generates (2 for containerd 1.7,
3 for containerd 2.x). It is read from the config.toml nodeadm wrote on a previous boot; without
one, version 2 is assumed and a warning says so.
"""

from __future__ import annotations

import tomllib
from typing import Any

import yaml

from nodeagent.config.model import Config
from nodeagent.facts import NodeFacts
from nodeagent.targets import DesiredFile, TargetPlan, kubelet, owned_header
from nodeagent.targets import containerd as ctd
from nodeagent.targets.mirrors import spegel_mirrors

API_VERSION = "node.eks.aws/v1alpha1"
KIND = "NodeConfig"
DROPIN_NAME = "90-nodeagent.yaml"
# nodeadm's containerd templates set these (nodeadm/internal/containerd/config*.template.toml)
NODEADM_CONFIG_PATH = "/etc/containerd/certs.d:/etc/docker/certs.d"
NODEADM_DISCARDS_UNPACKED_LAYERS = True


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str)


def containerd_version(facts: NodeFacts) -> tuple[int, str | None]:
    """(version, warning): the config version of the containerd.toml nodeadm last wrote."""
    text = facts.containerd_config
    if text:
        try:
            v = tomllib.loads(text).get("version", 1)
            if v in (2, 3):
                return int(v), None
        except tomllib.TOMLDecodeError:
            pass
    return 2, (
        f"{facts.paths.containerd_config}: no containerd config version 2 or 3 found; assumed version 2 "
        "(containerd 1.7) for the NodeConfig containerd fragment"
    )


def node_config(config: Config, facts: NodeFacts) -> tuple[dict[str, Any], list[str]]:
    warnings: list[str] = []
    version, warn = containerd_version(facts)
    if warn:
        warnings.append(warn)
    v = ctd.values(config, facts)
    toml_fragment = ctd.fragment(version, v, ctd.merged_config_path(NODEADM_CONFIG_PATH, v.hosts_dir))
    spegel = spegel_mirrors(config)
    if spegel and NODEADM_DISCARDS_UNPACKED_LAYERS:
        warnings.append(
            "nodeadm's containerd config sets discard_unpacked_layers = true and a Spegel mirror is "
            f"configured ({spegel[0]}): layers are dropped after unpacking, so Spegel has nothing to serve"
        )
    doc = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "spec": {
            "kubelet": {"config": kubelet.settings(config, facts)},
            "containerd": {"config": toml_fragment},
        },
    }
    return doc, warnings


def render_text(doc: dict[str, Any]) -> str:
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    return owned_header("nodeadm drop-in") + "---\n" + body


def render(config: Config, facts: NodeFacts) -> TargetPlan:
    plan = TargetPlan("nodeadm")
    doc, warnings = node_config(config, facts)
    plan.warnings.extend(warnings)
    plan.files.append(DesiredFile(facts.paths.nodeadm_dropin_dir / DROPIN_NAME, render_text(doc)))
    return plan
