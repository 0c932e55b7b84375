"""Hysteresis with a fake clock: the times below are the clock, nothing sleeps."""

from __future__ import annotations

import itertools

import pytest

from nodeagent.mirrorhealth.state import Health, MirrorState, Thresholds

T = Thresholds(failures_before_down=3, successes_before_up=2, hold_time=60.0)


def feed(s: MirrorState, outcomes: str, start: float, step: float = 2.0) -> list[tuple[float, Health]]:
    """Feed 'x' (fail) / 'o' (ok) probes every ``step`` seconds; return the transitions seen."""
    seen = []
    for i, c in enumerate(outcomes):
        now = start + i * step
        new = s.observe(c == "o", now)
        if new is not None:
            seen.append((now, new))
    return seen


def test_goes_down_after_n_consecutive_failures_and_not_before() -> None:
    s = MirrorState(T)
    assert feed(s, "xxoxx", 0.0) == []  # a success resets the streak
    assert s.health is Health.UP
    assert feed(s, "x", 10.0) == [(10.0, Health.DOWN)]


def test_first_transition_is_not_held_back() -> None:
    s = MirrorState(T)
    assert feed(s, "xxx", 0.0) == [(4.0, Health.DOWN)]


def test_comes_back_after_m_successes_once_the_hold_time_has_passed() -> None:
    s = MirrorState(T)
    feed(s, "xxx", 0.0)  # down at t=4
    assert feed(s, "oo", 10.0) == []  # streak reached, but held until t=64
    assert s.health is Health.DOWN
    assert feed(s, "o" * 30, 14.0) == [(64.0, Health.UP)]


def test_flapping_mirror_causes_at_most_one_transition_per_hold_period() -> None:
    s = MirrorState(T)
    # a mirror that alternates 3 dead / 2 alive probes for 30 minutes, probed every 2 s
    transitions = feed(s, "xxxoo" * 180, 0.0)
    times = [t for t, _ in transitions]
    assert len(times) >= 2
    assert all(b - a >= T.hold_time for a, b in itertools.pairwise(times))
    assert len(times) <= 1800 / T.hold_time + 1
    # and the transitions alternate
    assert [h for _, h in transitions][:2] == [Health.DOWN, Health.UP]


def test_failures_during_hold_take_effect_right_after_the_hold_if_still_failing() -> None:
    s = MirrorState(T)
    feed(s, "xxx", 0.0)  # down at 4
    feed(s, "o" * 31, 6.0)  # up at 64
    assert s.health is Health.UP and s.last_change == 64.0
    assert feed(s, "x" * 40, 70.0) == [(124.0, Health.DOWN)]


def test_initially_down_mirror_comes_up_without_waiting_for_a_hold() -> None:
    s = MirrorState(T, initial=Health.DOWN)
    assert feed(s, "oo", 0.0) == [(2.0, Health.UP)]


@pytest.mark.parametrize(("n", "m", "hold"), [(0, 1, 1.0), (1, 0, 1.0), (1, 1, -1.0)])
def test_invalid_thresholds_are_refused(n: int, m: int, hold: float) -> None:
    with pytest.raises(ValueError, match="must"):
        Thresholds(n, m, hold)
