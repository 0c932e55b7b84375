"""Settings that are valid but have a price: what ``nodeagent validate`` and ``nodeagent apply`` both
warn about (the same list, so that validate never says OK to what apply then warns about)."""

from __future__ import annotations

from nodeagent.config.model import Config


def config_warnings(config: Config) -> list[str]:
    """One line per valid-but-costly setting, naming the keys."""
    w = []
    ev, kl = config.eviction, config.kubelet
    if ev.enabled and ev.high_threshold_percent >= kl.image_gc_high_threshold_percent:
        w.append(
            f"eviction.highThresholdPercent ({ev.high_threshold_percent}) is not below "
            f"kubelet.imageGCHighThresholdPercent ({kl.image_gc_high_threshold_percent}): the kubelet's "
            "image GC acts first and nodeagent's eviction (which protects pinned and baked images) never does"
        )
    w.extend(_mirror_warnings(config))
    return w


def _mirror_warnings(config: Config) -> list[str]:
    out = []
    cd = config.containerd
    for registry, mirrors in cd.mirrors:
        if cd.is_mirror_only(registry):
            n = len(mirrors)
            out.append(
                f"containerd.mirrors.{registry}.mirrorOnly: pulls from {registry} never go to the registry "
                f"itself: while {'its mirror is' if n == 1 else f'all {n} of its mirrors are'} down every "
                f"pull from {registry} fails (fast, with the reason in the pull record); "
                + ("add a second mirror, or " if n == 1 else "")
                + "leave mirrorOnly out to fall back to the registry"
            )
        if any(m.credentials and any(n.lower() == "authorization" for n, _ in m.header) for m in mirrors):
            out.append(
                f"containerd.mirrors.{registry}: a mirror has both credentials and an Authorization header; "
                "the credentials win"
            )
    if (
        cd.mirrors
        and not cd.mirror_health.enabled
        and any(m.credentials is not None for _, ms in cd.mirrors for m in ms)
    ):
        out.append(
            "containerd.mirrorHealth.enabled is false: mirror credentials are written at apply time but "
            "never refreshed (the daemon's mirror health refreshes them)"
        )
    return out
