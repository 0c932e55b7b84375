"""Every Prometheus metric nodeagent exports, defined in one place (names: DESIGN.md "Metrics").

Each ``Metrics`` owns its own ``CollectorRegistry`` so tests never share state. Label values come
only from closed sets (``RESULTS``, ``EVICTION_REASONS``) or operator config (registry hosts,
mirror endpoints); the per-image gauge is capped (``metrics.perImageSeriesLimit``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.process_collector import ProcessCollector

from nodeagent import __version__
from nodeagent.proxy.records import ORIGINS

RESULTS = ("success", "not_found", "unauthorized", "rate_limited", "network", "no_space", "canceled", "other")

# Image pulls take from ~100 ms (cached layers) to tens of minutes (multi-GB images on slow links).
# Eviction label values (closed sets; nodeagent/eviction/loop.py). The one removal reason today is
# least-recently-used; kept images are not counted here (see `nodeagent evict --dry-run`).
EVICTION_REASONS = ("lru",)
EVICTION_ERROR_STAGES = ("usage", "list", "manifest", "remove", "state", "internal")

# Pod pulls: outcome of a pod, and of each of its images (nodeagent/podpulls).
POD_RESULTS = ("ready", "partial", "failed")
POD_IMAGE_RESULTS = ("pulled", "present", "skipped_policy", "skipped_disk", "failed")
LEAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

PULL_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)

# CRI proxy: method label values (anything else is "other") and gRPC status code names.
PROXY_METHODS = frozenset(
    {"ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo", "StreamImages"}
)
GRPC_CODES = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)
REGISTRY_LABEL_LIMIT = 50

# Mirror probes: a healthy mirror answers /v2/ in milliseconds; the probe timeout (default 1 s) caps it.
PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# nodeagent_mirror_failovers_total{direction}: down = taken out of hosts.toml, up = put back.
FAILOVER_DIRECTIONS = ("down", "up")
# nodeagent_degraded{component}: what the daemon itself knows makes `nodeagent status` exit 1. The
# upstream image service, and each status section (names given in code: commands/run.py); any other
# name becomes "other".
DEGRADED_COMPONENTS = ("upstream", "eviction", "mirrorHealth")


class Metrics:
    def __init__(self, per_image_series_limit: int = 100, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Info("nodeagent_build", "nodeagent build information", registry=r)
        self.build_info.info({"version": __version__})
        ProcessCollector(registry=r)

        # --- pulls (the CRI proxy) ---
        self.pull_duration = Histogram(
            "nodeagent_image_pull_duration_seconds",
            "Time of PullImage calls seen by the proxy",
            ["registry", "result", "origin"],
            buckets=PULL_BUCKETS,
            registry=r,
        )
        self.pulls = Counter(
            "nodeagent_image_pulls",
            "PullImage calls seen by the proxy",
            ["registry", "result", "origin"],
            registry=r,
        )
        self.pull_joins = Counter(
            "nodeagent_image_pull_joins",
            "PullImage calls that shared an identical pull already in flight (same image, credentials "
            "and runtime handler) instead of starting their own, by the joining caller's origin",
            ["origin"],
            registry=r,
        )
        for origin in ORIGINS:
            self.pull_joins.labels(origin=origin)
        self.pull_bytes = Counter(
            "nodeagent_image_pull_bytes", "Size of successfully pulled images", ["registry"], registry=r
        )
        self.pulls_in_flight = Gauge(
            "nodeagent_image_pulls_in_flight", "PullImage calls in progress", registry=r
        )
        self.last_pull_duration = Gauge(
            "nodeagent_image_last_pull_duration_seconds",
            "Duration of the latest pull of each image (capped number of series, least recent dropped)",
            ["image"],
            registry=r,
        )
        self.cache_requests = Counter(
            "nodeagent_image_cache_requests",
            "ImageStatus calls from the kubelet by outcome (hit: image present)",
            ["result"],
            registry=r,
        )
        self._per_image_limit = per_image_series_limit
        self._per_image: OrderedDict[str, None] = OrderedDict()

        # --- image cache and eviction ---
        self.imagefs_used_ratio = Gauge(
            "nodeagent_imagefs_used_ratio", "Used fraction of the image filesystem (statvfs)", registry=r
        )
        self.cache_images = Gauge("nodeagent_image_cache_images", "Images in the runtime's cache", registry=r)
        self.cache_bytes = Gauge(
            "nodeagent_image_cache_bytes", "Bytes of images in the runtime's cache", registry=r
        )
        self.evictions = Counter(
            "nodeagent_image_evictions", "Images removed by nodeagent", ["reason"], registry=r
        )
        self.evicted_bytes = Counter(
            "nodeagent_image_evicted_bytes", "Bytes of images removed by nodeagent", registry=r
        )
        self.eviction_errors = Counter(
            "nodeagent_image_eviction_errors",
            "Eviction cycles that failed, by stage (usage, list, manifest, remove, state, internal)",
            ["stage"],
            registry=r,
        )
        for reason in EVICTION_REASONS:
            self.evictions.labels(reason=reason)
        for stage in EVICTION_ERROR_STAGES:
            self.eviction_errors.labels(stage=stage)
        self.eviction_threshold = Gauge(
            "nodeagent_image_eviction_threshold_ratio",
            "Eviction thresholds as fractions of the image filesystem (high: eviction starts, low: it "
            "stops; eviction.highThresholdPercent / lowThresholdPercent)",
            ["threshold"],
            registry=r,
        )
        self.eviction_low_unreachable = Gauge(
            "nodeagent_image_eviction_low_unreachable",
            "1 while the image filesystem is above the eviction low threshold and every image left is "
            "in use, pinned, baked, protected or too recent",
            registry=r,
        )

        # --- CRI proxy and daemon (nodeagent/proxy, nodeagent/run/daemon.py) ---
        self.proxy_requests = Counter(
            "nodeagent_cri_proxy_requests",
            "CRI calls forwarded by the proxy, by method and gRPC status code",
            ["method", "code"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "nodeagent_cri_upstream_up",
            "1 while the upstream CRI image service (cri.endpoint) answers, else 0",
            registry=r,
        )
        self.degraded = Gauge(
            "nodeagent_degraded",
            "1 while this part makes `nodeagent status` report degraded (upstream: the CRI image service "
            "does not answer; eviction, mirrorHealth: the daemon's status section says degraded or failed)",
            ["component"],
            registry=r,
        )
        self.degraded.labels(component="upstream").set(0)
        self._registries: set[str] = set()
        self._proxy_children: dict[tuple[str, str], Any] = {}

        # --- pod-aware pulls (nodeagent/podpulls) ---
        self.pod_pulls_pods = Counter(
            "nodeagent_pod_pulls_pods",
            "Pods bound to this node whose images nodeagent handled, by outcome (ready: every image "
            "present or pulled; partial: some skipped or failed; failed: none could be made present)",
            ["result"],
            registry=r,
        )
        for result in POD_RESULTS:
            self.pod_pulls_pods.labels(result=result)
        self.pod_pulls_images = Counter(
            "nodeagent_pod_pulls_images",
            "Images of pods handled by nodeagent, by outcome",
            ["result"],
            registry=r,
        )
        for result in POD_IMAGE_RESULTS:
            self.pod_pulls_images.labels(result=result)
        self.pod_images_ready = Histogram(
            "nodeagent_pod_images_ready_seconds",
            "From nodeagent seeing a pod to every image it handled for the pod being present",
            buckets=PULL_BUCKETS,
            registry=r,
        )
        self.pod_pulls_lead = Histogram(
            "nodeagent_pod_pulls_lead_seconds",
            "How long an image nodeagent pulled for a pod had been present when the kubelet first asked "
            "for it (ImageStatus or PullImage)",
            buckets=LEAD_BUCKETS,
            registry=r,
        )

        # --- mirror health (nodeagent/mirrorhealth); mirror label values come from operator config ---
        self.mirror_up = Gauge(
            "nodeagent_mirror_up",
            "1 while the mirror passes its health probes, 0 while it is down (and kept out of its "
            "registry's hosts.toml when nodeagent owns that file)",
            ["registry", "mirror"],
            registry=r,
        )
        self.mirror_probe_duration = Histogram(
            "nodeagent_mirror_probe_duration_seconds",
            "Time of mirror health probes (GET of the registry API base), failed ones included",
            ["registry", "mirror"],
            buckets=PROBE_BUCKETS,
            registry=r,
        )
        self.mirror_failovers = Counter(
            "nodeagent_mirror_failovers",
            "Mirror state changes that rewrote hosts.toml (down: mirror taken out, up: put back)",
            ["registry", "mirror", "direction"],
            registry=r,
        )
        self.mirror_auth_ok = Gauge(
            "nodeagent_mirror_auth_ok",
            "0 while the mirror refuses this node (401/403 with its configured credentials, or none) "
            "or its credentials cannot be had, else 1",
            ["registry", "mirror"],
            registry=r,
        )

    def registry_label(self, registry: str) -> str:
        """``registry`` as a label value, at most ``REGISTRY_LABEL_LIMIT`` distinct ones (then
        ``other``): pods choose registries, so the set is not closed by config alone."""
        registry = registry or "unknown"
        if registry in self._registries:
            return registry
        if len(self._registries) >= REGISTRY_LABEL_LIMIT:
            return "other"
        self._registries.add(registry)
        return registry

    def observe_proxy_request(self, method: str, code: str) -> None:
        child = self._proxy_children.get((method, code))
        if child is None:
            child = self.proxy_requests.labels(
                method=method if method in PROXY_METHODS else "other",
                code=code if code in GRPC_CODES else "UNKNOWN",
            )
            if len(self._proxy_children) < 1024:  # bounded: method names come from callers
                self._proxy_children[(method, code)] = child
        child.inc()

    def set_eviction_thresholds(self, high_percent: float, low_percent: float) -> None:
        self.eviction_threshold.labels(threshold="high").set(high_percent / 100)
        self.eviction_threshold.labels(threshold="low").set(low_percent / 100)

    def set_degraded(self, component: str, degraded: bool) -> None:
        label = component if component in DEGRADED_COMPONENTS else "other"
        self.degraded.labels(component=label).set(1 if degraded else 0)

    def observe_last_pull(self, image: str, seconds: float) -> None:
        """Set the per-image gauge, keeping at most ``per_image_series_limit`` series (LRU by pull)."""
        if self._per_image_limit <= 0:
            return
        if image in self._per_image:
            self._per_image.move_to_end(image)
        else:
            self._per_image[image] = None
            while len(self._per_image) > self._per_image_limit:
                old, _ = self._per_image.popitem(last=False)
                self.last_pull_duration.remove(old)
        self.last_pull_duration.labels(image=image).set(seconds)
