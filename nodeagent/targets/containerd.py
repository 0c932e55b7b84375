"""containerd image-pull settings, patched into its existing config.toml with tomlkit.

Only three settings are owned: ``max_concurrent_downloads``, ``image_pull_progress_timeout`` and the
registry ``config_path`` (the hosts directory). Where they live depends on the config version,
read from the file:

- version 2 (containerd 1.x): ``[plugins."io.containerd.grpc.v1.cri"]`` and its ``.registry`` table.
- version 3 (containerd 2.x): ``[plugins."io.containerd.cri.v1.images"]`` and its ``.registry``
  table; ``max_concurrent_downloads`` is also set on ``[plugins."io.containerd.transfer.v1.local"]``,
  which does the downloading when CRI pulls go through the transfer service (the 2.1+ default).

Every other byte of the file (comments, order, keys we do not own) is kept, and a value that
already holds what we want is not touched, so a patched file patches to itself. Version 1 files
are refused (``containerd config migrate`` first). A missing file is created as a minimal
version 2 config, which containerd 1.6+ and 2.x both read.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any

from nodeagent.config.model import Config
from nodeagent.facts import NodeFacts
from nodeagent.targets import DesiredFile, TargetError, TargetPlan, go_duration, owned_header
from nodeagent.targets.mirrors import spegel_mirrors
from nodeagent.tuning import resolve

V2_CRI = "io.containerd.grpc.v1.cri"
V3_IMAGES = "io.containerd.cri.v1.images"
V3_TRANSFER = "io.containerd.transfer.v1.local"


@dataclass(frozen=True)
class Values:
    max_concurrent_downloads: int
    image_pull_progress_timeout: str  # Go duration
    hosts_dir: str


def values(config: Config, facts: NodeFacts) -> Values:
    cd = config.containerd
    return Values(
        max_concurrent_downloads=resolve(config, facts).max_concurrent_downloads.value,
        image_pull_progress_timeout=go_duration(cd.image_pull_progress_timeout),
        hosts_dir=cd.hosts_dir,
    )


def _indent_of(table: Any) -> str | None:
    from tomlkit.items import AoT, Item, Table

    for k, item in table.value.body:
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
    table.add(key, value)
    if indent is not None:
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


def _get(container: Any, *keys: str) -> Any:
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
        v = _get(doc, "plugins", V3_IMAGES, "discard_unpacked_layers")
    else:
        v = _get(doc, "plugins", V2_CRI, "containerd", "discard_unpacked_layers")
    return bool(v)


def merged_config_path(current: str, hosts_dir: str) -> str:
    """``hosts_dir`` first, keeping directories the file already lists (containerd takes a ':' list)."""
    dirs = [d for d in current.split(":") if d]
    if hosts_dir in dirs:
        return current
    return ":".join([hosts_dir, *dirs])


def legacy_registry_settings(doc: Any, version: int) -> list[str]:
    """Deprecated registry keys that containerd refuses together with ``config_path``."""
    reg = _get(doc, *image_table_keys(version), "registry")
    found = []
    if isinstance(reg, dict):
        if reg.get("mirrors"):
            found.append("registry.mirrors")
        configs = reg.get("configs") or {}
        if isinstance(configs, dict) and any(isinstance(c, dict) and c.get("tls") for c in configs.values()):
            found.append("registry.configs.*.tls")
    return found


@dataclass
class Patched:
    text: str
    version: int
    config_path: str
    warnings: list[str]


def _wanted(doc: Any, version: int, v: Values, legacy: list[str]) -> list[tuple[tuple[str, ...], Any]]:
    """(key path, value) of every setting we own, given what the document holds now."""
    keys = image_table_keys(version)
    out: list[tuple[tuple[str, ...], Any]] = [
        ((*keys, "max_concurrent_downloads"), v.max_concurrent_downloads),
        ((*keys, "image_pull_progress_timeout"), v.image_pull_progress_timeout),
    ]
    if version >= 3:
        out.append((("plugins", V3_TRANSFER, "max_concurrent_downloads"), v.max_concurrent_downloads))
    if not legacy:
        current = _get(doc, *keys, "registry", "config_path")
        out.append(((*keys, "registry", "config_path"), merged_config_path(str(current or ""), v.hosts_dir)))
    return out


def _holds(doc: Any, path: tuple[str, ...], value: Any) -> bool:
    cur = _get(doc, *path)  # a tomllib document: plain Python values
    return type(cur) is type(value) and bool(cur == value)


def patch(text: str | None, v: Values, *, spegel: list[str] | None = None) -> Patched:
    """Patch containerd config text (None: no file yet) with our values; pure.

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
        if version not in (2, 3):
            raise TargetError(
                f"version = {version}: only containerd config versions 2 and 3 are supported "
                "(run `containerd config migrate` first)"
            )
    keys = image_table_keys(version)
    where = ".".join(keys[1:])
    legacy = legacy_registry_settings(doc, version)
    wanted = _wanted(doc, version, v, legacy)
    if text is None or not all(_holds(doc, path, value) for path, value in wanted):
        import tomlkit

        if text is not None:
            doc = tomlkit.parse(text)
        for path, value in wanted:
            _set(_table(doc, *path[:-1]), path[-1], value)
        text = tomlkit.dumps(doc)
    warnings: list[str] = []
    if legacy:
        warnings.append(
            f"containerd config sets deprecated {' and '.join(legacy)} under plugins.{where}; containerd "
            "refuses config_path together with them, so config_path was not set: move those mirrors "
            "to containerd.mirrors in the nodeagent config"
        )
    config_path = str(_get(doc, *keys, "registry", "config_path") or "")
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
    return Patched(text, version, config_path, warnings)


def fragment(version: int, v: Values, config_path: str | None = None) -> str:
    """A TOML fragment carrying only our settings (for nodeadm's ``spec.containerd.config``)."""
    import tomlkit

    doc = tomlkit.document()
    keys = image_table_keys(version)
    images = _table(doc, *keys)
    images.add("max_concurrent_downloads", v.max_concurrent_downloads)
    images.add("image_pull_progress_timeout", v.image_pull_progress_timeout)
    if version >= 3:
        _table(doc, "plugins", V3_TRANSFER).add("max_concurrent_downloads", v.max_concurrent_downloads)
    _table(doc, *keys, "registry").add("config_path", config_path or v.hosts_dir)
    return tomlkit.dumps(doc)


def render(config: Config, facts: NodeFacts) -> TargetPlan:
    plan = TargetPlan("containerd", restart_on_change=True)
    path = facts.paths.containerd_config
    try:
        p = patch(facts.containerd_config, values(config, facts), spegel=spegel_mirrors(config))
    except TargetError as e:
        raise TargetError(f"{path}: {e}") from None
    plan.warnings.extend(p.warnings)
    plan.files.append(DesiredFile(path, p.text, owned=facts.containerd_config is None))
    return plan
