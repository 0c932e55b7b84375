"""Rate limits on an injectable clock: ``TokenBucket`` for actions (eviction's RemoveImage calls),
``PeriodicLog`` for log lines about a problem that persists (eviction, mirror health).

``PeriodicLog`` is the WALinuxAgent habit: a problem is logged when it starts, again once per
period while it lasts (with for how long and how often it happened), and once when it clears, so a
node whose registry mirror is down for a day logs a few hundred lines, not one per probe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nodeagent.util.log import event, get_logger

log = get_logger(__name__)

WARNING = 30
LOG_PERIOD = 600.0  # a persisting problem is logged again at most this often

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class TokenBucket:
    """``rate`` actions per second, bursts of ``burst``; ``acquire()`` waits for a token."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst = rate, float(burst)
        self._clock, self._sleep = clock, sleep
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    async def acquire(self) -> float:
        """Take a token, waiting if needed; returns the seconds waited."""
        waited = 0.0
        self._refill()
        while self._tokens < 1.0:
            delay = (1.0 - self._tokens) / self.rate
            await self._sleep(delay)
            waited += delay
            self._refill()
        self._tokens -= 1.0
        return waited


@dataclass
class _Condition:
    since: float
    last_logged: float
    count: int = 1
    message: str = ""


class PeriodicLog:
    """Problems that may persist, by key: logged when one starts, again once per ``period`` while
    it lasts (with for how long and how often), and once when it clears."""

    def __init__(
        self, period: float = LOG_PERIOD, clock: Clock = time.monotonic, logger: logging.Logger | None = None
    ) -> None:
        self.period = period
        self._clock = clock
        self._log = logger or log  # the lines carry the name of the module whose problem it is
        self.active: dict[str, _Condition] = {}

    def problem(self, key: str, msg: str, message: str, level: int = WARNING, **fields: Any) -> bool:
        """Record one occurrence; returns True when a log line was written."""
        now = self._clock()
        c = self.active.get(key)
        if c is None:
            self.active[key] = _Condition(now, now, 1, message)
            event(self._log, msg, level=level, error=message, **fields)
            return True
        c.count += 1
        c.message = message
        if now - c.last_logged >= self.period:
            c.last_logged = now
            event(
                self._log,
                msg,
                level=level,
                error=message,
                persisting_seconds=round(now - c.since, 1),
                occurrences=c.count,
                **fields,
            )
            return True
        return False

    def clear(self, key: str, msg: str, **fields: Any) -> bool:
        """The problem ``key`` is over: one line with how long it lasted (nothing if it was not
        active). Returns True when a line was written."""
        c = self.active.pop(key, None)
        if c is None:
            return False
        event(self._log, msg, lasted_seconds=round(self._clock() - c.since, 1), occurrences=c.count, **fields)
        return True

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        return {
            k: {"message": c.message, "persistingSeconds": round(now - c.since, 1), "occurrences": c.count}
            for k, c in self.active.items()
        }
