"""Load and validate a config file. PROVISIONAL: replaced by the schema-driven loader (issue 2)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nodeagent.config import model as m


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        return f"{self.path}: {self.message}{where}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(str(p) for p in problems))


_DUR = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _dur(v: Any) -> float:
    mt = _DUR.match(str(v))
    if not mt:
        raise ConfigError([Problem("?", f"bad duration {v!r}")])
    return float(mt.group(1)) * _UNIT[mt.group(2)]


def _mirror_health(mh: dict[str, Any]) -> m.MirrorHealthConfig:
    d = m.MirrorHealthConfig()
    return m.MirrorHealthConfig(
        enabled=bool(mh.get("enabled", d.enabled)),
        interval=_dur(mh["interval"]) if "interval" in mh else d.interval,
        timeout=_dur(mh["timeout"]) if "timeout" in mh else d.timeout,
        failures_before_down=int(mh.get("failuresBeforeDown", d.failures_before_down)),
        successes_before_up=int(mh.get("successesBeforeUp", d.successes_before_up)),
        hold_time=_dur(mh["holdTime"]) if "holdTime" in mh else d.hold_time,
    )


def load_text(text: str, source: str = "<string>") -> m.Config:
    doc = yaml.safe_load(text) or {}
    cri = doc.get("cri", {})
    kl = doc.get("kubelet", {})
    cd = doc.get("containerd", {})
    im = doc.get("images", {})
    ev = doc.get("eviction", {})
    me = doc.get("metrics", {})
    d = m.Config()
    mirrors = tuple(
        (
            reg,
            tuple(
                m.Mirror(
                    endpoint=x["endpoint"],
                    capabilities=tuple(x.get("capabilities", ["pull", "resolve"])),
                    skip_verify=bool(x.get("skipVerify", False)),
                    ca=tuple([x["ca"]] if isinstance(x.get("ca"), str) else x.get("ca", [])),
                    override_path=bool(x.get("overridePath", False)),
                    header=tuple(
                        (k, tuple(v if isinstance(v, list) else [v])) for k, v in x.get("header", {}).items()
                    ),
                    dial_timeout=_dur(x["dialTimeout"]) if "dialTimeout" in x else None,
                )
                for x in lst
            ),
        )
        for reg, lst in (cd.get("mirrors") or {}).items()
    )
    return m.Config(
        cri=m.CriConfig(
            endpoint=cri.get("endpoint", d.cri.endpoint),
            proxy_socket=cri.get("proxySocket", d.cri.proxy_socket),
        ),
        kubelet=m.KubeletConfig(
            serialize_image_pulls=kl.get("serializeImagePulls", False),
            max_parallel_image_pulls=kl.get("maxParallelImagePulls", m.AUTO),
            registry_pull_qps=kl.get("registryPullQPS", 10),
            registry_burst=kl.get("registryBurst", 20),
            image_gc_high_threshold_percent=kl.get("imageGCHighThresholdPercent", 85),
            image_gc_low_threshold_percent=kl.get("imageGCLowThresholdPercent", 80),
            image_minimum_gc_age=_dur(kl.get("imageMinimumGCAge", "2m")),
            image_maximum_gc_age=_dur(kl.get("imageMaximumGCAge", "0s")),
        ),
        containerd=m.ContainerdConfig(
            max_concurrent_downloads=cd.get("maxConcurrentDownloads", m.AUTO),
            image_pull_progress_timeout=_dur(cd.get("imagePullProgressTimeout", "5m")),
            hosts_dir=cd.get("hostsDir", d.containerd.hosts_dir),
            mirrors=mirrors,
            mirror_health=_mirror_health(cd.get("mirrorHealth") or {}),
        ),
        images=m.ImagesConfig(
            prefetch=tuple(
                m.PrefetchImage(x["image"], bool(x.get("pin", False)), bool(x.get("required", False)))
                for x in im.get("prefetch", [])
            ),
            protect=tuple(im.get("protect", [])),
        ),
        eviction=m.EvictionConfig(
            enabled=ev.get("enabled", True),
            high_threshold_percent=ev.get("highThresholdPercent", 75),
            low_threshold_percent=ev.get("lowThresholdPercent", 65),
            min_unused_age=_dur(ev.get("minUnusedAge", "10m")),
            interval=_dur(ev.get("interval", "30s")),
        ),
        metrics=m.MetricsConfig(
            listen=me.get("listen", d.metrics.listen),
            per_image_series_limit=me.get("perImageSeriesLimit", 100),
        ),
    )


def load(path: Path) -> m.Config:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([Problem(str(path), f"cannot read: {e.strerror}")]) from None
    return load_text(text, str(path))
