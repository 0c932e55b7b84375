"""Image references, one rule set: which first component is a registry, what names Docker Hub, and
the normalized spelling (the way containerd and the kubelet spell references).

``busybox`` -> ``docker.io/library/busybox:latest``; ``ghcr.io/x/y`` -> ``ghcr.io/x/y:latest``;
a digest reference keeps its digest and gets no tag. Registry hosts are compared lower-cased, with
Docker Hub's other names (``index.docker.io``, ``registry-1.docker.io``,
``registry.hub.docker.com``, any case) folded into ``docker.io``: ``registry_host`` is that rule, and
everything that names a registry (eviction, prefetch, credentials, the proxy's pull records and
metric labels) goes through it. CRI runtimes report ``RepoTags`` and ``RepoDigests`` already
normalized; user input (protect patterns, the baked manifest, the image a container was created
from) may not be.
"""

from __future__ import annotations

import re

DEFAULT_REGISTRY = "docker.io"
# Other names of Docker Hub, folded into DEFAULT_REGISTRY wherever a registry host is compared.
DOCKER_HUB_ALIASES = frozenset({"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_GLOB = frozenset("*?[")


def _has_domain(first: str) -> bool:
    return "." in first or ":" in first or first == "localhost"


def registry_host(host: str) -> str:
    """A registry host as compared everywhere: lower-cased, Docker Hub's aliases folded into docker.io."""
    host = host.lower()
    return DEFAULT_REGISTRY if host in DOCKER_HUB_ALIASES else host


def split_reference(ref: str) -> tuple[str, str]:
    """``(registry host, rest as written)``: the host by ``registry_host`` (docker.io when the
    reference names none), the rest without a ``library/`` added."""
    ref = ref.strip()
    first, sep, rest = ref.partition("/")
    if sep and (_has_domain(first) or first != first.lower()):
        return registry_host(first), rest
    return DEFAULT_REGISTRY, ref


def split_domain(ref: str) -> tuple[str, str]:
    """``split_reference`` with Docker Hub's ``library/`` prefix for one-component names."""
    domain, remainder = split_reference(ref)
    if domain == DEFAULT_REGISTRY and "/" not in remainder:
        remainder = "library/" + remainder
    return domain, remainder


def normalize(ref: str) -> str:
    """The fully qualified form of an image reference, or an image id (``sha256:...``) as is."""
    ref = ref.strip()
    if ref.startswith("sha256:"):
        return ref
    if _HEX64.match(ref):
        return "sha256:" + ref
    domain, rest = split_domain(ref)
    name, at, digest = rest.partition("@")
    if not at:
        last = name.rsplit("/", 1)[-1]
        if ":" not in last:
            name += ":latest"
        return f"{domain}/{name}"
    return f"{domain}/{name}@{digest}"


def repository(ref: str) -> str:
    """A normalized reference without its tag or digest: ``docker.io/library/busybox``."""
    name = ref.split("@", 1)[0]
    head, slash, last = name.rpartition("/")
    if ":" in last:
        last = last.split(":", 1)[0]
    return f"{head}{slash}{last}"


def normalize_pattern(pattern: str) -> str:
    """Normalize the registry part of a protect glob, leaving the glob itself alone.

    ``busybox*`` -> ``docker.io/library/busybox*``; ``*`` and ``*/pause:*`` stay as written (a
    pattern that starts with a glob, or globs its registry part, may stand for any registry); no
    ``:latest`` is added.
    """
    pattern = pattern.strip()
    if pattern.startswith("sha256:"):
        return pattern
    first, slash, _ = pattern.partition("/")
    if (slash and _GLOB & set(first)) or pattern[:1] in _GLOB:
        return pattern
    domain, rest = split_domain(pattern)
    return f"{domain}/{rest}"
