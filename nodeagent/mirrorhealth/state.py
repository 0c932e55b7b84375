"""Hysteresis for one (registry, mirror): when does a mirror count as down, and when as up again.

Pure: no I/O, no clock of its own; every observation carries the time (``now``, monotonic seconds),
so tests drive it with a fake clock.

- ``failures_before_down`` consecutive failed probes take an up mirror down;
- ``successes_before_up`` consecutive good probes bring a down mirror back;
- ``hold_time``: after a transition the state holds for at least this long, however the probes go.
  Every transition is one hosts.toml rewrite, so a flapping mirror costs at most one rewrite per hold
  period. The first transition of a mirror is never held back (a mirror that dies at start-up goes
  down as soon as its failures count says so). While held, the counters keep counting, and the
  transition happens at the first probe after the hold ends if the streak still holds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Health(enum.Enum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class Thresholds:
    failures_before_down: int = 3
    successes_before_up: int = 5
    hold_time: float = 60.0

    def __post_init__(self) -> None:
        if self.failures_before_down < 1 or self.successes_before_up < 1:
            raise ValueError("failures_before_down and successes_before_up must be at least 1")
        if self.hold_time < 0:
            raise ValueError("hold_time must not be negative")


class MirrorState:
    def __init__(self, thresholds: Thresholds, initial: Health = Health.UP) -> None:
        self.thresholds = thresholds
        self.health = initial
        self.failures = 0  # consecutive
        self.successes = 0  # consecutive
        self.last_change: float | None = None  # time of the last transition
        self.transitions = 0

    def held_until(self) -> float | None:
        """End of the current hold period, or None if a transition could happen now."""
        if self.last_change is None:
            return None
        return self.last_change + self.thresholds.hold_time

    def observe(self, ok: bool, now: float) -> Health | None:
        """Record one probe outcome; returns the new health on a transition, else None."""
        if ok:
            self.successes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.successes = 0
        want: Health | None = None
        if self.health is Health.UP and self.failures >= self.thresholds.failures_before_down:
            want = Health.DOWN
        elif self.health is Health.DOWN and self.successes >= self.thresholds.successes_before_up:
            want = Health.UP
        if want is None:
            return None
        held = self.held_until()
        if held is not None and now < held:
            return None
        self.health = want
        self.last_change = now
        self.transitions += 1
        return want

    def force_down(self, now: float) -> Health | None:
        """A failure that needs no confirmation (the mirror's credentials cannot be had: nothing
        usable can be written for it). Goes down at once, whatever the streak or the hold."""
        self.failures = max(self.failures + 1, self.thresholds.failures_before_down)
        self.successes = 0
        if self.health is Health.DOWN:
            return None
        self.health = Health.DOWN
        self.last_change = now
        self.transitions += 1
        return Health.DOWN
