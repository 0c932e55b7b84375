"""Retry delays, one way: exponential backoff with a cap and an optional jitter.

``Backoff(base, cap).delay(n)`` is the wait before retry ``n`` (0 for the first retry):
``min(cap, base * factor**n)``, then jittered. ``jitter="full"`` draws from ``[0, d]`` (the AWS
architecture blog's "full jitter", for many clients retrying one server: the CRI client);
``"equal"`` from ``[d/2, d]`` (never retry at once: prefetch, the pod watch); ``"none"`` waits exactly
``d`` (a single client with an overall deadline: IMDS, a worker restart). ``rng`` is injectable so
tests see exact delays. Callers keep their own attempt count and deadline; this only says how long.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

Jitter = Literal["none", "full", "equal"]


@dataclass(frozen=True)
class Backoff:
    base: float
    cap: float
    factor: float = 2.0
    jitter: Jitter = "none"

    def delay(self, retry: int, rng: Callable[[], float] | None = None) -> float:
        """``rng``: a uniform [0, 1) source (default ``random.random``; imported only for jitter)."""
        d = min(self.cap, self.base * self.factor ** max(0, retry))
        if self.jitter == "none":
            return d
        if rng is None:
            import random

            rng = random.random
        return rng() * d if self.jitter == "full" else d * (0.5 + 0.5 * rng())

    def delays(self, rng: Callable[[], float] | None = None) -> Iterator[float]:
        """The delay before each retry in turn (endless; the caller stops)."""
        n = 0
        while True:
            yield self.delay(n, rng)
            n += 1
