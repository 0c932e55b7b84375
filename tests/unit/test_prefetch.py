"""Prefetcher logic against the FAKE runtime (tests/unit/cri/fakes.py: CriClient's image calls and
errors, in process, not containerd; the real one is in tests/integration/test_prefetch.py).
Backoff sleeps go through an injected clock, so nothing here waits for real except the budget test."""

from __future__ import annotations

import asyncio
import io

import grpc
import pytest

from nodeagent.config.model import PrefetchImage
from nodeagent.images.credentials import Auth, Credentials
from nodeagent.images.prefetch import (
    BUDGET_SPENT,
    ImageOutcome,
    Prefetcher,
    PrefetchReport,
    PullRetry,
    pick_digest,
)
from nodeagent.images.prefetch_output import LineProgress, TtyProgress, format_summary
from tests.unit.cri.fakes import FakeClock, FakeRuntime


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def runtime(
    present: dict[str, tuple[str, int, str]] | None = None,
    fail: dict[str, list[tuple[grpc.StatusCode, str]] | None] | None = None,
    pull_delay: float = 0.0,
) -> FakeRuntime:
    """The FAKE runtime with ``present``: image -> (id, size, manifest digest), and ``fail``: image ->
    the (code, details) answered by successive PullImage calls before success (None: the image
    does not exist)."""
    rt = FakeRuntime(pull_delay=pull_delay)
    for name, (iid, size, dg) in (present or {}).items():
        rt.add_image(iid, size, tags=[name], digests=[f"{name.rsplit(':', 1)[0]}@{dg}"])
    for image, script in (fail or {}).items():
        if script is None:
            rt.missing.add(image)
        else:
            rt.pull_errors[image] = list(script)
    return rt


def run(pf: Prefetcher) -> PrefetchReport:
    report = asyncio.run(pf.run())
    assert isinstance(pf.cri, FakeRuntime)
    for pull in pf.cri.pulls:
        assert pull.retry is False, "prefetch retries pulls itself: the client's retry would multiply it"
        assert pull.metadata == (("x-nodeagent-origin", "prefetch"),)  # recorded as prefetch by the proxy
    return report


def images(*names: str, required: bool = False) -> list[PrefetchImage]:
    return [PrefetchImage(n, required=required) for n in names]


def test_present_images_are_skipped_without_pulling() -> None:
    cri = runtime(present={"r.io/a:1": (digest(7), 123, digest(8))})
    report = run(Prefetcher(cri, images("r.io/a:1", "r.io/b:1")))
    a, b = report.outcomes
    assert (a.result, a.image_id, a.size, a.digest) == ("present", digest(7), 123, digest(8))
    assert b.result == "pulled" and b.digest and b.size > 0
    assert [p[0] for p in cri.pulls] == ["r.io/b:1"]
    assert report.exit_code == 0


def test_rate_limited_retries_with_longer_backoff_than_network() -> None:
    clock = FakeClock()
    cri = runtime(
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
    cri = runtime(fail={"r.io/net:1": net, "r.io/gone:1": None})
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
    cri = runtime(pull_delay=0.02)
    names = [f"r.io/i{i}:1" for i in range(9)]
    report = run(Prefetcher(cri, images(*names), concurrency=3))
    assert all(o.result == "pulled" for o in report.outcomes)
    assert cri.max_active == 3


def test_budget_cancels_running_pulls_and_counts_as_missing() -> None:
    cri = runtime(pull_delay=30.0)
    pf = Prefetcher(cri, images("r.io/slow:1", required=True), budget=0.2)
    report = run(pf)
    (o,) = report.outcomes
    assert (o.result, o.error) == ("canceled", BUDGET_SPENT)
    assert report.budget_spent and report.exit_code == 1
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
    cri = runtime(fail={"r.io/p:1": [(grpc.StatusCode.UNKNOWN, "401 Unauthorized")] * 5})
    report = run(Prefetcher(cri, images("r.io/p:1"), credentials=creds))
    (o,) = report.outcomes
    assert o.result == "unauthorized" and o.attempts == 2
    assert creds.forgotten == ["r.io/p:1"]
    assert [p[1]["password"] for p in cri.pulls] == ["pw1-secret", "pw2-secret"]


def test_summary_table_and_plain_progress_lines() -> None:
    out = io.StringIO()
    cri = runtime(present={"r.io/a:1": (digest(7), 2_500_000, digest(8))}, fail={"r.io/gone:1": None})
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
    cri = runtime(fail={"r.io/net:1": [(grpc.StatusCode.UNKNOWN, "connection refused")] * 10})
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
