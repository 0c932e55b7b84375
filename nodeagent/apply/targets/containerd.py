"""containerd image-pull settings, patched into its existing config.toml with tomlkit.

Only three settings are owned: the download concurrency, ``image_pull_progress_timeout`` and the
registry ``config_path`` (the hosts directory). Where they live depends on the config version,
read from the file:

- version 2 (containerd 1.x, also read by 2.x): ``[plugins."io.containerd.grpc.v1.cri"]`` and its
  ``.registry`` table.
- version 3 (containerd 2.x) and 4 (containerd 2.4+): ``[plugins."io.containerd.cri.v1.images"]``
  and its ``.registry`` table.

**Where the download concurrency goes** follows the pull path containerd will use for CRI pulls
(``pull_path``; read from containerd's source, ``internal/cri/config.CheckLocalImagePullConfigs``):

- containerd 1.6/1.7 and 2.0 always pull CRI images themselves ("local pull"): the CRI
  ``max_concurrent_downloads`` counts.
- containerd 2.1+ pulls them through the transfer service, whose own
  ``[plugins."io.containerd.transfer.v1.local"].max_concurrent_downloads`` counts, unless the CRI
  images config holds a setting the transfer service does not support: ``use_local_image_pull =
  true``, ``discard_unpacked_layers = true`` (nodeadm's templates), ``disable_snapshot_annotations =
  false`` (SOCI), ``image_pull_with_sync_fs = true``, ``registry.mirrors``/``configs``/``auths``, or a
  CRI ``max_concurrent_downloads`` other than 3. Then containerd logs "Falling back to local image
  pull mode" and the CRI value counts.

So on the transfer path the concurrency goes to the transfer service and a CRI value we wrote
before is set back to 3 (a CRI value other than 3 would itself force local pull); on the local
path it goes to the CRI table. The CRI ``max_concurrent_downloads`` is nodeagent's key, so it is never
counted as a reason for local pull. An unknown containerd version is treated as local pull (the CRI
value is honoured on every version).

``config_path`` follows the path too. The local pull splits it at ':' and tries each directory:
``hostsDir`` goes first and the directories already listed stay, an empty value being read as
containerd reads it (from 2.2 the default ``/etc/containerd/certs.d:/etc/docker/certs.d``; 1.6 to
2.1 no hosts directory at all). The transfer service takes the whole value as one directory (a list
finds no hosts.toml at all; measured with 2.2.9 and 2.4.2), so there it is ``hostsDir`` alone, with
a warning naming what was left out.

Every other byte of the file (comments, order, keys we do not own) is kept, and a value that
already holds what we want is not touched, so a patched file patches to itself. Version 1 files
are refused (``containerd config migrate`` first). A missing file is created as a minimal
version 2 config, which containerd 1.6+ and 2.x both read.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any

from nodeagent.apply.facts import ContainerdVersion, NodeFacts
from nodeagent.apply.targets import DesiredFile, TargetError, TargetPlan, owned_header
from nodeagent.apply.targets.mirrors import spegel_mirrors
from nodeagent.apply.targets.pullpath import (
    CRI_DEFAULT_DOWNLOADS,
    TRANSFER_KEY,
    V3_TRANSFER,
    PullPath,
    cri_image_settings,
    detect_version,
    discard_unpacked_layers,
    downloads_note,
    dropped_dirs,
    effective_config_path,
    get_in,
    image_table_keys,
    legacy_registry_settings,
    pull_path,
    transfer_config_path_warning,
    wanted_config_path,
)
from nodeagent.apply.tuning import resolve
from nodeagent.config.model import Config
from nodeagent.util.durations import format_duration

# config versions: 2 (containerd 1.x), 3 (2.0+), 4 (2.4+: the CRI image tables as in 3, the server
# addresses moved under plugins)
SUPPORTED_VERSIONS = (2, 3, 4)


@dataclass(frozen=True)
class Values:
    max_concurrent_downloads: int
    image_pull_progress_timeout: str  # Go duration
    hosts_dir: str
    # the snapshotter settings (proxy plugin, CRI snapshotter) for config versions 2 and 3+;
    # empty: containerd's own overlayfs
    snapshotter: tuple[tuple[tuple[tuple[str, ...], Any], ...], ...] = ()

    def snapshotter_settings(self, version: int) -> list[tuple[tuple[str, ...], Any]]:
        if not self.snapshotter:
            return []
        return list(self.snapshotter[0] if version < 3 else self.snapshotter[1])


def values(config: Config, facts: NodeFacts) -> Values:
    from nodeagent.apply.targets import soci

    cd = config.containerd
    snap: tuple[tuple[tuple[tuple[str, ...], Any], ...], ...] = ()
    if soci.enabled(config):
        snap = (tuple(soci.containerd_settings(config, 2)), tuple(soci.containerd_settings(config, 3)))
    return Values(
        max_concurrent_downloads=resolve(config, facts).max_concurrent_downloads.value,
        image_pull_progress_timeout=format_duration(cd.image_pull_progress_timeout, go=True),
        hosts_dir=cd.hosts_dir,
        snapshotter=snap,
    )


def _indent_of(table: Any) -> str | None:
    from tomlkit.items import AoT, Item, Table

    body = getattr(getattr(table, "value", None), "body", None)
    if body is None:  # a table defined in pieces ([a.b] before [a], as nodeadm's template does)
        return None
    for k, item in body:
        if k is not None and isinstance(item, Item) and not isinstance(item, Table | AoT):
            indent: str = item.trivia.indent
            return indent
    return None


def _set(table: Any, key: str, value: Any) -> bool:
    """Set ``table[key] = value`` keeping the rest byte-for-byte; False if it already held it."""
    from tomlkit.items import Item

    if key in table:
        cur = table[key]
        if type(cur.unwrap() if isinstance(cur, Item) else cur) is type(value) and cur == value:
            return False
        table[key] = value
        return True
    indent = _indent_of(table)
    if indent is None:
        table[key] = value
        return True
    table.add(key, value)
    table.item(key).trivia.indent = indent
    return True


def _table(container: Any, *keys: str) -> Any:
    """The nested table at ``keys``, created (as implicit super tables where possible) if missing."""
    t = container
    for i, k in enumerate(keys):
        if k not in t:
            import tomlkit

            t.add(k, tomlkit.table(is_super_table=i < len(keys) - 1))
        t = t[k]
        if not isinstance(t, dict):
            raise TargetError(f"{'.'.join(keys[: i + 1])}: expected a table")
    return t


@dataclass
class Patched:
    text: str
    version: int
    config_path: str
    warnings: list[str]
    pull: PullPath


def _wanted(
    doc: Any, version: int, v: Values, legacy: list[str], path: PullPath, containerd: ContainerdVersion | None
) -> list[tuple[tuple[str, ...], Any]]:
    """(key path, value) of every setting we own, given what the document holds now."""
    keys = image_table_keys(version)
    out: list[tuple[tuple[str, ...], Any]] = []
    if path.transfer:
        if get_in(doc, *keys, "max_concurrent_downloads") is not None:  # ours from before: back to 3
            out.append(((*keys, "max_concurrent_downloads"), CRI_DEFAULT_DOWNLOADS))
    else:
        out.append(((*keys, "max_concurrent_downloads"), v.max_concurrent_downloads))
    out.append(((*keys, "image_pull_progress_timeout"), v.image_pull_progress_timeout))
    if path.transfer:
        out.append((TRANSFER_KEY, v.max_concurrent_downloads))
    if not legacy:
        current = effective_config_path(
            str(get_in(doc, *keys, "registry", "config_path") or ""), containerd, version
        )
        out.append(((*keys, "registry", "config_path"), wanted_config_path(current, v.hosts_dir, path)))
    out.extend(v.snapshotter_settings(version))
    return out


def _holds(doc: Any, path: tuple[str, ...], value: Any) -> bool:
    cur = get_in(doc, *path)  # a tomllib document: plain Python values
    return type(cur) is type(value) and bool(cur == value)


def patch(
    text: str | None,
    v: Values,
    *,
    spegel: list[str] | None = None,
    containerd: ContainerdVersion | None = None,
) -> Patched:
    """Patch containerd config text (None: no file yet) with our values for containerd version
    ``containerd`` (None: unknown); pure.

    The file is read with tomllib first; when it already holds every value (each boot after the
    first), it is returned as it is without loading tomlkit at all.
    """
    if text is None or not text.strip():
        import tomlkit

        doc: Any = tomlkit.document()
        doc.add(tomlkit.comment(owned_header("containerd config").strip()[2:]))
        doc.add("version", 2)
        version = 2
        text = None
    else:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise TargetError(f"not valid TOML: {e}") from None
        version = detect_version(doc)
        if version not in SUPPORTED_VERSIONS:
            raise TargetError(
                f"version = {version}: only containerd config versions 2, 3 and 4 are supported "
                "(run `containerd config migrate` first)"
            )
    keys = image_table_keys(version)
    where = ".".join(keys[1:])
    original = doc
    legacy = legacy_registry_settings(doc, version)
    settings = cri_image_settings(doc, version)
    settings.pop("max_concurrent_downloads", None)  # nodeagent's own key: never a reason
    for key, value in v.snapshotter_settings(version):  # what the file will hold (SOCI)
        if key[-1] == "disable_snapshot_annotations":
            settings["disable_snapshot_annotations"] = value
    path = pull_path(containerd, settings)
    wanted = _wanted(doc, version, v, legacy, path, containerd)
    if text is None or not all(_holds(doc, key, value) for key, value in wanted):
        import tomlkit

        if text is not None:
            doc = tomlkit.parse(text)
        for key, value in wanted:
            _set(_table(doc, *key[:-1]), key[-1], value)
        text = tomlkit.dumps(doc)
    warnings: list[str] = []
    if legacy:
        warnings.append(
            f"containerd config sets deprecated {' and '.join(legacy)} under plugins.{where}; containerd "
            "refuses config_path together with them, so config_path was not set: move those mirrors "
            "to containerd.mirrors in the nodeagent config"
        )
    config_path = str(get_in(doc, *keys, "registry", "config_path") or "")
    if not legacy and path.transfer:
        before = effective_config_path(
            str(get_in(original, *keys, "registry", "config_path") or ""), containerd, version
        )
        lost = dropped_dirs(before, v.hosts_dir, path)
        if lost:
            warnings.append(transfer_config_path_warning(lost, v.hosts_dir, path))
    if not config_path:
        warnings.append(
            f"containerd config has no plugins.{where}.registry.config_path: "
            "the hosts.toml mirrors nodeagent writes are not used"
        )
    if spegel and discard_unpacked_layers(doc, version):
        warnings.append(
            "containerd discard_unpacked_layers = true together with a Spegel mirror "
            f"({spegel[0]}): layers are dropped after unpacking, so Spegel has nothing to serve"
        )
    return Patched(text, version, config_path, warnings, path)


def fragment(version: int, v: Values, config_path: str | None = None, *, transfer: bool = False) -> str:
    """A TOML fragment carrying only our settings (for nodeadm's ``spec.containerd.config``):
    the download concurrency in the transfer service when ``transfer``, else in the CRI table."""
    import tomlkit

    doc = tomlkit.document()
    keys = image_table_keys(version)
    images = _table(doc, *keys)
    if not transfer:
        images.add("max_concurrent_downloads", v.max_concurrent_downloads)
    images.add("image_pull_progress_timeout", v.image_pull_progress_timeout)
    _table(doc, *keys, "registry").add("config_path", config_path or v.hosts_dir)
    if transfer:
        _table(doc, "plugins", V3_TRANSFER).add("max_concurrent_downloads", v.max_concurrent_downloads)
    for key, value in v.snapshotter_settings(version):
        _table(doc, *key[:-1]).add(key[-1], value)
    return tomlkit.dumps(doc)


def render(config: Config, facts: NodeFacts) -> TargetPlan:
    plan = TargetPlan("containerd", restart_on_change=True)
    path = facts.paths.containerd_config
    try:
        p = patch(
            facts.containerd_config,
            values(config, facts),
            spegel=spegel_mirrors(config),
            containerd=facts.containerd_version,
        )
    except TargetError as e:
        raise TargetError(f"{path}: {e}") from None
    plan.warnings.extend(p.warnings)
    if facts.containerd_version is None:
        plan.warnings.append(
            "containerd version unknown (no containerd binary under the root answered --version): "
            "download concurrency written to the CRI table, which every version honours; on "
            "containerd 2.1+ a value other than 3 there makes CRI pulls leave the transfer service"
        )
    where = f"plugins.{V3_TRANSFER}" if p.pull.transfer else f"plugins.{image_table_keys(p.version)[1]}"
    plan.notes.append(downloads_note(p.pull, where))
    plan.files.append(DesiredFile(path, p.text, owned=facts.containerd_config is None))
    return plan
