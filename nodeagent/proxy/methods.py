"""The CRI methods the proxy treats apart, and how an upstream error reaches the caller."""

from __future__ import annotations

from nodeagent.proxy.h2grpc import Limits

IMAGE_SERVICE = "/runtime.v1.ImageService/"
PULL = IMAGE_SERVICE + "PullImage"
STATUS = IMAGE_SERVICE + "ImageStatus"
REMOVE = IMAGE_SERVICE + "RemoveImage"
# Server-streaming CRI methods (a generic handler cannot learn a method's shape from its name).
SERVER_STREAMING = frozenset(
    {
        IMAGE_SERVICE + "StreamImages",
        "/runtime.v1.RuntimeService/StreamPodSandboxes",
        "/runtime.v1.RuntimeService/StreamContainers",
        "/runtime.v1.RuntimeService/StreamContainerStats",
        "/runtime.v1.RuntimeService/StreamPodSandboxStats",
        "/runtime.v1.RuntimeService/StreamPodSandboxMetrics",
        "/runtime.v1.RuntimeService/GetContainerEvents",
    }
)
# The status message forwarded to the kubelet travels as gRPC metadata (grpc-message). Past the
# kubelet's default 8 KiB soft limit grpc drops the whole status at random ("Stream removed"), so a
# longer upstream message reaches the caller cut to this many bytes, with a marker.
MAX_CALLER_ERROR_BYTES = 4096
# Requests from the kubelet are small (a PullImage with its sandbox config: kilobytes); grpc's own
# default receive limit. Responses are relayed as they come and are not limited here.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Answers of inspected calls (PullImage, ImageStatus) up to this size are kept to be decoded.
INSPECT_BYTES = 1024 * 1024


def proxy_limits(max_connections: int) -> Limits:
    """The proxy's bounds (``h2grpc.Limits``) with the configurable ones (``cri.proxyMaxConnections``)."""
    return Limits(max_connections=max_connections, long_calls=frozenset({PULL}))


def for_caller(details: str) -> str:
    """An upstream status message as the proxy forwards it: whole up to ``MAX_CALLER_ERROR_BYTES``."""
    raw = details.encode()
    if len(raw) <= MAX_CALLER_ERROR_BYTES:
        return details
    marker = " ... (truncated by nodeagent)"
    return raw[: MAX_CALLER_ERROR_BYTES - len(marker)].decode(errors="ignore") + marker
