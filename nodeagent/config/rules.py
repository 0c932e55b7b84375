"""Cross-field rules of the config schema: each checks several keys of the built ``Config`` and names
the first. ``nodeagent.config.loader`` runs them after the schema; the docs list them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nodeagent.config import model as m
from nodeagent.util.durations import format_duration


@dataclass(frozen=True)
class Rule:
    """A rule over several keys. ``check`` returns a message for ``paths[0]`` or None.

    Skipped when any of ``paths`` already has a problem. The problem's line is that of the first of
    ``paths`` written in the file.
    """

    paths: Sequence[str]
    doc: str
    check: Callable[[m.Config], str | None]


def _gc_thresholds(c: m.Config) -> str | None:
    k = c.kubelet
    if k.image_gc_low_threshold_percent >= k.image_gc_high_threshold_percent:
        return (
            f"must be less than kubelet.imageGCHighThresholdPercent ({k.image_gc_high_threshold_percent}), "
            f"got {k.image_gc_low_threshold_percent}"
        )
    return None


def _gc_ages(c: m.Config) -> str | None:
    k = c.kubelet
    if 0 < k.image_maximum_gc_age <= k.image_minimum_gc_age:
        return (
            f"must be 0s (off) or greater than kubelet.imageMinimumGCAge "
            f"({format_duration(k.image_minimum_gc_age)}), got {format_duration(k.image_maximum_gc_age)}"
        )
    return None


def _parallel_pulls(c: m.Config) -> str | None:
    k = c.kubelet
    if not k.serialize_image_pulls:
        return None
    if k.max_parallel_image_pulls == m.AUTO:
        return "'auto' requires kubelet.serializeImagePulls: false (set 1 to serialize pulls)"
    if isinstance(k.max_parallel_image_pulls, int) and k.max_parallel_image_pulls > 1:
        return (
            f"must be 1 when kubelet.serializeImagePulls is true (the kubelet refuses larger values), "
            f"got {k.max_parallel_image_pulls}"
        )
    return None


def _probe_timeout(c: m.Config) -> str | None:
    h = c.containerd.mirror_health
    if h.timeout > h.interval:
        return (
            f"must not exceed containerd.mirrorHealth.interval ({format_duration(h.interval)}), "
            f"got {format_duration(h.timeout)}"
        )
    return None


def _eviction_thresholds(c: m.Config) -> str | None:
    e = c.eviction
    if e.low_threshold_percent >= e.high_threshold_percent:
        return (
            f"must be less than eviction.highThresholdPercent ({e.high_threshold_percent}), "
            f"got {e.low_threshold_percent}"
        )
    return None


RULES: tuple[Rule, ...] = (
    Rule(
        ("kubelet.imageGCLowThresholdPercent", "kubelet.imageGCHighThresholdPercent"),
        "`kubelet.imageGCLowThresholdPercent` < `kubelet.imageGCHighThresholdPercent`",
        _gc_thresholds,
    ),
    Rule(
        ("kubelet.imageMaximumGCAge", "kubelet.imageMinimumGCAge"),
        "`kubelet.imageMaximumGCAge` is `0s` or greater than `kubelet.imageMinimumGCAge`",
        _gc_ages,
    ),
    Rule(
        ("kubelet.maxParallelImagePulls", "kubelet.serializeImagePulls"),
        "`kubelet.maxParallelImagePulls` above 1 or `auto` requires `kubelet.serializeImagePulls: false`",
        _parallel_pulls,
    ),
    Rule(
        ("containerd.mirrorHealth.timeout", "containerd.mirrorHealth.interval"),
        "`containerd.mirrorHealth.timeout` <= `containerd.mirrorHealth.interval`",
        _probe_timeout,
    ),
    Rule(
        ("eviction.lowThresholdPercent", "eviction.highThresholdPercent"),
        "`eviction.lowThresholdPercent` < `eviction.highThresholdPercent`",
        _eviction_thresholds,
    ),
)
