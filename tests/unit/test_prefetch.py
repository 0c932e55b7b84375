"""Prefetcher logic against a FAKE in-memory CRI image service (same methods and errors as
nodeagent.cri.client.CriClient, not containerd; the real one is in tests/integration/test_prefetch.py).
Backoff sleeps go through an injected clock, so nothing here waits for real except the budget test."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from nodeagent.config.model import PrefetchImage
from nodeagent.credentials import Auth, Credentials
from nodeagent.cri.client import CriError
from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.prefetch import (
    BUDGET_SPENT,
    ImageOutcome,
    Prefetcher,
    PrefetchReport,
    PullRetry,
    pick_digest,
)
from nodeagent.prefetch_output import LineProgress, TtyProgress, format_summary
from tests.unit.cri.fakes import FakeClock


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


@dataclass
class FakeCri:
    """``present``: image -> (id, size, manifest digest). ``fail``: image -> list of (code, details)
    answered by successive PullImage calls before success (None: the image does not exist)."""

    present: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    fail: dict[str, list[tuple[grpc.StatusCode, str]] | None] = field(default_factory=dict)
    pull_delay: float = 0.0
    pulls: list[tuple[str, Any, float | None]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def image_status(self, image: str, verbose: bool = False) -> Any:
        for name, (iid, size, dg) in self.present.items():
            if image in (name, iid):
                repo = name.rsplit(":", 1)[0]
                return pb.ImageStatusResponse(
                    image=pb.Image(id=iid, size=size, repo_tags=[name], repo_digests=[f"{repo}@{dg}"])
                )
        return pb.ImageStatusResponse()

    async def pull_image(
        self,
        image: str,
        auth: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109
        retry: bool = True,
        metadata: Any = None,
    ) -> str:
        assert retry is False, "prefetch retries pulls itself: the client's retry would multiply it"
        assert metadata == (("x-nodeagent-origin", "prefetch"),)  # recorded as prefetch by the proxy
        self.pulls.append((image, auth, timeout))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.pull_delay:
                if timeout is not None and timeout < self.pull_delay:
                    await asyncio.sleep(timeout)
                    raise CriError(
                        "fake", "PullImage", grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
                    )
                await asyncio.sleep(self.pull_delay)
            script = self.fail.get(image, [])
            if script is None:
                raise CriError("fake", "PullImage", grpc.StatusCode.NOT_FOUND, f"{image}: not found")
            if script:
                code, details = script.pop(0)
                raise CriError("fake", "PullImage", code, details)
            n = len(self.present) + 1
            self.present[image] = (digest(1000 + n), 1000 * n, digest(n))
            return digest(1000 + n)
        finally:
            self.in_flight -= 1


def run(pf: Prefetcher) -> PrefetchReport:
    return asyncio.run(pf.run())


def images(*names: str, required: bool = False) -> list[PrefetchImage]:
    return [PrefetchImage(n, required=required) for n in names]


def test_present_images_are_skipped_without_pulling() -> None:
    cri = FakeCri(present={"r.io/a:1": (digest(7), 123, digest(8))})
    report = run(Prefetcher(cri, images("r.io/a:1", "r.io/b:1")))
    a, b = report.outcomes
    assert (a.result, a.image_id, a.size, a.digest) == ("present", digest(7), 123, digest(8))
    assert b.result == "pulled" and b.digest and b.size > 0
    assert [p[0] for p in cri.pulls] == ["r.io/b:1"]
    assert report.exit_code == 0


def test_rate_limited_retries_with_longer_backoff_than_network() -> None:
    clock = FakeClock()
    cri = FakeCri(
        fail={
            "r.io/rl:1": [(grpc.StatusCode.UNKNOWN, "429 Too Many Requests: toomanyrequests")],
            "r.io/net:1": [(grpc.StatusCode.UNKNOWN, "dial tcp 10.0.0.1:443: connection refused")],
        }
    )
    retry = PullRetry(attempts=3, base=1.0, rate_limited_base=10.0, max_backoff=60.0)
    pf = Prefetcher(cri, images("r.io/rl:1"), retry=retry, clock=clock, sleep=clock.sleep, rng=lambda: 0.0)
    report = run(pf)
    assert report.outcomes[0].result == "pulled" and report.outcomes[0].attempts == 2
    assert clock.sleeps == [5.0]  # rate_limited_base * (0.5 + 0.5 * rng)
    clock2 = FakeClock()
    pf = Prefetcher(cri, images("r.io/net:1"), retry=retry, clock=clock2, sleep=clock2.sleep, rng=lambda: 0.0)
    run(pf)
    assert clock2.sleeps == [0.5]


def test_retries_are_bounded_and_not_found_is_not_retried() -> None:
    clock = FakeClock()
    net = [(grpc.StatusCode.UNKNOWN, "i/o timeout")] * 10
    cri = FakeCri(fail={"r.io/net:1": net, "r.io/gone:1": None})
    pf = Prefetcher(
        cri,
        images("r.io/net:1", "r.io/gone:1", required=True),
        retry=PullRetry(attempts=4),
        clock=clock,
        sleep=clock.sleep,
    )
    report = run(pf)
    by = {o.image: o for o in report.outcomes}
    assert (by["r.io/net:1"].result, by["r.io/net:1"].attempts) == ("network", 4)
    assert (by["r.io/gone:1"].result, by["r.io/gone:1"].attempts) == ("not_found", 1)
    assert len(clock.sleeps) == 3
    assert report.exit_code == 1
    assert {o.image for o in report.missing_required} == {"r.io/net:1", "r.io/gone:1"}


def test_concurrency_is_bounded() -> None:
    cri = FakeCri(pull_delay=0.02)
    names = [f"r.io/i{i}:1" for i in range(9)]
    report = run(Prefetcher(cri, images(*names), concurrency=3))
    assert all(o.result == "pulled" for o in report.outcomes)
    assert cri.max_in_flight == 3


def test_budget_cancels_running_pulls_and_counts_as_missing() -> None:
    cri = FakeCri(pull_delay=30.0)
    pf = Prefetcher(cri, images("r.io/slow:1", required=True), budget=0.2)
    report = run(pf)
    (o,) = report.outcomes
    assert (o.result, o.error) == ("canceled", BUDGET_SPENT)
    assert report.budget_spent and report.exit_code == 1
    assert report.seconds < 5
    assert cri.pulls[0][2] is not None and cri.pulls[0][2] <= 0.2  # the gRPC deadline is the budget left


class FakeCredentials(Credentials):
    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0
        self.forgotten: list[str] = []

    def lookup(self, image: str) -> Auth | None:
        self.lookups += 1
        return Auth(username="u", password=f"pw{self.lookups}-secret", source="provider fake")

    def forget(self, image: str) -> None:
        self.forgotten.append(image)


def test_unauthorized_asks_the_provider_again_once() -> None:
    creds = FakeCredentials()
    cri = FakeCri(fail={"r.io/p:1": [(grpc.StatusCode.UNKNOWN, "401 Unauthorized")] * 5})
    report = run(Prefetcher(cri, images("r.io/p:1"), credentials=creds))
    (o,) = report.outcomes
    assert o.result == "unauthorized" and o.attempts == 2
    assert creds.forgotten == ["r.io/p:1"]
    assert [p[1]["password"] for p in cri.pulls] == ["pw1-secret", "pw2-secret"]


def test_summary_table_and_plain_progress_lines() -> None:
    out = io.StringIO()
    cri = FakeCri(present={"r.io/a:1": (digest(7), 2_500_000, digest(8))}, fail={"r.io/gone:1": None})
    report = run(
        Prefetcher(cri, [PrefetchImage("r.io/a:1"), PrefetchImage("r.io/gone:1")], progress=LineProgress(out))
    )
    text = format_summary(report)
    lines = text.splitlines()
    assert lines[0].split() == ["IMAGE", "DIGEST", "SIZE", "TIME", "RESULT"]
    assert lines[1].split()[:4] == ["r.io/a:1", digest(8)[:19], "2.5", "MB"]
    assert lines[1].endswith("present")
    assert lines[2].split()[-2:] == ["FAILED", "not_found"]
    assert "r.io/gone:1: not_found: r.io/gone:1: not found" in text
    assert lines[-1].startswith("prefetch: 2 image(s): 1 present, 1 not_found in ")
    events = out.getvalue().splitlines()
    assert any(e.endswith(f"r.io/a:1: present ({digest(8)[:19]}, 2.5 MB, 0.0s)") for e in events)
    assert "\x1b[" not in out.getvalue()


def test_tty_progress_redraws_one_line_per_image() -> None:
    out = io.StringIO()
    p = TtyProgress(out)
    a, b = ImageOutcome("r.io/a:1"), ImageOutcome("r.io/b:1")
    p.start([a, b])
    a.started = 0.0
    p.update(a, "pulling")
    a.result, a.digest, a.size = "pulled", digest(1), 10
    p.update(a, "pulled")
    text = out.getvalue()
    assert text.count("\x1b[2F") == 2  # moved back up over the 2-line view before each redraw
    last = text.rsplit("\x1b[2F", 1)[1]
    assert "✓ r.io/a:1  pulled sha256:" in last and "r.io/b:1  waiting" in last


@pytest.mark.parametrize(
    ("image", "repo_digests", "want"),
    [
        ("r.io/a:1", ["r.io/a@" + digest(1)], digest(1)),
        ("busybox", ["docker.io/library/busybox@" + digest(2)], digest(2)),
        ("r.io/a:1", ["other.io/x@" + digest(3), "r.io/a@" + digest(4)], digest(4)),
        ("r.io/a@" + digest(5), ["r.io/a@" + digest(6)], digest(5)),
        ("localhost:5000/a:1", ["localhost:5000/a@" + digest(7)], digest(7)),
    ],
)
def test_pick_digest(image: str, repo_digests: list[str], want: str) -> None:
    assert pick_digest(image, repo_digests) == want


def test_tty_progress_fits_many_images_into_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=(0, 0): os.terminal_size((80, 10)))
    out = io.StringIO()
    p = TtyProgress(out)
    outcomes = [ImageOutcome(f"r.io/img{i}:1") for i in range(30)]
    for o in outcomes[:25]:
        o.result = "pulled"
    p.start(outcomes)
    frame = out.getvalue()
    assert frame.count("\n") == 6  # 5 still pending + the count line, within 10 rows
    assert "... 25 done, 0 more in progress or waiting" in frame
    assert all(len(line) <= 79 + len("\x1b[2K") for line in frame.split("\n"))


def test_running_out_of_budget_while_retrying_keeps_the_failure_class() -> None:
    clock = FakeClock()
    cri = FakeCri(fail={"r.io/net:1": [(grpc.StatusCode.UNKNOWN, "connection refused")] * 10})
    pf = Prefetcher(
        cri,
        images("r.io/net:1"),
        budget=3.0,
        retry=PullRetry(attempts=10, base=1.0),
        clock=clock,
        sleep=clock.sleep,
        rng=lambda: 1.0,
    )
    report = run(pf)
    (o,) = report.outcomes
    assert o.result == "network"
    assert o.error == f"connection refused; {BUDGET_SPENT}"
    assert report.budget_spent
    assert sum(clock.sleeps) <= 3.0  # never slept past the budget
