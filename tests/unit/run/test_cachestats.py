"""The image cache figures: measured after pulls settle (the "0 images after 4 pulls" bug), not
again when eviction already reported, and measured the way eviction measures."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.eviction.policy import FsUsage
from nodeagent.eviction.usage import Imagefs
from nodeagent.metrics import Metrics
from nodeagent.paths import Paths
from nodeagent.run.cachestats import DAEMON, EVICTION, CacheStats

MB = 1_000_000


class Listing:
    """Stands in for the daemon's CRI client (ListImages only; the image filesystem comes from
    eviction.imagefsPath, so no ImageFsInfo)."""

    def __init__(self) -> None:
        self.images: list[Any] = []
        self.lists = 0

    def pull(self, n: int) -> None:
        self.images.append(pb.Image(id=f"sha256:{n:064x}", size=10 * MB))

    async def list_images(self) -> list[Any]:
        self.lists += 1
        return list(self.images)


def make(tmp_path: Path, metrics: Metrics | None = None) -> tuple[CacheStats, Metrics, list[int]]:
    (tmp_path / "var/lib/containerd").mkdir(parents=True, exist_ok=True)
    metrics = metrics or Metrics()
    changes: list[int] = []
    stats = CacheStats(
        metrics,
        Imagefs(Paths(tmp_path), "/var/lib/containerd"),
        on_change=lambda: changes.append(1),
    )
    stats.pull_settle = 0.05
    return stats, metrics, changes


def gauge(metrics: Metrics, name: str) -> float | None:
    v: float | None = metrics.registry.get_sample_value(name)
    return v


async def until(cond: Any) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 5 s")


def test_pulls_make_the_figures_current_once_pulls_settle(tmp_path: Path) -> None:
    stats, metrics, _ = make(tmp_path)
    cri = Listing()

    async def main() -> None:
        task = asyncio.ensure_future(stats.run(cri))
        try:
            await until(lambda: stats.current is not None)  # measured at start: nothing yet
            assert stats.current is not None and stats.current.images == 0
            for n in range(4):  # four pulls in a burst
                cri.pull(n)
                stats.on_pull(object())
            await until(lambda: stats.current is not None and stats.current.images == 4)
            await asyncio.sleep(0.2)
            assert cri.lists == 2  # once at start, once for the whole burst
        finally:
            task.cancel()

    asyncio.run(main())
    c = stats.current
    assert c is not None and (c.images, c.bytes, c.source) == (4, 40 * MB, DAEMON)
    assert c.imagefs_path == str(tmp_path / "var/lib/containerd")  # eviction.imagefsPath under --root
    assert c.imagefs_used_ratio is not None and 0.0 <= c.imagefs_used_ratio <= 1.0
    assert gauge(metrics, "nodeagent_image_cache_images") == 4
    assert gauge(metrics, "nodeagent_image_cache_bytes") == 40 * MB


def test_no_listing_of_its_own_when_eviction_reported_after_the_pull(tmp_path: Path) -> None:
    stats, metrics, changes = make(tmp_path)
    stats.pull_settle = 0.3
    cri = Listing()

    async def main() -> None:
        task = asyncio.ensure_future(stats.run(cri))
        try:
            await until(lambda: cri.lists == 1)
            cri.pull(1)
            stats.on_pull(object())
            await asyncio.sleep(0.05)
            stats.report(1, 10 * MB, FsUsage(30, 100), EVICTION)  # eviction's cycle after the pull
            await asyncio.sleep(0.5)
        finally:
            task.cancel()

    asyncio.run(main())
    assert cri.lists == 1
    assert stats.current is not None and stats.current.source == EVICTION
    assert gauge(metrics, "nodeagent_imagefs_used_ratio") == 0.3
    assert changes  # the status file is told


def test_usage_alone_moves_only_the_gauge(tmp_path: Path) -> None:
    stats, metrics, changes = make(tmp_path)
    stats.report_usage(FsUsage(50, 100))
    assert gauge(metrics, "nodeagent_imagefs_used_ratio") == 0.5
    assert stats.current is None and changes == []


def test_an_unmeasurable_imagefs_still_gives_the_image_count(tmp_path: Path) -> None:
    metrics = Metrics()
    stats = CacheStats(metrics, Imagefs(Paths(tmp_path), "/not/there"))
    cri = Listing()
    cri.pull(1)
    asyncio.run(stats.refresh(cri))
    assert stats.current is not None
    assert (stats.current.images, stats.current.imagefs_used_ratio) == (1, None)
