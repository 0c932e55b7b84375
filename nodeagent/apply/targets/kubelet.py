"""kubelet image-pull and image-GC settings, as KubeletConfiguration (kubelet.config.k8s.io/v1beta1).

``settings()`` gives the fields (used as-is by the nodeadm target inside ``spec.kubelet.config``);
``render()`` writes them as a drop-in for the kubelet's ``--config-dir`` (generic flavor): a
``*.conf`` file with its own apiVersion/kind, merged by the kubelet in file-name order over the main
config, so ours is named to sort late.

Only fields that exist in KubeletConfiguration v1beta1 are emitted, with the kubelet's own
validation rules applied (pkg/kubelet/apis/config/validation): GC percents in 0..100 and
low < high; maxParallelImagePulls >= 1 and only when serializeImagePulls is false; durations are
Go durations, non-negative, and imageMaximumGCAge (when not 0) greater than imageMinimumGCAge.
imageMaximumGCAge is left out when 0 (its default), since it needs the ImageMaximumGCAge feature
gate (beta, on by default since 1.30) on older kubelets.

With ``--config-dir`` the kubelet decodes the main ``--config`` file and encodes it again before
merging the drop-ins; the encoding leaves out empty lists and maps, so a main-config
``enforceNodeAllocatable: []`` silently becomes the default ``["pods"]`` (seen with kubelet 1.34).
``render()`` warns about every such field in a main config it finds at the usual places.
"""

from __future__ import annotations

from typing import Any

import yaml

from nodeagent.apply.facts import NodeFacts
from nodeagent.apply.targets import DesiredFile, TargetError, TargetPlan, owned_header
from nodeagent.apply.tuning import resolve
from nodeagent.config.model import Config
from nodeagent.util.durations import format_duration
from nodeagent.util.endpoints import unix_endpoint

API_VERSION = "kubelet.config.k8s.io/v1beta1"
KIND = "KubeletConfiguration"
DROPIN_NAME = "90-nodeagent.conf"

# The KubeletConfiguration v1beta1 fields this target may set (a test checks them against the API).
FIELDS = (
    "serializeImagePulls",
    "maxParallelImagePulls",
    "registryPullQPS",
    "registryBurst",
    "imageGCHighThresholdPercent",
    "imageGCLowThresholdPercent",
    "imageMinimumGCAge",
    "imageMaximumGCAge",
    "imageServiceEndpoint",
)


def image_service_endpoint(config: Config) -> str | None:
    sock = config.cri.proxy_socket
    if not sock:
        return None
    return unix_endpoint(sock)


def settings(config: Config, facts: NodeFacts) -> dict[str, Any]:
    """KubeletConfiguration fields nodeagent sets, validated with the kubelet's own rules."""
    kl = config.kubelet
    problems = []
    hi, lo = kl.image_gc_high_threshold_percent, kl.image_gc_low_threshold_percent
    for key, v in (("imageGCHighThresholdPercent", hi), ("imageGCLowThresholdPercent", lo)):
        if not 0 <= v <= 100:
            problems.append(f"kubelet.{key}: {v} must be between 0 and 100")
    if lo >= hi:
        problems.append(
            f"kubelet.imageGCLowThresholdPercent: {lo} must be less than imageGCHighThresholdPercent {hi}"
        )
    if kl.registry_pull_qps < 0:
        problems.append(f"kubelet.registryPullQPS: {kl.registry_pull_qps} must not be negative")
    if kl.registry_burst < 0:
        problems.append(f"kubelet.registryBurst: {kl.registry_burst} must not be negative")
    if kl.image_minimum_gc_age < 0:
        problems.append("kubelet.imageMinimumGCAge: must not be negative")
    if kl.image_maximum_gc_age < 0:
        problems.append("kubelet.imageMaximumGCAge: must not be negative")
    elif 0 < kl.image_maximum_gc_age <= kl.image_minimum_gc_age:
        problems.append("kubelet.imageMaximumGCAge: must be 0 or greater than imageMinimumGCAge")
    out: dict[str, Any] = {"serializeImagePulls": kl.serialize_image_pulls}
    if not kl.serialize_image_pulls:
        mpp = resolve(config, facts).max_parallel_image_pulls.value
        if mpp < 1:
            problems.append(f"kubelet.maxParallelImagePulls: {mpp} must be at least 1")
        out["maxParallelImagePulls"] = mpp
    if problems:
        raise TargetError("; ".join(problems))
    out["registryPullQPS"] = kl.registry_pull_qps
    out["registryBurst"] = kl.registry_burst
    out["imageGCHighThresholdPercent"] = hi
    out["imageGCLowThresholdPercent"] = lo
    out["imageMinimumGCAge"] = format_duration(kl.image_minimum_gc_age, go=True)
    if kl.image_maximum_gc_age > 0:
        out["imageMaximumGCAge"] = format_duration(kl.image_maximum_gc_age, go=True)
    endpoint = image_service_endpoint(config)
    if endpoint:
        out["imageServiceEndpoint"] = endpoint
    return out


def render_dropin(fields: dict[str, Any]) -> str:
    doc = {"apiVersion": API_VERSION, "kind": KIND, **fields}
    return owned_header("kubelet drop-in") + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def empty_collections(text: str) -> list[str]:
    """Top-level fields of a KubeletConfiguration (YAML or JSON) that hold an empty list or map."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return []
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        return []
    return [f"{k}: {'[]' if isinstance(v, list) else '{}'}" for k, v in doc.items() if v in ([], {})]


def config_dir_warnings(facts: NodeFacts) -> list[str]:
    out = []
    for path, text in facts.kubelet_main_configs:
        empty = empty_collections(text)
        if empty:
            out.append(
                f"{path} sets {', '.join(empty)}: with --config-dir (needed for nodeagent's drop-in) the "
                "kubelet re-encodes its main config and drops empty lists and maps, so they revert to "
                'their defaults (enforceNodeAllocatable: [] becomes ["pods"]); restate them in a drop-in '
                f"of {facts.paths.kubelet_dropin_dir} (docs/tuning.md)"
            )
    return out


CONFIG_DIR = "/etc/kubernetes/kubelet.conf.d"  # Paths.kubelet_dropin_dir on the node
RESTART = "the kubelet reads its drop-ins only when it starts: restart it (systemctl restart kubelet)"


def _flag(argv: tuple[str, ...], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def config_dir_check(facts: NodeFacts) -> tuple[list[str], list[str]]:
    """(warnings, notes when the drop-in changes) about whether the kubelet reads our drop-in: the
    running kubelet's ``--config-dir`` from ``/proc``, else what its systemd unit passes."""
    want = f"--config-dir={CONFIG_DIR}"
    fix = f"add {want} to the kubelet's command line (a drop-in of kubelet.service) and restart it"
    if facts.kubelet_process is not None:
        pid, argv = facts.kubelet_process
        given = _flag(argv, "--config-dir")
        if given is None:
            why = "has no --config-dir, so it never reads nodeagent's drop-in"
            return [f"the running kubelet (pid {pid}) {why}: {fix}"], []
        if facts.paths.host(given) != facts.paths.kubelet_dropin_dir:
            why = f"reads drop-ins from --config-dir={given}, not {CONFIG_DIR}"
            return [f"the running kubelet (pid {pid}) {why}: {fix}"], []
        return [], [f"kubelet drop-in changed; the running kubelet (pid {pid}) has {want}, and {RESTART}"]
    for path, text in facts.kubelet_units:
        if want in text or f"--config-dir {CONFIG_DIR}" in text:
            return [], [f"kubelet drop-in changed; {path} passes {want}, and {RESTART}"]
    return [], [
        f"kubelet drop-in changed; no running kubelet and no kubelet unit with {want} found to check: "
        f"the kubelet must run with {want} to read it, and {RESTART}"
    ]


def render(config: Config, facts: NodeFacts) -> TargetPlan:
    plan = TargetPlan("kubelet")
    plan.warnings.extend(config_dir_warnings(facts))
    warnings, on_change = config_dir_check(facts)
    plan.warnings.extend(warnings)
    plan.notes_on_change.extend(on_change)
    path = facts.paths.kubelet_dropin_dir / DROPIN_NAME
    plan.files.append(DesiredFile(path, render_dropin(settings(config, facts))))
    return plan
