"""The image cache figures: current right after pulls and listed again once pulls settle (the
"0 images after 4 successful pulls" bug), not listed again when eviction already did, and measured
the way eviction measures."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from nodeagent.eviction.policy import FsUsage
from nodeagent.eviction.usage import Imagefs
from nodeagent.proxy.records import PullRecord
from nodeagent.run.cachestats import DAEMON, EVICTION, PULLS, CacheStats
from nodeagent.run.metrics import Metrics
from nodeagent.util.paths import Paths
from tests.unit.cri.fakes import FakeRuntime

MB = 1_000_000


def pull(rt: FakeRuntime, n: int, ok: bool = True) -> PullRecord:
    """Image ``n`` lands in the runtime; the record the proxy would hand on."""
    image_id = f"sha256:{n:064x}"
    if ok:
        rt.add_image(image_id, 10 * MB)
    return PullRecord(
        image=f"reg.local/app{n}:1",
        registry="reg.local",
        result="success" if ok else "not_found",
        duration=0.5,
        started_at=0.0,
        bytes=10 * MB if ok else 0,
        image_ref=image_id if ok else "",
    )


def lists(rt: FakeRuntime) -> int:
    return len(rt.calls("ListImages"))


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
    cri = FakeRuntime()  # the image filesystem comes from eviction.imagefsPath: no ImageFsInfo

    async def main() -> None:
        task = asyncio.ensure_future(stats.run(cri))
        try:
            await until(lambda: stats.current is not None)  # measured at start: nothing yet
            assert stats.current is not None and stats.current.images == 0
            stats.pull_settle = 0.3
            for n in (0, 1, 2, 3, 3):  # four images in a burst (the last one pulled twice)
                stats.on_pull(pull(cri, n))
            stats.on_pull(pull(cri, 9, ok=False))  # a failed pull adds nothing
            c = stats.current
            assert (c.images, c.bytes, c.source) == (4, 40 * MB, PULLS)  # at once, before any listing
            assert gauge(metrics, "nodeagent_image_cache_images") == 4
            await until(lambda: stats.current is not None and stats.current.source == DAEMON)
            await asyncio.sleep(0.2)
            assert lists(cri) == 2  # once at start, once for the whole burst
            assert cri.calls("ImageFsInfo") == []  # the path is eviction.imagefsPath, under --root
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
    cri = FakeRuntime()  # the image filesystem comes from eviction.imagefsPath: no ImageFsInfo

    async def main() -> None:
        task = asyncio.ensure_future(stats.run(cri))
        try:
            await until(lambda: lists(cri) == 1)
            stats.on_pull(pull(cri, 1))
            await asyncio.sleep(0.05)
            stats.report({"sha256:1": 10 * MB}, FsUsage(30, 100), EVICTION)  # eviction's cycle
            await asyncio.sleep(0.5)
        finally:
            task.cancel()

    asyncio.run(main())
    assert lists(cri) == 1
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
    cri = FakeRuntime()  # the image filesystem comes from eviction.imagefsPath: no ImageFsInfo
    pull(cri, 1)
    asyncio.run(stats.refresh(cri))
    stats.on_pull(pull(cri, 1))  # already listed: not counted twice
    assert stats.current is not None and stats.current.source == DAEMON
    assert stats.current is not None
    assert (stats.current.images, stats.current.imagefs_used_ratio) == (1, None)
