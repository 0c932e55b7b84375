"""Registry mirrors: one containerd ``hosts.toml`` per registry under the hosts directory.

Format (containerd docs/hosts.md): ``server`` is the registry itself (tried last), each
``[host."<url>"]`` is a mirror tried first, in order, with ``capabilities``, ``skip_verify``, ``ca``,
``override_path``, ``dial_timeout`` and a ``header`` table. containerd reads these files on every
pull, so changing them needs no restart. ``_default`` applies to registries without their own
directory.

Only files that carry the ownership marker are ever rewritten or removed, and every path is built
through ``nodeagent.util.paths.child`` after the registry name is checked, so a name can never leave the
hosts directory. ``render_hosts_toml`` is also used by mirror health (issue 8) to rewrite a
registry's file without a failed mirror: it must stay pure and deterministic.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from nodeagent.apply.facts import NodeFacts
from nodeagent.apply.targets import (
    OWNED_MARKER,
    DesiredFile,
    TargetError,
    TargetPlan,
    is_owned,
    owned_header,
)
from nodeagent.config.formats import check_registry_host
from nodeagent.config.model import Config, Mirror
from nodeagent.util.durations import format_duration
from nodeagent.util.paths import Paths, UnsafePathError, child

__all__ = [
    "OWNED_MARKER",
    "hosts_toml_path",
    "is_owned",
    "render",
    "render_hosts_toml",
    "server_for",
    "validate_registry_name",
]

HOSTS_FILE = "hosts.toml"
DEFAULT_REGISTRY = "_default"
CAPABILITIES = ("pull", "resolve", "push")


def validate_registry_name(registry: str) -> None:
    """A registry host[:port] (or ``_default``); anything else could escape the hosts directory.
    The config loader's rule (``check_registry_host``), checked again here for direct callers."""
    if (err := check_registry_host(registry)) is not None:
        raise TargetError(f"containerd.mirrors: {registry!r}: {err}")


def hosts_toml_path(paths: Paths, hosts_dir: str, registry: str) -> Path:
    """``<root><hosts_dir>/<registry>/hosts.toml``, refusing names that would leave the hosts dir."""
    validate_registry_name(registry)
    try:
        return child(paths.hosts_dir(hosts_dir), registry) / HOSTS_FILE
    except UnsafePathError as e:
        raise TargetError(f"containerd.mirrors: {e}") from None


def _is_loopback(registry: str) -> bool:
    host = urlsplit("//" + registry).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_for(registry: str) -> str | None:
    """The upstream ``server`` line for a registry, or None when containerd's default is right.

    docker.io is served from registry-1.docker.io. For loopback registries containerd's own default
    (plain HTTP, with HTTPS fallback) is kept, and ``_default`` has no single upstream.
    """
    if registry == DEFAULT_REGISTRY or _is_loopback(registry):
        return None
    if registry == "docker.io":
        return "https://registry-1.docker.io"
    return f"https://{registry}"


def _q(s: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML; non-ASCII is \\u-escaped)."""
    return json.dumps(s)


def _check_mirror(registry: str, i: int, m: Mirror) -> None:
    where = f"containerd.mirrors.{registry}[{i}]"
    try:
        u = urlsplit(m.endpoint)
        ok = u.scheme in ("http", "https") and bool(u.hostname)
    except ValueError:
        ok = False
    if not ok or any(c.isspace() or c in '"\\' for c in m.endpoint):
        raise TargetError(f"{where}.endpoint: {m.endpoint!r} is not an http(s) URL")
    bad = [c for c in m.capabilities if c not in CAPABILITIES]
    if bad:
        raise TargetError(f"{where}.capabilities: {bad[0]!r} is not one of {', '.join(CAPABILITIES)}")


def _host_body(key: str, m: Mirror, indent: str) -> list[str]:
    """The settings of one host: under ``[host."<url>"]`` (``indent`` two spaces), or at the top of
    the file for the ``server`` of a mirror-only registry (``key`` "" and no indent)."""
    out = [f"{indent}capabilities = [{', '.join(_q(c) for c in m.capabilities)}]\n"]
    if m.skip_verify:
        out.append(f"{indent}skip_verify = true\n")
    if len(m.ca) == 1:
        out.append(f"{indent}ca = {_q(m.ca[0])}\n")
    elif m.ca:
        out.append(f"{indent}ca = [{', '.join(_q(c) for c in m.ca)}]\n")
    if m.override_path:
        out.append(f"{indent}override_path = true\n")
    if m.dial_timeout is not None:
        out.append(f"{indent}dial_timeout = {_q(format_duration(m.dial_timeout, go=True))}\n")
    if m.header:
        out.append(f"{indent}[{key}.header]\n" if key else "\n[header]\n")
        for name, values in m.header:
            out.append(f"{indent}  {_q(name)} = [{', '.join(_q(v) for v in values)}]\n")
    return out


def render_hosts_toml(
    registry: str, mirrors: Sequence[Mirror], *, server: str | None = None, mirror_only: bool = False
) -> str:
    """The full text of ``<hosts_dir>/<registry>/hosts.toml``: marker, ``server``, mirrors in order.

    ``server`` defaults to ``server_for(registry)``. With ``mirror_only`` there is no upstream: every
    mirror is a ``[host]`` as usual and the last one is also the ``server``, with its settings at the
    top level. containerd always appends the top-level host last and fills in the registry itself
    when ``server`` is missing, so leaving ``server`` out would not keep pulls off the upstream; and
    containerd 1.6 cannot read a hosts.toml without a ``[host]`` table ("invalid `host` tree") and
    then uses the registry itself too, so the last mirror stays a ``[host]`` as well (on failure it
    is tried twice). Deterministic: the same input gives the same bytes.
    """
    validate_registry_name(registry)
    for i, m in enumerate(mirrors):
        _check_mirror(registry, i, m)
    out = [owned_header(f"registry mirrors for {registry}" + (" (mirror-only)" if mirror_only else ""))]
    hosts = list(mirrors)
    if mirror_only:
        if not hosts:
            raise TargetError(f"containerd.mirrors.{registry}: mirror-only registry without a mirror")
        last = hosts[-1]
        out.append(f"server = {_q(last.endpoint)}\n")
        out.extend(_host_body("", last, ""))
    else:
        server = server if server is not None else server_for(registry)
        if server:
            out.append(f"server = {_q(server)}\n")
    for m in hosts:
        key = f"host.{_q(m.endpoint)}"
        out.append(f"\n[{key}]\n")
        out.extend(_host_body(key, m, "  "))
    return "".join(out)


def has_headers(mirrors: Sequence[Mirror]) -> bool:
    return any(m.header for m in mirrors)


def spegel_mirrors(config: Config) -> list[str]:
    """Mirror endpoints that look like Spegel (in-cluster P2P registry, ports 30020/30021 by default)."""
    found = []
    for _, mirrors in config.containerd.mirrors:
        for m in mirrors:
            try:
                port = urlsplit(m.endpoint).port
            except ValueError:
                port = None
            if "spegel" in m.endpoint.lower() or port in (30020, 30021):
                found.append(m.endpoint)
    return found


def render(config: Config, facts: NodeFacts) -> TargetPlan:
    plan = TargetPlan("mirrors")
    hosts_dir = config.containerd.hosts_dir
    wanted: set[Path] = set()
    # check every name first: nothing is written if any registry name is unsafe
    for registry, _ in config.containerd.mirrors:
        hosts_toml_path(facts.paths, hosts_dir, registry)
    for registry, mirrors in config.containerd.mirrors:
        path = hosts_toml_path(facts.paths, hosts_dir, registry)
        wanted.add(path)
        secret = has_headers(mirrors) or any(m.credentials is not None for m in mirrors)
        plan.files.append(
            DesiredFile(
                path,
                render_hosts_toml(registry, mirrors, mirror_only=config.containerd.is_mirror_only(registry)),
                mode=0o600 if secret else 0o644,
                secret=secret,
            )
        )
    for path in facts.owned_hosts_files:
        if path not in wanted:
            plan.remove.append(path)
    return plan
