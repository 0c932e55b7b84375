"""The mirror health section carries the time of its latest probe (the status file's ``at``)."""

from __future__ import annotations

from nodeagent.run.statusfile import Section
from tests.unit.mirrorhealth.test_monitor import A, make, rounds


def test_the_section_says_when_the_mirrors_were_last_probed() -> None:
    mh, net, _ = make()
    assert "at" not in mh.status()
    rounds(mh, net, 3)  # probes at 1000, 1002, 1004
    net.now += 30
    section = Section.of(mh.status(), at=net.now)
    assert section.at == 1004.0
    assert section.fields["mirrors"][0]["mirror"] == A.endpoint
