"""Which path a CRI pull takes through containerd, and where it reads its settings: the local pull (CRI
image tables, ``config_path`` a ':' list) or, from containerd 2.1, the transfer service (its own
``max_concurrent_downloads``, ``config_path`` read as ONE directory) unless a CRI setting such as
``discard_unpacked_layers = true`` forces the local pull. Decided from the installed containerd version
and the config (measured: tests/integration/test_apply_pullpath.py). Used by the containerd and
nodeadm targets; pure: reads only the parsed config and facts it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nodeagent.apply.facts import ContainerdVersion
from nodeagent.apply.targets import TargetError

V2_CRI = "io.containerd.grpc.v1.cri"
V3_IMAGES = "io.containerd.cri.v1.images"
V3_TRANSFER = "io.containerd.transfer.v1.local"
TRANSFER_FROM: ContainerdVersion = (2, 1, 0)  # CRI pulls go through the transfer service from 2.1
DEFAULT_CONFIG_PATH_FROM: ContainerdVersion = (2, 2, 0)  # empty config_path means the default from 2.2
DEFAULT_CONFIG_PATH = "/etc/containerd/certs.d:/etc/docker/certs.d"
CRI_DEFAULT_DOWNLOADS = 3  # containerd's default; any other CRI value forces local pull on 2.1+
TRANSFER_KEY = ("plugins", V3_TRANSFER, "max_concurrent_downloads")


def get_in(container: Any, *keys: str) -> Any:
    t = container
    for k in keys:
        if not isinstance(t, dict) or k not in t:
            return None
        t = t[k]
    return t


def detect_version(doc: Any) -> int:
    v = doc.get("version", 1)
    if not isinstance(v, int) or isinstance(v, bool):
        raise TargetError(f"version: {v!r} is not a containerd config version")
    return int(v)


def image_table_keys(version: int) -> tuple[str, ...]:
    return ("plugins", V3_IMAGES) if version >= 3 else ("plugins", V2_CRI)


def discard_unpacked_layers(doc: Any, version: int) -> bool:
    if version >= 3:
        v = get_in(doc, "plugins", V3_IMAGES, "discard_unpacked_layers")
    else:
        v = get_in(doc, "plugins", V2_CRI, "containerd", "discard_unpacked_layers")
    return bool(v)


def version_text(v: ContainerdVersion | None) -> str:
    return "of unknown version" if v is None else ".".join(map(str, v))


def effective_config_path(current: str, containerd: ContainerdVersion | None, config_version: int) -> str:
    """What containerd reads ``config_path`` as: empty is the default from 2.2 (an unknown
    version with a version-3 config is taken as current 2.x), nothing before."""
    if current:
        return current
    new = containerd >= DEFAULT_CONFIG_PATH_FROM if containerd else config_version >= 3
    return DEFAULT_CONFIG_PATH if new else ""


def merged_config_path(current: str, hosts_dir: str) -> str:
    """``hosts_dir`` first, keeping directories the file already lists (containerd takes a ':' list)."""
    dirs = [d for d in current.split(":") if d]
    if hosts_dir in dirs:
        return current
    return ":".join([hosts_dir, *dirs])


def wanted_config_path(current: str, hosts_dir: str, path: PullPath) -> str:
    """The ``config_path`` to write. The local pull splits it at ':' and tries each directory; the
    transfer service (2.2.9, 2.4.2) takes it as ONE directory, so a list there finds no hosts.toml
    at all (measured: tests/integration/test_apply_pullpath.py): on that path only ``hosts_dir``."""
    return hosts_dir if path.transfer else merged_config_path(current, hosts_dir)


def dropped_dirs(current: str, hosts_dir: str, path: PullPath) -> list[str]:
    """Directories of ``current`` that the transfer path cannot read (so apply does not keep them)."""
    return [d for d in current.split(":") if d and d != hosts_dir] if path.transfer else []


# --- pull path -------------------------------------------------------------------------------


def cri_image_settings(doc: Any, version: int) -> dict[str, Any]:
    """The CRI image settings that decide the pull path, under their version-3 names, from a
    version 2, 3 or 4 document (containerd 2.x migrates the version-2 keys to these)."""
    out: dict[str, Any] = {}
    snapshot_keys = ("discard_unpacked_layers", "disable_snapshot_annotations")
    if version >= 3:
        pull_keys = (
            "use_local_image_pull",
            "image_pull_with_sync_fs",
            "max_concurrent_downloads",
            "registry",
        )
        sources: list[tuple[Any, tuple[str, ...]]] = [
            (get_in(doc, "plugins", V3_IMAGES), pull_keys + snapshot_keys)
        ]
    else:
        cri = get_in(doc, "plugins", V2_CRI)
        sources = [
            (cri, ("image_pull_with_sync_fs", "max_concurrent_downloads", "registry")),
            (get_in(doc, "plugins", V2_CRI, "containerd"), snapshot_keys),
        ]
    for table, keys in sources:
        if isinstance(table, Mapping):
            out.update({k: table[k] for k in keys if k in table})
    return out


def local_pull_reasons(settings: Mapping[str, Any]) -> list[str]:
    """Settings that make containerd 2.1+ leave the transfer service for CRI pulls."""
    reasons = []
    if settings.get("use_local_image_pull") is True:
        reasons.append("use_local_image_pull = true")
    if settings.get("discard_unpacked_layers") is True:
        reasons.append("discard_unpacked_layers = true")
    if settings.get("disable_snapshot_annotations") is False:
        reasons.append("disable_snapshot_annotations = false")
    if settings.get("image_pull_with_sync_fs") is True:
        reasons.append("image_pull_with_sync_fs = true")
    mcd = settings.get("max_concurrent_downloads")
    if mcd is not None and mcd != CRI_DEFAULT_DOWNLOADS:
        reasons.append(f"max_concurrent_downloads = {mcd} (not {CRI_DEFAULT_DOWNLOADS})")
    reg = settings.get("registry")
    if isinstance(reg, Mapping):
        reasons.extend(f"registry.{k}" for k in ("mirrors", "configs", "auths") if reg.get(k))
    return reasons


@dataclass(frozen=True)
class PullPath:
    transfer: bool  # True: the transfer service downloads CRI pulls; False: CRI's local pull
    reason: str


def pull_path(containerd: ContainerdVersion | None, settings: Mapping[str, Any]) -> PullPath:
    """The path containerd ``containerd`` takes for CRI pulls with these CRI image settings."""
    if containerd is None:
        return PullPath(False, "containerd version unknown: the CRI value, honoured on every version")
    name = f"containerd {version_text(containerd)}"
    if containerd < TRANSFER_FROM:
        return PullPath(False, f"{name} pulls CRI images itself (local pull)")
    reasons = local_pull_reasons(settings)
    if reasons:
        return PullPath(False, f"{name} falls back to local pull because of {', '.join(reasons)}")
    return PullPath(True, f"{name} pulls CRI images through the transfer service")


def transfer_config_path_warning(lost: list[str], hosts_dir: str, path: PullPath) -> str:
    return (
        f"config_path is set to {hosts_dir} alone: {path.reason}, which reads config_path as one "
        f"directory (a ':' list finds no hosts.toml at all), so hosts.toml files in {', '.join(lost)} "
        "are not read on this path"
    )


def downloads_note(path: PullPath, where: str) -> str:
    return f"containerd download concurrency goes to {where}: {path.reason}"


def legacy_registry_settings(doc: Any, version: int) -> list[str]:
    """Deprecated registry keys that containerd refuses together with ``config_path``."""
    reg = get_in(doc, *image_table_keys(version), "registry")
    found = []
    if isinstance(reg, dict):
        if reg.get("mirrors"):
            found.append("registry.mirrors")
        configs = reg.get("configs") or {}
        if isinstance(configs, dict) and any(isinstance(c, dict) and c.get("tls") for c in configs.values()):
            found.append("registry.configs.*.tls")
    return found
