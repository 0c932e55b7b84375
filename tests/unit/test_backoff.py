"""Retry delays, one way: exponential, capped, with the jitter each caller needs."""

from __future__ import annotations

import itertools

import pytest

from nodeagent.util.backoff import Backoff


def test_exponential_and_capped_without_jitter() -> None:
    assert list(itertools.islice(Backoff(0.2, cap=1.0).delays(), 5)) == [0.2, 0.4, 0.8, 1.0, 1.0]


@pytest.mark.parametrize(("jitter", "low", "high"), [("full", 0.0, 8.0), ("equal", 4.0, 8.0)])
def test_jitter_bounds(jitter: str, low: float, high: float) -> None:
    b = Backoff(1.0, cap=60.0, jitter=jitter)  # type: ignore[arg-type]
    assert (b.delay(3, lambda: 0.0), b.delay(3, lambda: 1.0)) == (low, high)


def test_factor_one_is_a_fixed_poll() -> None:
    assert list(itertools.islice(Backoff(0.5, cap=0.5, factor=1.0).delays(), 3)) == [0.5, 0.5, 0.5]
