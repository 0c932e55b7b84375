"""The eviction section carries when its figures were measured (the status file's ``at``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nodeagent.run.statusfile import Section
from tests.unit.eviction.test_loop import T0, add, make_loop, runtime


def test_the_section_says_when_the_imagefs_was_measured(tmp_path: Path) -> None:
    rt = runtime()
    add(rt, 0, 10)
    loop, _, clock = make_loop(rt, tmp_path)
    assert "at" not in loop.status()  # nothing measured yet: the daemon stamps the time it asked
    asyncio.run(loop.cycle())
    measured = clock.t
    clock.t += 42
    section = Section.of(loop.status(), at=clock.t)
    assert section.at == measured == T0
    assert section.fields["usedBytes"] == 20_000_000 and not section.degraded
    assert section.summary[0].startswith("imagefs 10.0% used")
