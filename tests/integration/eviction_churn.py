"""The churn scenario of issue 5, shared by tests/integration/test_eviction.py and
bench/bench_eviction_churn.py: sequential pulls of distinct incompressible images into containerd
whose image store is a small loop-mounted ext4, once straight into containerd and once through a
running ``nodeagent run`` (CRI proxy + eviction loop)."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from nodeagent.cri.client import CriClient, CriError
from tests.sandbox import NodeAgent, PushedImage, Registry, Sandbox

MiB = 1 << 20


@dataclass
class Pull:
    n: int
    image: str
    ok: bool
    seconds: float
    used_after: int
    error: str = ""


@dataclass
class ChurnRun:
    label: str
    total_bytes: int
    pulls: list[Pull] = field(default_factory=list)
    reliefs: list[float] = field(default_factory=list)  # seconds from >= high to <= low, per episode
    evictions: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failures(self) -> list[Pull]:
        return [p for p in self.pulls if not p.ok]

    def report(self) -> str:
        lines = [f"== {self.label}: {len(self.pulls) - len(self.failures)}/{len(self.pulls)} pulls succeeded"]
        for p in self.pulls:
            used = f"{p.used_after / MiB:6.1f} MiB used ({p.used_after / self.total_bytes:5.1%})"
            what = "ok" if p.ok else f"FAILED: ...{p.error[-90:]}"
            lines.append(f"  pull {p.n:2d} {p.image:<40} {p.seconds:6.2f}s  {used}  {what}")
        if self.reliefs:
            lines.append(
                f"  evictions: {self.evictions}; high->low episodes: {len(self.reliefs)}, "
                f"median {statistics.median(self.reliefs):.3f}s, max {max(self.reliefs):.3f}s"
            )
        return "\n".join(lines)


def push_churn_images(
    sb: Sandbox, registry: Registry, count: int = 30, size: int = 20 * MiB
) -> list[PushedImage]:
    return [sb.image(registry, f"churn/img{i:02d}", "v1", layers=1, layer_size=size) for i in range(count)]


def used_bytes(path: Any) -> int:
    import os

    st = os.statvfs(path)
    return int((st.f_blocks - st.f_bavail) * st.f_frsize)


def total_bytes(path: Any) -> int:
    import os

    st = os.statvfs(path)
    return int(st.f_blocks * st.f_frsize)


async def pull_all(endpoint: str, images: list[PushedImage], run: ChurnRun, fs_path: Any) -> None:
    async with CriClient(endpoint, timeout=30, pull_timeout=300) as cri:
        for n, img in enumerate(images, 1):
            t0 = time.monotonic()
            try:
                await cri.pull_image(img.reference)
            except CriError as e:
                run.pulls.append(
                    Pull(n, img.repository, False, time.monotonic() - t0, used_bytes(fs_path), str(e))
                )
            else:
                run.pulls.append(Pull(n, img.repository, True, time.monotonic() - t0, used_bytes(fs_path)))


def run_without_agent(
    sb: Sandbox, registry: Registry, images: list[PushedImage], size_mb: int = 200
) -> ChurnRun:
    fs = sb.loopfs(size_mb)
    node = sb.containerd([registry], root_dir=fs.mountpoint / "root")
    run = ChurnRun("without nodeagent (pulls straight into containerd)", total_bytes(fs.mountpoint))
    try:
        asyncio.run(pull_all(node.endpoint, images, run, fs.mountpoint))
    finally:
        node.stop()
    return run


def run_with_agent(
    sb: Sandbox,
    registry: Registry,
    images: list[PushedImage],
    size_mb: int = 200,
    high: int = 60,
    low: int = 40,
) -> tuple[ChurnRun, NodeAgent]:
    fs = sb.loopfs(size_mb)
    node = sb.containerd([registry], root_dir=fs.mountpoint / "root")
    agent = sb.nodeagent(
        node,
        config={
            "eviction": {
                "highThresholdPercent": high,
                "lowThresholdPercent": low,
                "minUnusedAge": "0s",
                "interval": "5s",
            }
        },
    )
    run = ChurnRun(f"with nodeagent run (eviction {high}/{low})", total_bytes(fs.mountpoint))
    asyncio.run(pull_all(agent.proxy_endpoint, images, run, fs.mountpoint))
    time.sleep(0.5)  # the eviction after the last pull
    run.log = agent.log_lines()
    run.reliefs = [
        float(e["seconds_from_high"]) for e in run.log if e.get("msg") == "imagefs under the low threshold"
    ]
    run.evictions = sum(1 for e in run.log if e.get("msg") == "image evicted")
    return run, agent
