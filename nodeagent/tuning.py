"""Sizing of the ``auto`` values from node facts. The rules and their reasoning: docs/tuning.md.

Pure functions of (config, facts), so each rule is tested with made-up nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nodeagent.config.model import AUTO, Config
from nodeagent.facts import NodeFacts

# Bounds for the kubelet's parallel pulls: 2 is the smallest value that is still parallel; above
# 10 a node only queues more work on the same disk and NIC (and more layers half-downloaded at once).
PARALLEL_PULLS_MIN, PARALLEL_PULLS_MAX = 2, 10
# containerd's own default is 3 layers per image; more than 10 streams per image gains nothing.
DOWNLOADS_MIN, DOWNLOADS_MAX = 3, 10
# One HTTP stream from a registry (ECR, S3-backed) sustains roughly 0.5 Gb/s.
STREAM_GBPS = 0.5
# On a small image filesystem concurrent pulls of large images fill the disk mid-pull.
SMALL_IMAGEFS_BYTES = 30 * 2**30
SMALL_IMAGEFS_PARALLEL_PULLS = 3


@dataclass(frozen=True)
class Choice:
    key: str  # the config key, e.g. "kubelet.maxParallelImagePulls"
    value: int
    auto: bool
    reason: str

    def __str__(self) -> str:
        how = f"auto: {self.reason}" if self.auto else "from config"
        return f"{self.key} = {self.value} ({how})"


@dataclass(frozen=True)
class Tuning:
    max_parallel_image_pulls: Choice
    max_concurrent_downloads: Choice

    def choices(self) -> tuple[Choice, ...]:
        return (self.max_parallel_image_pulls, self.max_concurrent_downloads)


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def parallel_image_pulls(facts: NodeFacts) -> tuple[int, str]:
    limits = [f"CPUs {facts.cpus}"]
    by = [facts.cpus]  # one layer decompression (gunzip + unpack) keeps about one core busy
    mem_limit = max(1, int(facts.memory_gib))  # ~1 GiB of page cache and buffers per pull in flight
    by.append(mem_limit)
    limits.append(f"memory {facts.memory_gib:.1f} GiB -> {mem_limit}")
    if facts.nic_speed_mbps:
        gbps = facts.nic_speed_mbps / 1000
        nic_limit = max(1, math.ceil(gbps / STREAM_GBPS))
        by.append(nic_limit)
        limits.append(f"NIC {gbps:g} Gb/s -> {nic_limit}")
    else:
        limits.append("NIC speed unknown")
    value = _clamp(min(by), PARALLEL_PULLS_MIN, PARALLEL_PULLS_MAX)
    reason = f"min({', '.join(limits)}) clamped to {PARALLEL_PULLS_MIN}..{PARALLEL_PULLS_MAX}"
    small_fs = facts.imagefs_bytes is not None and facts.imagefs_bytes < SMALL_IMAGEFS_BYTES
    if small_fs and value > SMALL_IMAGEFS_PARALLEL_PULLS:
        value = SMALL_IMAGEFS_PARALLEL_PULLS
        reason += (
            f", capped at {SMALL_IMAGEFS_PARALLEL_PULLS} for a small image filesystem "
            f"({(facts.imagefs_bytes or 0) / 2**30:.1f} GiB)"
        )
    return value, reason


def concurrent_downloads(facts: NodeFacts, parallel_pulls: int) -> tuple[int, str]:
    if not facts.nic_speed_mbps:
        return DOWNLOADS_MIN, f"NIC speed unknown: containerd's default {DOWNLOADS_MIN}"
    gbps = facts.nic_speed_mbps / 1000
    streams = math.ceil(gbps / STREAM_GBPS)  # streams that fill the NIC
    per_pull = math.ceil(streams / max(1, parallel_pulls))
    value = _clamp(per_pull, DOWNLOADS_MIN, DOWNLOADS_MAX)
    return value, (
        f"NIC {gbps:g} Gb/s needs {streams} streams of {STREAM_GBPS} Gb/s, over {parallel_pulls} "
        f"parallel pulls -> {per_pull}, clamped to {DOWNLOADS_MIN}..{DOWNLOADS_MAX}"
    )


def resolve(config: Config, facts: NodeFacts) -> Tuning:
    kl, cd = config.kubelet, config.containerd
    if kl.max_parallel_image_pulls == AUTO:
        v, why = parallel_image_pulls(facts)
        mpp = Choice("kubelet.maxParallelImagePulls", v, True, why)
    else:
        mpp = Choice("kubelet.maxParallelImagePulls", int(kl.max_parallel_image_pulls), False, "")
    effective_parallel = 1 if kl.serialize_image_pulls else mpp.value
    if cd.max_concurrent_downloads == AUTO:
        v, why = concurrent_downloads(facts, effective_parallel)
        mcd = Choice("containerd.maxConcurrentDownloads", v, True, why)
    else:
        mcd = Choice("containerd.maxConcurrentDownloads", int(cd.max_concurrent_downloads), False, "")
    return Tuning(mpp, mcd)
