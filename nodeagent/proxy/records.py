"""What the proxy records about a pull: registry normalization, failure classification, PullRecord.

Pure functions, no grpc import at module level: the eviction and mirror-health features and
``nodeagent status`` use them too.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

from nodeagent.util.imageref import split_reference

DOCKER_HUB = "docker.io"
# Who asked for a pull (a bounded label on the pull metrics): the kubelet through the proxy, nodeagent's
# pod watcher (nodeagent/podpulls), or `nodeagent prefetch`.
ORIGIN_KUBELET = "kubelet"
ORIGIN_POD = "pod"
ORIGIN_PREFETCH = "prefetch"
ORIGINS = (ORIGIN_KUBELET, ORIGIN_POD, ORIGIN_PREFETCH)
_DIGEST = re.compile(r"@[a-z0-9]+(?:[+._-][a-z0-9]+)*:[0-9a-fA-F]{32,}$")
_IMAGE_ID = re.compile(r"^(?:sha256:)?[0-9a-f]{64}$")


def is_image_id(ref: str) -> bool:
    return bool(_IMAGE_ID.match(ref))


@functools.lru_cache(maxsize=1024)  # pure; the kubelet asks about the same images over and over
def registry_of(ref: str) -> str:
    """Normalized registry host of an image reference; ``""`` for a bare image id."""
    if not ref or is_image_id(ref):
        return ""
    return split_reference(ref)[0]


@functools.lru_cache(maxsize=1024)
def image_label(ref: str) -> str:
    """The image as a metric label: ``registry/repo:tag`` with any digest removed (no label carries
    a digest) and Docker Hub short names expanded (``busybox`` -> ``docker.io/library/busybox``)."""
    if not ref or is_image_id(ref):
        return "(image id)"
    host, rest = split_reference(_DIGEST.sub("", ref))
    if host == DOCKER_HUB and "/" not in rest:
        rest = "library/" + rest
    return f"{host}/{rest}"


# --- failure classification -------------------------------------------------------------------
# Matched against containerd's error text (the registry's HTTP status and error codes end up in it).
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("rate_limited", re.compile(r"\b429\b|toomanyrequests|too many requests|rate limit", re.I)),
    (
        "unauthorized",
        re.compile(
            r"\b401\b|\b403\b|unauthorized|forbidden|authentication required|insufficient_scope"
            r"|access denied|access to the resource is denied|denied: "
            r"|illegal base64 data",  # a malformed auth field (bad credentials from the kubelet)
            re.I,
        ),
    ),
    (
        "no_space",
        re.compile(r"no space left on device|\benospc\b|disk quota exceeded|not enough space", re.I),
    ),
    (
        "not_found",
        re.compile(
            r"\bnot found\b|manifest unknown|name unknown|blob unknown|\b404\b|no match for platform",
            re.I,
        ),
    ),
    (
        "network",
        re.compile(
            r"connection refused|connection reset|no such host|i/o timeout|network is unreachable"
            r"|no route to host|tls handshake|server misbehaving|dial tcp|unexpected eof|broken pipe"
            r"|\b50[0234]\b|service unavailable|bad gateway|gateway timeout|context deadline exceeded"
            r"|http: server gave http response|x509:|certificate",
            re.I,
        ),
    ),
)

_CODE_RESULTS = {
    "NOT_FOUND": "not_found",
    "UNAUTHENTICATED": "unauthorized",
    "PERMISSION_DENIED": "unauthorized",
    "UNAVAILABLE": "network",
}


def classify(code: str, message: str) -> str:
    """Map a failed PullImage (gRPC status code name and message) into the closed result set.

    The caller's own cancellation or deadline is ``canceled`` whatever the message says; otherwise
    the registry's answer in the message decides (e.g. containerd reports a 401 as UNKNOWN with
    "401 Unauthorized" in the text); then the status code; then ``other``."""
    if code in ("CANCELLED", "DEADLINE_EXCEEDED"):
        return "canceled"
    for result, pattern in _RULES:
        if pattern.search(message):
            return result
    if code == "RESOURCE_EXHAUSTED" and re.search(r"space|disk", message, re.I):
        return "no_space"
    return _CODE_RESULTS.get(code, "other")


@dataclass
class PullRecord:
    """One PullImage seen by the proxy. Carries no credentials by construction."""

    image: str
    registry: str
    result: str
    duration: float
    started_at: float  # unix time
    bytes: int = 0
    image_ref: str = ""
    code: str = "OK"
    error: str = ""
    retry_reason: str | None = None
    origin: str = ORIGIN_KUBELET
    joined: bool = False  # answered by an upstream pull another caller started (single-flight)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.result == "success"

    @property
    def throughput(self) -> float:
        """Bytes per second (0 when unknown)."""
        return self.bytes / self.duration if self.duration > 0 and self.bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "image": self.image,
            "registry": self.registry,
            "result": self.result,
            "duration": round(self.duration, 4),
            "started_at": self.started_at,
            "bytes": self.bytes,
            "image_ref": self.image_ref,
            "code": self.code,
            "error": self.error,
            "retry_reason": self.retry_reason,
            "origin": self.origin,
            "joined": self.joined,
            "throughput": round(self.throughput, 1),
        }
        if self.extra:
            d["extra"] = dict(self.extra)
        return d
