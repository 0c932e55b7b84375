"""TokenBucket and PeriodicLog on a fake clock (no sleeping)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from nodeagent.util.throttle import PeriodicLog, TokenBucket


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.t += s


def test_token_bucket() -> None:
    clock = Clock(0.0)
    b = TokenBucket(1.0, 2, clock, clock.sleep)
    waits = [asyncio.run(b.acquire()) for _ in range(4)]
    assert waits == [0.0, 0.0, 1.0, 1.0]
    clock.t += 10
    assert [asyncio.run(b.acquire()) for _ in range(3)] == [0.0, 0.0, 1.0]  # burst capped at 2
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_periodic_log_clear_without_problem_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    p = PeriodicLog(10, Clock(0.0))
    assert p.clear("x", "cleared") is False
    assert caplog.records == []


def test_periodic_log_repeats_once_per_period_then_says_when_it_cleared(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock(0.0)
    p = PeriodicLog(60, clock, logging.getLogger("nodeagent.test"))
    with caplog.at_level(logging.INFO, logger="nodeagent"):
        written = []
        for _ in range(13):  # an occurrence every 10 s for 2 minutes
            written.append(p.problem("k", "thing failed", "boom"))
            clock.t += 10
        assert written == [True] + [False] * 5 + [True] + [False] * 5 + [True]
        assert p.snapshot() == {"k": {"message": "boom", "persistingSeconds": 130.0, "occurrences": 13}}
        assert p.clear("k", "thing works again")
    lines = [(r.name, r.getMessage(), getattr(r, "fields", {})) for r in caplog.records]
    assert [m for _, m, _ in lines] == ["thing failed"] * 3 + ["thing works again"]
    assert {name for name, _, _ in lines} == {"nodeagent.test"}  # the caller's logger
    assert lines[1][2]["persisting_seconds"] == 60.0 and lines[1][2]["occurrences"] == 7
    assert lines[3][2] == {"lasted_seconds": 130.0, "occurrences": 13}
    assert p.snapshot() == {}
