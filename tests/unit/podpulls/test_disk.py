"""DiskGuard's admission: the image's size (here a stand-in for the registry lookup) against eviction's
plan as if the disk were full (here a recorder standing in for the eviction loop). The real registry and
eviction loop are used in tests/integration/test_pod_pulls.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nodeagent.podpulls import disk
from nodeagent.podpulls.disk import DiskGuard

MB = 1_000_000


class Evictor:
    """``make_plan_if_full`` as the eviction loop answers it: 1000 MB disk, 300 MB used, high at 75%,
    nothing eviction could free; counts how often a plan was made."""

    def __init__(self) -> None:
        self.plans = 0

    async def make_plan_if_full(self) -> Any:
        self.plans += 1
        await asyncio.sleep(0.1)
        return SimpleNamespace(
            usage=SimpleNamespace(used_bytes=300 * MB, total_bytes=1000 * MB),
            high_bytes=750 * MB,
            removal_bytes=0,
            thresholds=SimpleNamespace(high_percent=75),
        )


def test_a_pods_checks_share_one_plan_and_each_admission_sees_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def size(image: str, auth: Any, hosts_dir: Path, *, client: Any = None) -> int:
        assert client is not None  # one client for every lookup
        await asyncio.sleep(0.01)
        return 100 * MB  # 200 MB on disk

    monkeypatch.setattr(disk, "compressed_size", size)

    async def main() -> None:
        ev = Evictor()
        guard = DiskGuard(ev, Path("/nonexistent"))
        try:
            results = await asyncio.gather(*(guard.check(f"r/i{i}:1", None) for i in range(3)))
            assert ev.plans == 1  # made once for the three checks that came together
            # 300 used + 200 + 200 = 700 < 750; a third 200 MB would reach 900 MB: refused
            assert [r[0] is None for r in results] == [True, True, False]
            assert "would reach 90%" in (results[2][0] or "")
            assert guard.reserved == 400 * MB
            guard.done(results[0][1])
            assert guard.reserved == 200 * MB
            again = await guard.check("r/late:1", None)  # a later check makes a fresh plan
            assert again[0] is None and ev.plans == 2
        finally:
            await guard.close()

    asyncio.run(main())
