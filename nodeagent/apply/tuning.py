"""Sizing of the ``auto`` values from node facts. The rules and their reasoning: docs/tuning.md.

Pure functions of (config, facts), so each rule is tested with made-up nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nodeagent.apply.facts import NodeFacts
from nodeagent.config.model import AUTO, Config

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
class SociTuning:
    """The SOCI snapshotter's parallel pull and unpack settings (``containerd.soci``)."""

    max_concurrent_downloads_per_image: Choice
    max_concurrent_downloads: Choice
    chunk_size_mib: Choice
    max_concurrent_unpacks_per_image: Choice
    max_concurrent_unpacks: Choice

    def choices(self) -> tuple[Choice, ...]:
        return (
            self.max_concurrent_downloads_per_image,
            self.max_concurrent_downloads,
            self.chunk_size_mib,
            self.max_concurrent_unpacks_per_image,
            self.max_concurrent_unpacks,
        )


@dataclass(frozen=True)
class Tuning:
    max_parallel_image_pulls: Choice
    max_concurrent_downloads: Choice
    soci: SociTuning | None = None  # only with containerd.snapshotter: soci and pullMode: parallel

    def choices(self) -> tuple[Choice, ...]:
        own = (self.max_parallel_image_pulls, self.max_concurrent_downloads)
        return own + (self.soci.choices() if self.soci else ())


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


# SOCI parallel pull: connections per image: twice the connections that would fill the NIC, because
# SOCI requests a layer's chunks in waves and the last wave (and each request's ramp-up) leaves the
# link under-filled when there are only just enough (bench_soci, 2 vCPUs, 16 MB/s per connection,
# 96 MB/s in all: the 256 MiB layer's download took 2.86 s with 20 and 3.07-3.21 s with 10 on a calm
# machine; under load 2.92-3.13 s with 20, 3.50-3.64 s with 10 and 4.16 s with the 6 connections
# that fill the link; soci-snapshotter-grpc's RSS 65-66 MiB in each). 4 is the
# least that beats containerd's one stream per layer on a single large layer; 20 is nodeadm's
# FastImagePull value and the top of SOCI's advice for ECR (10-20), also the value without a known
# NIC speed.
SOCI_PER_IMAGE_MIN, SOCI_PER_IMAGE_MAX, SOCI_PER_IMAGE_UNKNOWN_NIC = 4, 20, 20
# Node-wide chunk downloads: never fewer than one image's worth, at most 64 connections.
SOCI_DOWNLOADS_MAX = 64
# One ranged GET per chunk: at 0.5 Gb/s a 16 MiB chunk takes ~0.27 s, so per-request latency
# (~10 ms to a regional registry) costs under 5 %; SOCI advises 8 or 16 MiB for ECR.
SOCI_CHUNK_MIB = 16
SOCI_SMALL_NODE_CHUNK_MIB = 8  # below 2 GiB of memory: half the in-flight write-back per connection
SOCI_SMALL_NODE_BYTES = 2 * 2**30
# Unpacking one layer (gunzip + tar into the snapshot) keeps about one core busy and writes about
# 100 MB/s; nodeadm's FastImagePull uses 12 per image.
SOCI_UNPACK_MBPS = 100
SOCI_UNPACKS_PER_IMAGE_MAX = 12


def _mbps_text(facts: NodeFacts) -> str:
    return f"NIC {facts.nic_speed_mbps / 1000:g} Gb/s" if facts.nic_speed_mbps else "NIC speed unknown"


def soci_downloads_per_image(facts: NodeFacts) -> tuple[int, str]:
    if not facts.nic_speed_mbps:
        return SOCI_PER_IMAGE_UNKNOWN_NIC, (
            f"NIC speed unknown: {SOCI_PER_IMAGE_UNKNOWN_NIC}, nodeadm's value and the top of SOCI's "
            "advice for ECR (fewer leave a per-connection-capped link under-filled)"
        )
    gbps = facts.nic_speed_mbps / 1000
    streams = math.ceil(gbps / STREAM_GBPS)
    value = _clamp(2 * streams, SOCI_PER_IMAGE_MIN, SOCI_PER_IMAGE_MAX)
    return value, (
        f"NIC {gbps:g} Gb/s: twice the {streams} connections of {STREAM_GBPS} Gb/s that fill it "
        f"(the last wave of a layer's chunks), clamped to {SOCI_PER_IMAGE_MIN}..{SOCI_PER_IMAGE_MAX}"
    )


def soci_downloads_total(facts: NodeFacts, per_image: int, parallel_pulls: int) -> tuple[int, str]:
    want = per_image * max(1, parallel_pulls)
    limits = [f"{per_image} per image x {parallel_pulls} parallel pulls = {want}"]
    cap = SOCI_DOWNLOADS_MAX
    if facts.nic_speed_mbps:
        nic_cap = max(per_image, 2 * math.ceil(facts.nic_speed_mbps / 1000 / STREAM_GBPS))
        if nic_cap < cap:
            cap = nic_cap
            limits.append(f"{_mbps_text(facts)} -> at most {nic_cap} (twice the streams that fill it)")
    value = _clamp(want, per_image, cap)
    return value, f"min({', '.join(limits)}), at most {SOCI_DOWNLOADS_MAX}"


def soci_chunk_mib(facts: NodeFacts) -> tuple[int, str]:
    if facts.memory_bytes < SOCI_SMALL_NODE_BYTES:
        return SOCI_SMALL_NODE_CHUNK_MIB, (
            f"memory {facts.memory_gib:.1f} GiB < {SOCI_SMALL_NODE_BYTES // 2**30} GiB: "
            f"{SOCI_SMALL_NODE_CHUNK_MIB} MiB halves the dirty pages each connection holds"
        )
    return SOCI_CHUNK_MIB, (
        f"a {STREAM_GBPS} Gb/s connection moves {SOCI_CHUNK_MIB} MiB in ~0.27 s, so request latency "
        "costs < 5 %, and a 256 MiB layer still splits into 16 chunks"
    )


def soci_unpacks(facts: NodeFacts, throughput_mbps: int) -> tuple[int, str]:
    """Layers unpacked at once on the node (and per image: the same bound)."""
    limits = [f"CPUs {facts.cpus}"]
    by = [facts.cpus]
    mem_limit = max(1, int(facts.memory_gib))  # ~1 GiB of page cache per unpack in flight
    by.append(mem_limit)
    limits.append(f"memory {facts.memory_gib:.1f} GiB -> {mem_limit}")
    if throughput_mbps:
        disk_limit = max(1, math.ceil(throughput_mbps / SOCI_UNPACK_MBPS))
        by.append(disk_limit)
        limits.append(f"imagefs {throughput_mbps} MB/s -> {disk_limit}")
    else:
        limits.append("imagefs throughput unknown")
    value = _clamp(min(by), 1, SOCI_UNPACKS_PER_IMAGE_MAX)
    return value, f"min({', '.join(limits)}) clamped to 1..{SOCI_UNPACKS_PER_IMAGE_MAX}"


def _soci_choice(key: str, configured: int | str, compute: tuple[int, str] | None) -> Choice:
    if configured == AUTO:
        assert compute is not None
        return Choice(key, compute[0], True, compute[1])
    return Choice(key, int(configured), False, "")


def resolve_soci(config: Config, facts: NodeFacts, parallel_pulls: int) -> SociTuning:
    sc = config.containerd.soci
    k = "containerd.soci."
    per_image = _soci_choice(
        k + "maxConcurrentDownloadsPerImage",
        sc.max_concurrent_downloads_per_image,
        soci_downloads_per_image(facts),
    )
    total = _soci_choice(
        k + "maxConcurrentDownloads",
        sc.max_concurrent_downloads,
        soci_downloads_total(facts, per_image.value, parallel_pulls),
    )
    chunk = _soci_choice(k + "chunkSizeMiB", sc.chunk_size_mib, soci_chunk_mib(facts))
    unpacks, why = soci_unpacks(facts, sc.imagefs_throughput_mbps)
    unpacks_image = _soci_choice(
        k + "maxConcurrentUnpacksPerImage", sc.max_concurrent_unpacks_per_image, (unpacks, why)
    )
    node_unpacks = (max(unpacks, unpacks_image.value), f"{why}; never below the per-image value")
    unpacks_total = _soci_choice(k + "maxConcurrentUnpacks", sc.max_concurrent_unpacks, node_unpacks)
    return SociTuning(per_image, total, chunk, unpacks_image, unpacks_total)


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
    cd_soci = cd.snapshotter == "soci" and cd.soci.pull_mode == "parallel"
    return Tuning(mpp, mcd, resolve_soci(config, facts, effective_parallel) if cd_soci else None)
