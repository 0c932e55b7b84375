"""Which credentials apply to an image, as the kubelet decides (credentialprovider ``URLsMatch``): same
number of host labels, each a glob (``*`` never crosses a ``.``), the pattern's path a prefix of the
image's, equal ports; the most specific of several matching keys wins."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from nodeagent.util.endpoints import strip_scheme
from nodeagent.util.imageref import DEFAULT_REGISTRY, registry_host, split_reference


@dataclass(frozen=True)
class _Url:
    host_parts: tuple[str, ...]
    port: str
    path: str


def _parse_schemeless(text: str) -> _Url:
    hostport, _, path = strip_scheme(text).partition("/")
    host, port = hostport, ""
    if hostport.startswith("["):  # [v6]:port
        end = hostport.find("]")
        host, rest = hostport[: end + 1], hostport[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    elif ":" in hostport:
        host, _, port = hostport.rpartition(":")
    return _Url(tuple(host.lower().split(".")), port, "/" + path if path else "")


def _glob_label(pattern: str, label: str) -> bool:
    # filepath.Match: '*' and '?' never match the separator; labels hold no '.' or '/' anyway.
    return fnmatch.fnmatchcase(label, pattern)


def urls_match(pattern: str, target: str) -> bool:
    """The kubelet's URLsMatch on schemeless URLs (pattern may be a glob in the host part)."""
    p, t = _parse_schemeless(pattern), _parse_schemeless(target)
    if p.port != t.port or len(p.host_parts) != len(t.host_parts):
        return False
    if not t.path.startswith(p.path):
        return False
    return all(_glob_label(gp, tp) for gp, tp in zip(p.host_parts, t.host_parts, strict=True))


def image_for_matching(image: str) -> str:
    """The image as the kubelet matches it: registry host first (Docker Hub short names expanded)."""
    host, rest = split_reference(image)
    return f"{host}/{rest}"


def best_match(keys: Sequence[str], image: str) -> str | None:
    """The most specific key matching ``image`` (longer keys and literal keys before wildcards)."""
    return best_match_target(keys, image_for_matching(image))


def best_match_target(keys: Sequence[str], target: str) -> str | None:
    """``best_match`` for a schemeless ``host[:port]/path`` that is already expanded."""
    for key in sorted(keys, reverse=True):
        if urls_match(_fold_docker_hub(key), target):
            return key
    return None


def _fold_docker_hub(key: str) -> str:
    host, sep, path = strip_scheme(key).partition("/")
    if registry_host(host) == DEFAULT_REGISTRY:
        host = DEFAULT_REGISTRY
        if path in ("v1/", "v1", "v2/", "v2"):  # "https://index.docker.io/v1/" means the whole hub
            sep, path = "", ""
    return host + sep + path
