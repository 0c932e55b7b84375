"""Pull ``images.prefetch`` through CRI before the kubelet starts (``nodeagent prefetch``).

Pulls go through the CRI ImageService (containerd's CRI plugin, namespace ``k8s.io``, the snapshotter
CRI uses), so the kubelet finds the images in its own cache. Per image: ImageStatus first (an image
already present is skipped in milliseconds), then credentials (``nodeagent.images.credentials``: the
kubelet's credential provider plugins, docker config), then PullImage with retries and backoff
(longer after ``rate_limited``), at most ``images.prefetchConcurrency`` pulls at once, everything
inside ``images.prefetchBudget``: when the budget is spent, pulls still running are canceled.

Failures are classified into the closed result set of the metrics (``not_found``, ``unauthorized``,
``rate_limited``, ``network``, ``no_space``, ``canceled``, ``other``) by the same classifier as the
CRI proxy. A successful image ends as ``present`` (was there) or ``pulled``. What is printed while
and after it runs: ``nodeagent.images.prefetch_output``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from nodeagent.config.model import PrefetchImage
from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.cri.runtime import ImageService
from nodeagent.images.credentials import Auth, CredentialError, Credentials
from nodeagent.proxy.records import ORIGIN_PREFETCH, classify
from nodeagent.util.backoff import Backoff

PRESENT = "present"
PULLED = "pulled"
PENDING = "pending"
OK_RESULTS = (PRESENT, PULLED)
# Worth another attempt: the registry or the network may answer next time.
RETRYABLE = frozenset({"network", "rate_limited", "other"})
BUDGET_SPENT = "prefetch budget spent"
MAX_ERROR_CHARS = 300
# Through nodeagent's proxy (``cri.endpoint`` pointing at it), prefetch's pulls are recorded as its own.
ORIGIN_METADATA = (("x-nodeagent-origin", ORIGIN_PREFETCH),)


@dataclass
class ImageOutcome:
    image: str
    required: bool = False
    pin: bool = False
    result: str = PENDING
    image_id: str = ""
    digest: str = ""  # manifest digest (RepoDigests), sha256:...
    size: int = 0
    seconds: float = 0.0
    attempts: int = 0
    error: str = ""
    started: float | None = None  # clock() when work on it began (for the live view)

    @property
    def ok(self) -> bool:
        return self.result in OK_RESULTS


@dataclass
class PrefetchReport:
    outcomes: list[ImageOutcome]
    seconds: float
    budget_spent: bool = False

    @property
    def missing_required(self) -> list[ImageOutcome]:
        return [o for o in self.outcomes if o.required and not o.ok]

    @property
    def exit_code(self) -> int:
        return 1 if self.missing_required else 0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.result] = out.get(o.result, 0) + 1
        return out


@dataclass(frozen=True)
class PullRetry:
    """``attempts`` pulls at most per image; between them ``base * 2**n`` seconds (jittered, capped at
    ``max_backoff``), starting from ``rate_limited_base`` after a ``rate_limited`` answer."""

    attempts: int = 4
    base: float = 1.0
    rate_limited_base: float = 10.0
    max_backoff: float = 60.0

    def delay(self, result: str, retry: int, rng: Callable[[], float] = random.random) -> float:
        base = self.rate_limited_base if result == "rate_limited" else self.base
        return Backoff(base, self.max_backoff, jitter="equal").delay(retry, rng)


class Progress(Protocol):
    def start(self, outcomes: Sequence[ImageOutcome]) -> None: ...
    def update(self, outcome: ImageOutcome, state: str, detail: str = "") -> None: ...
    def tick(self) -> None: ...
    def finish(self, report: PrefetchReport) -> None: ...


class Prefetcher:
    def __init__(
        self,
        cri: ImageService,  # nodeagent.cri.client.CriClient
        images: Sequence[PrefetchImage],
        *,
        concurrency: int = 4,
        budget: float = 300.0,
        credentials: Credentials | None = None,
        progress: Progress | None = None,
        retry: PullRetry | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        tick_interval: float = 0.25,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.cri = cri
        self.images = tuple(images)
        self.concurrency = concurrency
        self.budget = budget
        self.credentials = credentials
        self.progress: Progress = progress or NullProgress()
        self.retry = retry or PullRetry()
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._tick_interval = tick_interval
        self._deadline = 0.0

    def remaining(self) -> float:
        return self._deadline - self._clock()

    async def run(self) -> PrefetchReport:
        start = self._clock()
        self._deadline = start + self.budget
        outcomes = [ImageOutcome(i.image, i.required, i.pin) for i in self.images]
        self.progress.start(outcomes)
        sem = asyncio.Semaphore(self.concurrency)

        async def one(o: ImageOutcome) -> None:
            async with sem:
                await self._one(o)

        tasks = [asyncio.create_task(one(o)) for o in outcomes]
        ticker = asyncio.create_task(self._ticker())
        budget_spent = False
        try:
            # Every step already stops at the deadline; this is the backstop (e.g. a hung ImageStatus).
            _, pending = await asyncio.wait(tasks, timeout=self.budget + 5.0) if tasks else (set(), set())
            for t in pending:
                t.cancel()
            if pending:
                budget_spent = True
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        for o in outcomes:
            if o.result == PENDING:
                o.result, o.error = "canceled", BUDGET_SPENT
            if o.error.endswith(BUDGET_SPENT):
                budget_spent = True
        report = PrefetchReport(outcomes, self._clock() - start, budget_spent)
        self.progress.finish(report)
        return report

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self._tick_interval)
            self.progress.tick()

    def _fill(self, o: ImageOutcome, image: pb.Image) -> None:
        o.image_id = image.id
        o.size = image.size
        o.digest = pick_digest(o.image, list(image.repo_digests))

    async def _one(self, o: ImageOutcome) -> None:
        o.started = t0 = self._clock()
        try:
            await self._work(o)
        except asyncio.CancelledError:
            o.result, o.error = "canceled", BUDGET_SPENT
            o.seconds = self._clock() - t0
            self.progress.update(o, o.result, o.error)
            raise
        o.seconds = self._clock() - t0
        self.progress.update(o, o.result, o.error)

    async def _work(self, o: ImageOutcome) -> None:
        from nodeagent.cri.client import CriError

        self.progress.update(o, "checking")
        try:
            status = await self.cri.image_status(o.image)
        except CriError as e:
            status = None  # cannot tell; the pull below says what is wrong
            self.progress.update(o, "checking", f"ImageStatus failed: {_short(e.details)}")
        if status is not None and status.HasField("image"):
            self._fill(o, status.image)
            o.result = PRESENT
            return

        auth = await self._auth(o)
        refreshed = False
        for attempt in range(1, self.retry.attempts + 1):
            remaining = self.remaining()
            if remaining <= 0:
                self._out_of_budget(o)
                return
            o.attempts = attempt
            self.progress.update(o, "pulling", f"attempt {attempt}" if attempt > 1 else "")
            try:
                ref = await self.cri.pull_image(
                    o.image,
                    auth=auth.cri_fields() if auth else None,
                    timeout=remaining,
                    retry=False,
                    metadata=ORIGIN_METADATA,
                )
            except CriError as e:
                code = e.code.name if e.code is not None else "UNKNOWN"
                result = classify(code, e.details)
                o.result, o.error = result, _short(e.details)
                if result == "canceled" and self.remaining() <= 0.05:
                    o.error = BUDGET_SPENT
                    return
                if result == "unauthorized" and auth is not None and not refreshed and self.credentials:
                    # A cached provider answer may have expired early: ask the provider again, once.
                    refreshed = True
                    self.credentials.forget(o.image)
                    auth = await self._auth(o)
                    continue
                if result not in RETRYABLE or attempt == self.retry.attempts:
                    return
                delay = min(self.retry.delay(result, attempt - 1, self._rng), self.remaining())
                if delay <= 0:
                    self._out_of_budget(o)
                    return
                self.progress.update(o, "retrying", f"{result}: retry in {delay:.1f}s")
                await self._sleep(delay)
                continue
            o.error = ""
            try:
                status = await self.cri.image_status(ref)
            except CriError:
                status = None
            if status is not None and status.HasField("image"):
                self._fill(o, status.image)
            o.result = PULLED
            return

    @staticmethod
    def _out_of_budget(o: ImageOutcome) -> None:
        """No time left for (another) attempt: keep the last failure's class, say why it stopped."""
        if o.result == PENDING:
            o.result, o.error = "canceled", BUDGET_SPENT
        else:
            o.error = f"{o.error}; {BUDGET_SPENT}" if o.error else BUDGET_SPENT

    async def _auth(self, o: ImageOutcome) -> Auth | None:
        if self.credentials is None:
            return None
        try:
            return await asyncio.to_thread(self.credentials.lookup, o.image)
        except CredentialError as e:
            # Try anonymously: public images still work; a private one fails as unauthorized.
            self.progress.update(o, "credentials", str(e))
            return None


def _repo_of(ref: str) -> str:
    """``host/repo`` of a reference: digest and tag removed."""
    ref = ref.split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def pick_digest(image: str, repo_digests: Sequence[str]) -> str:
    """The manifest digest for ``image`` from RepoDigests (``repo@sha256:...``), matching its repo."""
    from nodeagent.util.imageref import normalize

    if "@" in image:
        return image.rsplit("@", 1)[1]
    want = _repo_of(normalize(image))
    for rd in repo_digests:
        name, _, digest = rd.partition("@")
        if _repo_of(normalize(name)) == want:
            return digest
    return repo_digests[0].partition("@")[2] if repo_digests else ""


def _short(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


class NullProgress:
    def start(self, outcomes: Sequence[ImageOutcome]) -> None:
        pass

    def update(self, outcome: ImageOutcome, state: str, detail: str = "") -> None:
        pass

    def tick(self) -> None:
        pass

    def finish(self, report: PrefetchReport) -> None:
        pass
