"""Where a command's config comes from: the baked file, then the instance user-data (IMDSv2).

``load_for_command(args, paths)`` is the one entry point every command uses (``validate`` and
``userdata`` included), and data flows one way through it: read sources -> merge documents ->
validate once -> typed ``Config``.

1. Read the baked file (``-c FILE``, default ``/etc/nodeagent/config.yaml`` under ``--root``) and
   parse it (``yamldoc``); validate it (``loader.load_data``). An invalid baked file raises
   ``ConfigError`` (exit 2): without a valid baked config there is nothing to fall back to.
2. When IMDS is enabled (see ``imds_mode``), fetch the user-data through IMDSv2 (bounded time) and take
   every ``application/nodeagent.yaml`` part (``nodeagent.eks.userdata``), parsed the same way.
3. Merge the parts over the baked document, later wins (rules below), and validate the result once.

Merge rules (documented in docs/eks.md):
- mappings merge key by key, recursively (so ``kubelet.registryPullQPS`` alone changes only that key);
- lists replace the whole list (``images.prefetch``, ``images.protect``, a mirror's ``capabilities``);
- ``containerd.mirrors`` is a mapping of registry -> list, so user-data replaces the mirror list of each
  registry it names and leaves the other registries as baked;
- ``null`` removes the key, so the default applies (``containerd: {mirrors: {docker.io: null}}``).

What can go wrong, and what happens (the node always comes up with at least the baked config):
- IMDS disabled, no user-data, or no nodeagent part: the baked config alone, no warning.
- IMDS unreachable or refusing: the baked config alone, with a warning naming how long we waited.
- Bad user-data (unreadable MIME/gzip, broken YAML in our part, wrong types or values): the baked
  config alone, and ``userdata_error`` says exactly what and where; commands exit 1 after their work.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nodeagent.config.loader import load_data
from nodeagent.config.model import Config
from nodeagent.config.problems import ConfigError, Problem
from nodeagent.config.yamldoc import parse_yaml, read_text
from nodeagent.eks.imds import ENDPOINT_ENV, ImdsClient, ImdsError, ImdsSettings
from nodeagent.util.paths import Paths

IMDS_ENV = "NODEAGENT_IMDS"  # on | off | auto
ImdsMode = Literal["on", "off", "auto"]
USER_DATA_SOURCE = "imds:user-data"


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    sources: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    userdata_error: str | None = None
    imds_seconds: float | None = None  # time spent asking IMDS (None: IMDS not used)
    user_data: bytes | None = None  # the user-data as IMDS returned it (apply reads nodeadm's parts)
    text: str = ""  # the baked file's text as read (``userdata`` publishes it after it validated)


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge recursively, anything else replaces, None deletes."""
    out: dict[str, Any] = dict(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def imds_mode(args: argparse.Namespace, env: Mapping[str, str]) -> ImdsMode:
    """``--imds`` wins over ``NODEAGENT_IMDS``; default auto."""
    value = getattr(args, "imds", None) or env.get(IMDS_ENV, "auto")
    if value == "on":
        return "on"
    if value == "off":
        return "off"
    if value == "auto":
        return "auto"
    raise ConfigError([Problem(IMDS_ENV, f"must be on, off or auto, not {value!r}")])


def imds_enabled(args: argparse.Namespace, paths: Paths, env: Mapping[str, str]) -> bool:
    """auto: on for the eks-al2023 flavor (``--flavor eks-al2023``, or auto-detected: nodeadm present).

    Under a ``--root`` other than ``/`` (a test tree, an image being built) the tree is not this
    instance, so auto also needs an explicit endpoint (``--imds-endpoint``/``NODEAGENT_IMDS_ENDPOINT``):
    a test can never reach the real 169.254.169.254 by accident.
    """
    mode = imds_mode(args, env)
    if mode != "auto":
        return mode == "on"
    explicit_endpoint = bool(getattr(args, "imds_endpoint", None) or env.get(ENDPOINT_ENV))
    if paths.root != Path("/") and not explicit_endpoint:
        return False
    flavor = getattr(args, "flavor", "auto")
    if flavor == "eks-al2023":
        return True
    if flavor == "generic":
        return False
    from nodeagent.apply.facts import nodeadm_present  # the test apply's flavor detection uses

    return nodeadm_present(paths)


def _problems(where: str, e: ConfigError, *, lines: bool) -> str:
    out = []
    for p in e.problems:
        text = str(p) if lines else f"{p.path}: {p.message}"
        out.append(text if text.startswith(where) else f"{where}: {text}")
    return "\n".join(out)


def _read_baked(path: Path) -> tuple[str, dict[str, Any], Config]:
    """Read, parse and validate the baked file; ConfigError (path-qualified) when it is not valid."""
    text = read_text(path)
    data, ctx = parse_yaml(text, str(path))
    return text, data, load_data(data, str(path), ctx)


def _apply_parts(
    baked_path: Path, baked_doc: dict[str, Any], parts: list[tuple[str, str]]
) -> tuple[Config | None, str | None]:
    merged: dict[str, Any] = baked_doc
    for where, text in parts:
        if not text.strip():
            continue  # an empty part changes nothing
        try:
            doc, ctx = parse_yaml(text, where)  # broken YAML, duplicate keys, not a mapping: with lines
            if "apiVersion" in doc:  # a whole config: validate it alone first, for lines in the part
                load_data(doc, where, ctx)
        except ConfigError as e:
            return None, _problems(where, e, lines=True)
        merged = merge(merged, doc)
    try:
        return load_data(merged, f"{baked_path} + user-data"), None
    except ConfigError as e:
        return None, _problems(f"user-data merged over {baked_path}", e, lines=False)


def _fallback(path: Path) -> str:
    return f"user-data ignored: using the baked config {path} alone"


def load_for_command(
    args: argparse.Namespace,
    paths: Paths,
    *,
    env: Mapping[str, str] | None = None,
    client_factory: Callable[[ImdsSettings], ImdsClient] = ImdsClient,
    clock: Callable[[], float] = time.monotonic,
    use_imds: bool = True,
) -> LoadedConfig:
    """The config a command runs with. Raises ConfigError only when the BAKED file is invalid.

    ``use_imds=False``: the file alone, whatever ``--imds``/``$NODEAGENT_IMDS`` say (``userdata``,
    which publishes the file, must not fold this instance's user-data into it)."""
    e = os.environ if env is None else env
    path = paths.config_for(getattr(args, "config", None))
    text, baked_doc, baked = _read_baked(path)
    baked_only = (str(path),)
    if not use_imds or not imds_enabled(args, paths, e):
        return LoadedConfig(baked, baked_only, text=text)

    settings = ImdsSettings.from_env(dict(e), endpoint=getattr(args, "imds_endpoint", None))
    t0 = clock()
    try:
        raw = client_factory(settings).user_data()
    except ImdsError as err:
        took = clock() - t0
        why = "unreachable" if err.unreachable else "refused"
        warning = f"IMDS {why} after {took:.1f}s ({err}); using the baked config {path} alone"
        return LoadedConfig(baked, baked_only, (warning,), imds_seconds=took, text=text)
    took = clock() - t0
    from nodeagent.eks.userdata import UserDataError, nodeagent_parts  # MIME parsing: only with user-data

    try:
        parts = nodeagent_parts(raw)
    except UserDataError as err:
        return LoadedConfig(
            baked,
            baked_only,
            userdata_error=f"{err}\n{_fallback(path)}",
            imds_seconds=took,
            user_data=raw,
            text=text,
        )
    if not parts:
        return LoadedConfig(baked, baked_only, imds_seconds=took, user_data=raw, text=text)
    merged, error = _apply_parts(path, baked_doc, parts)
    if merged is None:
        return LoadedConfig(
            baked,
            baked_only,
            userdata_error=f"{error}\n{_fallback(path)}",
            imds_seconds=took,
            user_data=raw,
            text=text,
        )
    return LoadedConfig(merged, (str(path), USER_DATA_SOURCE), imds_seconds=took, user_data=raw, text=text)
