"""The config schema: the single source of truth for every key of ``/etc/nodeagent/config.yaml``.

Keys, types, ranges, enums and descriptions are declared here once (``containerd:`` in
``schema_containerd``, ``images:``/``eviction:``/``podPulls:`` in ``schema_images``, cross-field
rules in ``rules``); defaults once, on the model dataclasses (``nodeagent.config.model``), which the
schema's objects read. The loader (``nodeagent.config.loader``) checks a document against ``SCHEMA``
and ``RULES`` and builds the typed objects of ``nodeagent.config.model``; ``scripts/gen_schema.py``
renders the same declarations as ``docs/config.schema.json`` (JSON Schema draft 2020-12) and
``docs/configuration.md``. Why our own schema language rather than JSON Schema + jsonschema:
docs/architecture.md, "Configuration".

Kubelet keys follow KubeletConfiguration v1beta1 and its validation
(kubernetes pkg/kubelet/apis/config/validation): GC thresholds 0..100 with low < high, QPS and burst
not negative, ``maxParallelImagePulls`` >= 1 and only above 1 when ``serializeImagePulls`` is false,
``imageMaximumGCAge`` either 0 or greater than ``imageMinimumGCAge``.
"""

from __future__ import annotations

from typing import Any

from nodeagent.config import formats as fmt
from nodeagent.config import model as m
from nodeagent.config.model import API_VERSION, KIND
from nodeagent.config.objects import Field, Object
from nodeagent.config.rules import RULES, Rule
from nodeagent.config.schema_containerd import CONTAINERD
from nodeagent.config.schema_images import EVICTION, IMAGES, POD_PULLS
from nodeagent.config.types import JSON, Bool, Duration, Int, Str

__all__ = ["API_VERSION", "KIND", "RULES", "SCHEMA", "Rule", "differences", "json_schema"]

INT32_MAX = 2**31 - 1

CRI = Object(
    [
        Field(
            "endpoint",
            "endpoint",
            Str(fmt.UNIX_ENDPOINT),
            "CRI endpoint of the container runtime (containerd, or SOCI's image service) that nodeagent "
            "talks to and proxies image calls to.",
        ),
        Field(
            "proxySocket",
            "proxy_socket",
            Str(fmt.SOCKET_PATH),
            "Unix socket where nodeagent serves the CRI ImageService proxy to the kubelet "
            '(`imageServiceEndpoint`). `""` turns the proxy off.',
        ),
        Field(
            "proxyMaxConnections",
            "proxy_max_connections",
            Int(minimum=1, maximum=4096),
            "Client connections the proxy keeps at once (the kubelet needs one or two; crictl and "
            "monitoring agents one per call). At the limit the longest-idle connection is closed to "
            "admit a new one; with all of them busy the new one is refused. Each costs a 256 KiB "
            "receive window and a 1 MiB header block at most (docs/proxy.md, Bounds).",
        ),
        Field(
            "timeout",
            "timeout",
            Duration(minimum=0.1, maximum=600.0),
            "Deadline for short CRI calls (Version, ImageStatus, ListImages...). Pulls have their own.",
        ),
    ],
    m.CriConfig,
    "The container runtime nodeagent talks to, and the proxy it serves to the kubelet.",
)

KUBELET = Object(
    [
        Field(
            "serializeImagePulls",
            "serialize_image_pulls",
            Bool(),
            "Kubelet `serializeImagePulls`: pull one image at a time. Must be false for parallel pulls.",
        ),
        Field(
            "maxParallelImagePulls",
            "max_parallel_image_pulls",
            Int(minimum=1, maximum=INT32_MAX, auto=True),
            "Kubelet `maxParallelImagePulls`: most image pulls in flight at once. `auto` sizes it from "
            "this node's CPUs, memory and NIC. Above 1 (or `auto`) requires `serializeImagePulls: false`.",
            examples=["auto", 5],
        ),
        Field(
            "registryPullQPS",
            "registry_pull_qps",
            Int(minimum=0, maximum=INT32_MAX),
            "Kubelet `registryPullQPS`: image pulls per second the kubelet starts; 0 means no limit.",
        ),
        Field(
            "registryBurst",
            "registry_burst",
            Int(minimum=0, maximum=INT32_MAX),
            "Kubelet `registryBurst`: pulls allowed in a burst above `registryPullQPS` "
            "(used only when `registryPullQPS` > 0).",
        ),
        Field(
            "imageGCHighThresholdPercent",
            "image_gc_high_threshold_percent",
            Int(minimum=0, maximum=100),
            "Kubelet `imageGCHighThresholdPercent`: disk usage that starts the kubelet's image GC. "
            "Must be above `imageGCLowThresholdPercent`.",
        ),
        Field(
            "imageGCLowThresholdPercent",
            "image_gc_low_threshold_percent",
            Int(minimum=0, maximum=100),
            "Kubelet `imageGCLowThresholdPercent`: disk usage the kubelet's image GC frees down to.",
        ),
        Field(
            "imageMinimumGCAge",
            "image_minimum_gc_age",
            Duration(),
            "Kubelet `imageMinimumGCAge`: an unused image younger than this is never garbage collected.",
        ),
        Field(
            "imageMaximumGCAge",
            "image_maximum_gc_age",
            Duration(),
            "Kubelet `imageMaximumGCAge`: remove images unused for this long; `0s` turns it off. When "
            "set, must be greater than `imageMinimumGCAge` (needs the kubelet's ImageMaximumGCAge "
            "feature gate, on by default since Kubernetes 1.30).",
        ),
    ],
    m.KubeletConfig,
    "Image-pull settings written into the kubelet's configuration by `nodeagent apply`.",
)


METRICS = Object(
    [
        Field(
            "listen",
            "listen",
            Str(fmt.LISTEN),
            "Address of the Prometheus metrics and health endpoint.",
        ),
        Field(
            "perImageSeriesLimit",
            "per_image_series_limit",
            Int(minimum=0, maximum=10000),
            "At most this many `image` series in `nodeagent_image_last_pull_duration_seconds` (least "
            "recent dropped); 0 turns the per-image metric off.",
        ),
    ],
    m.MetricsConfig,
    "The Prometheus endpoint of the daemon.",
)


SCHEMA = Object(
    [
        Field(
            "apiVersion",
            "api_version",
            Str(enum=(API_VERSION,)),
            "Version of this config format.",
            required=True,
        ),
        Field("kind", "kind", Str(enum=(KIND,)), "Always `NodeAgentConfig`.", required=True),
        Field("cri", "cri", CRI, CRI.description),
        Field("kubelet", "kubelet", KUBELET, KUBELET.description),
        Field("containerd", "containerd", CONTAINERD, CONTAINERD.description),
        Field("images", "images", IMAGES, IMAGES.description),
        Field("eviction", "eviction", EVICTION, EVICTION.description),
        Field("podPulls", "pod_pulls", POD_PULLS, POD_PULLS.description),
        Field("metrics", "metrics", METRICS, METRICS.description),
    ],
    m.Config,
    "nodeagent configuration (/etc/nodeagent/config.yaml).",
)


# --- views of the schema -------------------------------------------------------------------------


def json_schema() -> JSON:
    """The schema as JSON Schema draft 2020-12 (cross-field rules are listed in ``$comment``)."""
    out: JSON = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://nodeagent.io/config.schema.json",
        "title": "NodeAgentConfig",
    }
    out.update(SCHEMA.json_schema())
    out["$comment"] = "Also enforced by `nodeagent validate`: " + "; ".join(r.doc for r in RULES) + "."
    return out


def differences(config: m.Config) -> list[tuple[str, str, str]]:
    """(path, value, default) for every setting of ``config`` that differs from the default.

    Secret values (mirror headers) are never rendered.
    """
    out: list[tuple[str, str, str]] = []

    def walk(obj: Object, value: Any, default: Any, prefix: str) -> None:
        for f in obj.fields:
            if f.attr in ("api_version", "kind"):
                continue
            path = f"{prefix}.{f.key}" if prefix else f.key
            v, d = getattr(value, f.attr), getattr(default, f.attr)
            if isinstance(f.type, Object):
                walk(f.type, v, d, path)
            elif v != d:
                dtext = f.type.show(d) if d is not None else "unset"
                out.append((path, f.type.show(v), dtext))

    walk(SCHEMA, config, m.Config(), "")
    return out
