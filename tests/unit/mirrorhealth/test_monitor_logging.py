"""Mirror health logs a problem that persists the way eviction does (throttle.PeriodicLog): when it
starts, once per period while it lasts (with for how long), and once when it clears; not once per
probe, and not only once."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from nodeagent.config.model import Mirror
from tests.unit.mirrorhealth.test_monitor import A, FakeWriter, make, rounds


def lines(caplog: pytest.LogCaptureFixture, *msgs: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (r.getMessage(), getattr(r, "fields", {}))
        for r in caplog.records
        if r.name == "nodeagent.mirrorhealth.monitor" and r.getMessage() in msgs
    ]


def test_a_mirror_down_for_half_an_hour_is_logged_once_per_period_then_up_with_how_long(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mh, net, _ = make()
    net.alive[A.endpoint] = False
    with caplog.at_level(logging.INFO, logger="nodeagent"):
        rounds(mh, net, 900)  # a probe every 2 s for 30 minutes; down after the 3rd
        down = lines(caplog, "mirror down")
        assert len(down) == 3  # at the transition, then after 10 and 20 minutes
        first, again, third = (f for _, f in down)
        assert first["mirror"] == A.endpoint and first["hosts_toml"] == "rewritten"
        assert first["error"] == "timeout after 1s" and "persisting_seconds" not in first
        assert (again["persisting_seconds"], third["persisting_seconds"]) == (600.0, 1200.0)
        assert again["occurrences"] == 301  # every failed probe is counted, one line written
        net.alive[A.endpoint] = True
        rounds(mh, net, 2)
    (up,) = lines(caplog, "mirror up")
    assert up[1]["mirror"] == A.endpoint and up[1]["hosts_toml"] == "rewritten"
    assert up[1]["lasted_seconds"] == 1798.0  # from the 3rd probe (t=4 s) to the 2nd good one (t=1802 s)
    assert mh.problems.snapshot() == {}


class BrokenWriter(FakeWriter):
    def __init__(self) -> None:
        super().__init__({"docker.io": (A.endpoint,)})
        self.broken = True

    def write(self, registry: str, active: tuple[Mirror, ...]) -> bool:
        if self.broken:
            raise OSError(28, "No space left on device")
        return super().write(registry, active)


def test_hosts_toml_that_cannot_be_written_is_logged_once_per_period_and_when_it_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = BrokenWriter()
    mh, net, _ = make(writer=w, mirrors=(A,))
    net.alive[A.endpoint] = False
    with caplog.at_level(logging.INFO, logger="nodeagent"):
        rounds(mh, net, 400)  # the write is retried on every probe for 800 s
        failed = lines(caplog, "cannot rewrite hosts.toml")
        assert len(failed) == 2  # when it started, and once after 10 minutes
        assert failed[0][1]["registry"] == "docker.io" and "No space left" in failed[0][1]["error"]
        w.broken = False
        rounds(mh, net, 1)
    assert [m for m, _ in lines(caplog, "hosts.toml rewritten again")] == ["hosts.toml rewritten again"]
    assert w.files["docker.io"] == ()  # the dead mirror is out now
