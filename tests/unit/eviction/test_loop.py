"""The eviction loop against the FAKE runtime (tests/unit/cri/fakes.py: CriClient's calls answered
in process with real runtime.v1 messages) and its image filesystem, whose usage follows the images on
it. Real containerd: tests/integration/test_eviction.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodeagent.config.model import Config, EvictionConfig, ImagesConfig
from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.eviction.baked import BakedImage
from nodeagent.eviction.baked import write as write_baked
from nodeagent.eviction.loop import EvictionLoop
from nodeagent.eviction.policy import FsUsage
from nodeagent.images.lastused import LastUsed
from nodeagent.run.metrics import Metrics
from nodeagent.util.paths import Paths
from nodeagent.util.throttle import TokenBucket
from tests.unit.cri.fakes import FakeRuntime, Plan

MB = 1_000_000
T0 = 1_800_000_000.0


def sha(n: int) -> str:
    return f"sha256:{n:064x}"


def runtime() -> FakeRuntime:
    """The FAKE runtime on a 200 MB image filesystem whose usage follows the images on it."""
    return FakeRuntime(total=200 * MB, imagefs_mountpoint="/imagefs")


def add(rt: FakeRuntime, n: int, size_mb: float, disk_mb: float | None = None, pinned: bool = False) -> str:
    """Image ``n`` with a CRI size of ``size_mb`` taking ``disk_mb`` (default twice that) on disk."""
    i = sha(n)
    rt.add_image(
        i,
        int(size_mb * MB),
        tags=[f"reg.example/app{n}:v1"],
        digests=[f"reg.example/app{n}@{sha(10_000 + n)}"],
        pinned=pinned,
        disk=int((disk_mb if disk_mb is not None else 2 * size_mb) * MB),
    )
    return i


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.t += s


def make_loop(
    rt: FakeRuntime,
    tmp_path: Path,
    *,
    high: int = 60,
    low: int = 40,
    min_age: float = 0.0,
    protect: tuple[str, ...] = (),
    clock: Clock | None = None,
    last_used: LastUsed | None = None,
    rate: float = 1000.0,
) -> tuple[EvictionLoop, Metrics, Clock]:
    clock = clock or Clock()
    cfg = Config(
        eviction=EvictionConfig(
            high_threshold_percent=high, low_threshold_percent=low, min_unused_age=min_age, interval=30
        ),
        images=ImagesConfig(protect=protect),
    )
    metrics = Metrics()
    lu = last_used or LastUsed(Paths(tmp_path).last_used_file, clock=clock)
    loop = EvictionLoop(
        cfg,
        Paths(tmp_path),
        metrics,
        lu,
        cri_factory=lambda: rt,
        clock=clock,
        monotonic=clock,
        sleep=clock.sleep,
        measure=rt.usage,
        removals_per_second=rate,
    )
    return loop, metrics, clock


def value(metrics: Metrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any]]]:
    return [
        (r.getMessage(), getattr(r, "fields", {})) for r in caplog.records if r.name.startswith("nodeagent")
    ]


def test_below_high_removes_nothing_and_records_first_seen(tmp_path: Path) -> None:
    rt = runtime()
    for n in range(3):
        add(rt, n, 10)  # 60 MB of 200: 30%
    loop, metrics, _ = make_loop(rt, tmp_path)
    r = asyncio.run(loop.cycle())
    assert not r.triggered and r.removed == [] and rt.removed == []
    assert value(metrics, "nodeagent_imagefs_used_ratio") == pytest.approx(0.3)
    assert value(metrics, "nodeagent_image_cache_images") == 3
    assert value(metrics, "nodeagent_image_cache_bytes") == 30 * MB
    saved = LastUsed(Paths(tmp_path).last_used_file)
    saved.load()
    assert saved.items() == {sha(n): T0 for n in range(3)}  # first seen, persisted


def test_thresholds_are_exported_as_ratios(tmp_path: Path) -> None:
    _loop, metrics, _ = make_loop(runtime(), tmp_path, high=70, low=55)
    assert value(metrics, "nodeagent_image_eviction_threshold_ratio", threshold="high") == pytest.approx(0.7)
    assert value(metrics, "nodeagent_image_eviction_threshold_ratio", threshold="low") == pytest.approx(0.55)


def test_removes_lru_one_at_a_time_until_measured_usage_is_under_low(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rt = runtime()
    for n in range(7):
        add(rt, n, 10)  # 20 MB on disk each (CRI says 10): 140 MB of 200 = 70% >= 60%
    lu = LastUsed(Paths(tmp_path).last_used_file)
    for n in range(7):
        lu.touch(f"reg.example/app{n}:v1", T0 - 1000 + (6 - n) * 10)  # app6 least recently used
    loop, metrics, _ = make_loop(rt, tmp_path, last_used=lu)
    r = asyncio.run(loop.cycle())
    # low = 80 MB: 140 -> 120 -> 100 -> 80: three removals, although the plan (10 MB each) wanted six
    assert rt.removed == [sha(6), sha(5), sha(4)]
    assert [d.image.id for d in r.removed] == rt.removed
    assert r.usage_after == FsUsage(80 * MB, 200 * MB)
    assert value(metrics, "nodeagent_image_evictions_total", reason="lru") == 3
    assert value(metrics, "nodeagent_image_evicted_bytes_total") == 30 * MB
    assert value(metrics, "nodeagent_image_eviction_low_unreachable") == 0
    evicted = [f for m, f in messages(caplog) if m == "image evicted"]
    assert [f["image"] for f in evicted] == [
        "reg.example/app6:v1",
        "reg.example/app5:v1",
        "reg.example/app4:v1",
    ]
    assert evicted[0]["freed_bytes"] == 20 * MB and evicted[0]["reason"] == "lru"
    msgs = [m for m, _ in messages(caplog)]
    assert msgs.count("imagefs above the high threshold") == 1
    assert msgs.count("imagefs under the low threshold") == 1
    st = loop.status()
    assert [e["image"] for e in st["recentEvictions"]] == [f["image"] for f in evicted]
    assert st["usedRatio"] == 0.4 and st["degraded"] is False
    assert st["lastReliefSeconds"] is not None
    # what `nodeagent status` prints for this section
    assert st["summary"][0].startswith("imagefs 40.0% used (")
    assert "above 60%, down to 40%" in st["summary"][0]
    assert st["summary"][1] == "recent evictions:"
    assert [line.split()[-2] for line in st["summary"][2:5]] == [f["image"] for f in evicted]


def test_plans_again_when_removals_free_less_than_their_size(tmp_path: Path) -> None:
    rt = runtime()
    for n in range(8):
        add(rt, n, 10, disk_mb=4)  # shared layers: a removal frees only 4 MB
    rt.base = 100 * MB  # 132 MB used: 66%
    lu = LastUsed(None)
    for n in range(8):
        lu.touch(sha(n), T0 - 1000 + n)
    loop, _, _ = make_loop(rt, tmp_path, last_used=lu)
    r = asyncio.run(loop.cycle())
    # the first plan stops after 6 (132 - 60 <= 80); measured 108 -> second round goes on
    assert len(rt.removed) == 8
    assert rt.removed == [sha(n) for n in range(8)]
    assert r.low_unreachable  # 100 MB of other data stays above low


def test_a_container_created_after_the_plan_keeps_its_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rt = runtime()
    for n in range(7):
        add(rt, n, 10)
    lu = LastUsed(None)
    for n in range(7):
        lu.touch(sha(n), T0 - 1000 + n)  # app0 is first in line

    def container_appears(call: int) -> None:
        if call == 2:  # call 1: planning; call 2: the re-check right before removing app0
            rt.containers.append(
                pb.Container(id="new" + "0" * 61, image=pb.ImageSpec(image="reg.example/app0:v1"))
            )

    rt.on_list_containers = container_appears
    loop, _, _ = make_loop(rt, tmp_path, last_used=lu)
    r = asyncio.run(loop.cycle())
    assert sha(0) not in rt.removed
    assert rt.removed == [sha(1), sha(2), sha(3)]
    assert [d.image.id for d in r.kept_now_in_use] == [sha(0)]
    kept = [f for m, f in messages(caplog) if m == "image kept: in use since the plan was made"]
    assert kept == [{"image": "reg.example/app0:v1", "image_id": sha(0), "user": "container new0000000000"}]


def test_everything_protected_says_so_once_per_period(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rt = runtime()
    add(rt, 0, 30, pinned=True)
    add(rt, 1, 20)
    add(rt, 2, 10)
    rt.containers.append(pb.Container(id="c1", image_ref=sha(1), state=1))
    loop, metrics, clock = make_loop(rt, tmp_path, protect=("reg.example/app2",))
    r = asyncio.run(loop.cycle())
    assert r.low_unreachable and rt.removed == []
    assert value(metrics, "nodeagent_image_eviction_low_unreachable") == 1
    assert loop.status()["lowUnreachable"] is True
    assert loop.status()["degraded"] is False  # not for long enough yet
    assert loop.status()["lastPlan"]["kept"] == {"in_use": 1, "pinned": 1, "protected": 1}
    assert any(line.startswith("cannot reach ") for line in loop.status()["summary"])
    warn = (
        "cannot reach the low threshold: every image left is in use, pinned, baked, protected or too recent"
    )
    assert [m for m, _ in messages(caplog)].count(warn) == 1
    clock.t += 60
    asyncio.run(loop.cycle())
    assert [m for m, _ in messages(caplog)].count(warn) == 1  # not again within the period
    clock.t += 240
    assert loop.status()["degraded"] is True  # 5 minutes above low with nothing removable
    clock.t += 360
    asyncio.run(loop.cycle())
    repeats = [f for m, f in messages(caplog) if m == warn]
    assert len(repeats) == 2 and repeats[1]["persisting_seconds"] == 660 and repeats[1]["occurrences"] == 3
    # the container goes away: its image becomes a candidate and low is reachable again
    rt.containers.clear()
    asyncio.run(loop.cycle())
    assert rt.removed == [sha(1)]
    assert loop.status()["degraded"] is False
    assert value(metrics, "nodeagent_image_eviction_low_unreachable") == 0
    assert "low threshold reachable again" in [m for m, _ in messages(caplog)]


def test_low_unreachable_holds_between_low_and_high_until_low_is_reached(tmp_path: Path) -> None:
    rt = runtime()
    add(rt, 0, 10, pinned=True)
    rt.base = 130 * MB  # 75% used (high 60%, low 40%) and nothing removable
    loop, metrics, _ = make_loop(rt, tmp_path)
    assert asyncio.run(loop.cycle()).low_unreachable
    rt.base = 70 * MB  # something else freed space: 45%, under high but still above low
    r = asyncio.run(loop.cycle())
    assert not r.triggered
    assert value(metrics, "nodeagent_image_eviction_low_unreachable") == 1  # still true: above low
    assert loop.status()["lowUnreachable"] is True
    rt.base = 50 * MB  # 35%: at or below low, the episode is over
    asyncio.run(loop.cycle())
    assert value(metrics, "nodeagent_image_eviction_low_unreachable") == 0
    assert loop.status()["lowUnreachable"] is False


def test_too_recent_images_are_kept(tmp_path: Path) -> None:
    rt = runtime()
    for n in range(7):
        add(rt, n, 10)
    loop, _, clock = make_loop(rt, tmp_path, min_age=600)
    r = asyncio.run(loop.cycle())  # every image is first seen now
    assert rt.removed == [] and r.low_unreachable
    clock.t += 601
    r = asyncio.run(loop.cycle())
    assert len(rt.removed) == 3 and not r.low_unreachable


def test_errors_are_counted_logged_once_per_period_and_cleared(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rt = runtime()
    add(rt, 0, 80)
    rt.plans["ListImages"] = Plan(fail_times=1_000)  # UNAVAILABLE until the plan is dropped
    loop, metrics, clock = make_loop(rt, tmp_path)
    for _ in range(3):
        r = asyncio.run(loop.cycle())
        assert r.error.startswith("list: ")
        clock.t += 30
    assert value(metrics, "nodeagent_image_eviction_errors_total", stage="list") == 3
    errors = [f for m, f in messages(caplog) if m == "eviction error"]
    assert len(errors) == 1 and errors[0]["stage"] == "list" and "UNAVAILABLE" in errors[0]["error"]
    clock.t += 600
    asyncio.run(loop.cycle())
    errors = [f for m, f in messages(caplog) if m == "eviction error"]
    assert len(errors) == 2 and errors[1]["persisting_seconds"] == 690 and errors[1]["occurrences"] == 4
    assert loop.status()["degraded"] is True  # persisting for more than 5 minutes
    del rt.plans["ListImages"]
    asyncio.run(loop.cycle())
    cleared = [f for m, f in messages(caplog) if m == "eviction error cleared"]
    assert cleared == [{"stage": "list", "lasted_seconds": 690.0, "occurrences": 4}]
    assert loop.status()["problems"] == {}


def test_remove_failure_stops_the_cycle_and_is_counted(tmp_path: Path) -> None:
    rt = runtime()
    for n in range(7):
        add(rt, n, 10)
    rt.plans["RemoveImage"] = Plan(fail_times=1, fail_code=grpc.StatusCode.UNKNOWN, fail_details="boom")
    loop, metrics, _ = make_loop(rt, tmp_path)
    r = asyncio.run(loop.cycle())
    assert r.error.startswith("remove: reg.example/app")
    assert value(metrics, "nodeagent_image_eviction_errors_total", stage="remove") == 1
    assert value(metrics, "nodeagent_image_evictions_total", reason="lru") == 0


def test_broken_baked_manifest_stops_eviction(tmp_path: Path) -> None:
    rt = runtime()
    for n in range(7):
        add(rt, n, 10)
    Paths(tmp_path).baked_manifest.parent.mkdir(parents=True)
    Paths(tmp_path).baked_manifest.write_text("[{]")
    loop, metrics, _ = make_loop(rt, tmp_path)
    r = asyncio.run(loop.cycle())
    assert rt.removed == [] and r.error.startswith(
        f"manifest: {Paths(tmp_path).baked_manifest}: not valid JSON"
    )
    assert value(metrics, "nodeagent_image_eviction_errors_total", stage="manifest") == 1


def test_baked_images_are_kept(tmp_path: Path) -> None:
    rt = runtime()
    for n in range(7):
        add(rt, n, 10)
    write_baked(
        Paths(tmp_path).baked_manifest, [BakedImage(f"reg.example/app{n}:v1", sha(9), 1) for n in range(6)]
    )
    loop, _, _ = make_loop(rt, tmp_path)
    r = asyncio.run(loop.cycle())
    assert rt.removed == [sha(6)] and r.low_unreachable


def test_removals_are_rate_limited(tmp_path: Path) -> None:
    rt = runtime()
    for n in range(7):
        add(rt, n, 10)
    loop, _, clock = make_loop(rt, tmp_path, rate=2.0)
    loop.bucket = TokenBucket(2.0, 1, clock, clock.sleep)
    start = clock.t
    asyncio.run(loop.cycle())
    assert len(rt.removed) == 3
    assert clock.t - start == pytest.approx(1.0)  # 1 token at once, then 2 more at 0.5 s each


def test_restart_keeps_lru_order(tmp_path: Path) -> None:
    rt = runtime()
    for n in range(4):
        add(rt, n, 10)
    clock = Clock()
    loop, _, _ = make_loop(rt, tmp_path, clock=clock)
    for n in (2, 0, 3, 1):  # uses in this order: 2 is now least recently used
        clock.t += 10
        loop.last_used.touch(f"reg.example/app{n}:v1")
    asyncio.run(loop.cycle())
    asyncio.run(loop.close())
    # "restart": a new loop with the state file read back
    for n in range(4, 7):
        add(rt, n, 10)
    clock.t += 10
    lu = LastUsed(Paths(tmp_path).last_used_file, clock=clock)
    lu.load()
    loop2, _, _ = make_loop(rt, tmp_path, clock=clock, last_used=lu)
    asyncio.run(loop2.cycle())
    assert rt.removed == [sha(2), sha(0), sha(3)]


async def _cycles_after_a_pull(
    loop: EvictionLoop, wait: float, pulled: Callable[[], object] = lambda: None
) -> tuple[int, int, int]:
    """(cycles before the pull, cycles ``wait`` s after it, cycles after the settle time);
    ``pulled()`` runs after the first cycle, as the pull's effect on the disk."""
    task = asyncio.ensure_future(loop.run())
    try:
        for _ in range(100):
            await asyncio.sleep(0.01)
            if loop.cycles == 1:
                break
        await asyncio.sleep(0.05)
        before = loop.cycles  # waits for the interval...
        pulled()
        loop.on_pull(object())  # ...or a pull
        await asyncio.sleep(wait)
        soon = loop.cycles
        for _ in range(100):
            await asyncio.sleep(0.01)
            if loop.cycles > soon:
                break
        return before, soon, loop.cycles
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_pull_that_fills_the_disk_to_high_runs_a_cycle_at_once(tmp_path: Path) -> None:
    rt = runtime()
    add(rt, 0, 10)
    loop, _, _ = make_loop(rt, tmp_path)
    loop.interval = 3600
    loop.pull_settle = 3600  # a cycle after the pull can only be the immediate one
    # the pull took the disk to 70% (high is 60)
    before, _, after = asyncio.run(_cycles_after_a_pull(loop, 0.0, lambda: add(rt, 1, 60)))
    assert (before, after) == (1, 2)
    assert rt.removed  # and that cycle evicted


def test_a_pull_below_high_runs_a_cycle_once_pulls_settle(tmp_path: Path) -> None:
    rt = runtime()
    add(rt, 0, 10)
    loop, metrics, _ = make_loop(rt, tmp_path)
    loop.interval = 3600
    loop.pull_settle = 0.3
    seen: list[float] = []

    def pulled() -> None:
        add(rt, 1, 5)  # 30 MB of 200: 15%, still below high
        loop.on_pull(object())
        seen.append(value(metrics, "nodeagent_imagefs_used_ratio"))  # before any cycle ran

    before, soon, after = asyncio.run(_cycles_after_a_pull(loop, 0.15, pulled))
    assert (before, soon, after) == (1, 1, 2)  # not at once (15% < high 60%), then after 0.3 s
    assert seen == [0.15]  # the gauge follows the pull at once all the same


def test_an_unexpected_error_is_counted_and_the_loop_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime()
    add(rt, 0, 80)
    loop, metrics, _ = make_loop(rt, tmp_path)

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("surprise")

    monkeypatch.setattr(loop, "_plan", broken)
    r = asyncio.run(loop.cycle())
    assert r.error == "internal: KeyError: 'surprise'"
    assert value(metrics, "nodeagent_image_eviction_errors_total", stage="internal") == 1
    monkeypatch.undo()
    assert asyncio.run(loop.cycle()).error == ""
