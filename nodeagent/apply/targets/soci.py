"""The SOCI snapshotter (``containerd.snapshotter: soci``): soci-snapshotter-grpc's config file, and the
containerd settings that make CRI pull and run images with it.

soci-snapshotter-grpc (v0.16) reads ``/etc/soci-snapshotter-grpc/config.toml``; the keys written
here are its own (``config/pull_modes.go``, ``config/parallel.go``, ``docs/parallel-mode.md``):

- ``parallel``: ``[pull_modes.parallel_pull_unpack] enable = true`` with the sized concurrency
  (``max_concurrent_downloads``, ``max_concurrent_downloads_per_image``,
  ``concurrent_download_chunk_size``, ``max_concurrent_unpacks``, ``max_concurrent_unpacks_per_image``,
  ``discard_unpacked_layers``); lazy loading off.
- ``lazy``: ``[pull_modes.soci_v2] enable = true`` (images with a SOCI index start before their
  bytes are fetched; others are pulled as containerd pulls them); parallel mode off.
- ``off``: neither: SOCI stores snapshots of images containerd pulled itself.

Parallel mode uses containerd's content store (``[content_store] type = "containerd"``), as
nodeadm's FastImagePull config does, so images stay visible to CRI and to nodeagent's eviction.

containerd side (``containerd_settings``), as SOCI's docs/kubernetes.md and nodeadm's templates
write it: ``[proxy_plugins.soci]`` (``type = "snapshot"``, ``address``, ``exports.root``), and in the
CRI image table ``snapshotter = "soci"`` and ``disable_snapshot_annotations = false`` (containerd
passes the image reference and layer digests SOCI pulls by; on containerd 2.1+ this makes CRI
pulls take the local pull path).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from nodeagent.apply.facts import ContainerdVersion, NodeFacts
from nodeagent.apply.targets import DesiredFile, TargetError, TargetPlan, owned_header
from nodeagent.apply.tuning import SociTuning, resolve
from nodeagent.config.model import Config
from nodeagent.util.endpoints import unix_socket_path

SNAPSHOTTER = "soci"
# containerd before 1.7.16 miscounts a proxy snapshotter's disk use, so the kubelet's image GC and
# storage limits do not work with SOCI (soci-snapshotter docs/kubernetes.md, "Known Bugs").
SOCI_MIN_CONTAINERD: ContainerdVersion = (1, 7, 16)
DEFAULT_CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
V2_CRI = "io.containerd.grpc.v1.cri"
V3_IMAGES = "io.containerd.cri.v1.images"


def enabled(config: Config) -> bool:
    return config.containerd.snapshotter == SNAPSHOTTER


def containerd_socket(config: Config) -> str:
    """containerd's socket for SOCI's content store and CRI keychain: ``cri.endpoint`` unless that is
    SOCI's own socket (its CRI image service), then containerd's default."""
    ep = unix_socket_path(config.cri.endpoint)
    return DEFAULT_CONTAINERD_SOCKET if ep == config.containerd.soci.address else ep


def snapshotter_keys(version: int) -> tuple[str, ...]:
    """The table holding CRI's ``snapshotter`` and ``disable_snapshot_annotations``."""
    return ("plugins", V3_IMAGES) if version >= 3 else ("plugins", V2_CRI, "containerd")


def containerd_settings(config: Config, version: int) -> list[tuple[tuple[str, ...], Any]]:
    """(key path, value) containerd needs to pull and run CRI images with SOCI."""
    sc = config.containerd.soci
    table = snapshotter_keys(version)
    return [
        (("proxy_plugins", "soci", "type"), "snapshot"),
        (("proxy_plugins", "soci", "address"), sc.address),
        (("proxy_plugins", "soci", "exports", "root"), sc.root),
        ((*table, "snapshotter"), SNAPSHOTTER),
        ((*table, "disable_snapshot_annotations"), False),
    ]


def _toml_str(s: str) -> str:
    import json

    return json.dumps(s)  # a JSON string is a valid TOML basic string


def config_text(config: Config, soci: SociTuning | None) -> str:
    """soci-snapshotter-grpc's config.toml for ``config.containerd.soci`` (wholly ours)."""
    sc = config.containerd.soci
    ctd = _toml_str(containerd_socket(config))
    lines = [
        owned_header("soci-snapshotter config").rstrip("\n"),
        f"# pull mode: {sc.pull_mode}",
        "",
        "[content_store]",
        'type = "containerd"',
        f"containerd_address = {ctd}",
        "",
        "[cri_keychain]",
        "enable_keychain = true",
        f"image_service_path = {ctd}",
        "",
        "[pull_modes.soci_v1]",
        "enable = false",
        "",
        "[pull_modes.soci_v2]",
        f"enable = {'true' if sc.pull_mode == 'lazy' else 'false'}",
        "",
        "[pull_modes.parallel_pull_unpack]",
        f"enable = {'true' if sc.pull_mode == 'parallel' else 'false'}",
    ]
    if soci is not None:
        lines += [
            f"max_concurrent_downloads = {soci.max_concurrent_downloads.value}",
            f"max_concurrent_downloads_per_image = {soci.max_concurrent_downloads_per_image.value}",
            f'concurrent_download_chunk_size = "{soci.chunk_size_mib.value}mb"',
            f"max_concurrent_unpacks = {soci.max_concurrent_unpacks.value}",
            f"max_concurrent_unpacks_per_image = {soci.max_concurrent_unpacks_per_image.value}",
            f"discard_unpacked_layers = {'true' if sc.discard_unpacked_layers else 'false'}",
        ]
    return "\n".join(lines) + "\n"


def check(config: Config, facts: NodeFacts) -> None:
    """Raise TargetError when SOCI cannot be used on this node as configured (apply writes nothing)."""
    sc = config.containerd.soci
    if not any(b.is_file() for b in facts.paths.soci_binaries):
        bins = facts.paths.soci_binaries
        where = ", ".join(str(PurePosixPath("/") / b.relative_to(facts.paths.root)) for b in bins)
        raise TargetError(
            f"containerd.snapshotter is soci but soci-snapshotter-grpc is not installed ({where}): "
            "install it first, or set containerd.snapshotter: overlayfs"
        )
    v = facts.containerd_version
    if sc.pull_mode == "lazy" and v is not None and v < SOCI_MIN_CONTAINERD:
        raise TargetError(
            f"containerd.soci.pullMode lazy needs containerd {'.'.join(map(str, SOCI_MIN_CONTAINERD))} or "
            f"newer, this node has {'.'.join(map(str, v))} ({facts.containerd_version_source}): before "
            "it the kubelet miscounts SOCI's disk use (image GC and storage limits do not work)"
        )


def warnings(config: Config, facts: NodeFacts) -> list[str]:
    out = []
    sc = config.containerd.soci
    if sc.pull_mode != "off" and unix_socket_path(config.cri.endpoint) != sc.address:
        out.append(
            f"containerd.soci.pullMode {sc.pull_mode}: soci-snapshotter fetches layers itself and gets "
            "registry credentials only from CRI pulls that pass through its own image service "
            f"(cri_keychain): for private registries set cri.endpoint: unix://{sc.address}"
        )
    v = facts.containerd_version
    if v is not None and v < SOCI_MIN_CONTAINERD:
        out.append(
            f"containerd {'.'.join(map(str, v))} is older than "
            f"{'.'.join(map(str, SOCI_MIN_CONTAINERD))}: the kubelet miscounts the SOCI snapshotter's "
            "disk use, so its image GC may not free space (nodeagent's eviction still does)"
        )
    return out


def render(config: Config, facts: NodeFacts) -> TargetPlan:
    """soci-snapshotter-grpc's config file (generic flavor, and eks-al2023 where nodeadm does not
    configure SOCI itself)."""
    plan = TargetPlan("soci")
    if not enabled(config):
        return plan
    check(config, facts)
    plan.warnings.extend(warnings(config, facts))
    path = facts.paths.host(config.containerd.soci.config_file)
    plan.files.append(DesiredFile(path, config_text(config, resolve(config, facts).soci)))
    plan.notes.append(f"snapshotter soci, pull mode {config.containerd.soci.pull_mode}: {path}")
    return plan


def render_eks(config: Config, facts: NodeFacts) -> TargetPlan:
    """eks-al2023: where nodeadm's FastImagePull gate configures SOCI (the nodeadm target sets it),
    only the checks; elsewhere the config file, as on a generic node."""
    from nodeagent.apply.targets import nodeadm

    if enabled(config) and nodeadm.soci_by_feature_gate(
        config, facts, nodeadm.containerd_plan(facts).version
    ):
        check(config, facts)
        return TargetPlan("soci")
    return render(config, facts)
