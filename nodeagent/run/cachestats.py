"""The image cache figures: image count, their size and how full the image filesystem is.

``CacheStats`` is the one place that sets ``nodeagent_image_cache_images``,
``nodeagent_image_cache_bytes`` and ``nodeagent_imagefs_used_ratio`` and the status file's
``cache`` part (with the time it was measured and by whom). Two list the images: the eviction
loop each cycle (``report``; and ``report_usage``, statvfs alone, after every pull) and the daemon
itself (``run``): once at start, ``PULL_SETTLE`` seconds after pulls stop unless a listing came in
since the last pull (eviction's own cycle after pulls usually does), and every ``INTERVAL`` seconds
when nothing listed for that long. In between, every successful pull of an image not in the last
listing adds it at once (``on_pull``: the record carries the image id and size), so the figures
never lag the pulls the status file shows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from nodeagent.eviction.policy import FsUsage
from nodeagent.eviction.usage import Imagefs, UsageError
from nodeagent.proxy.records import PullRecord
from nodeagent.run.metrics import Metrics
from nodeagent.run.statusfile import CacheStatus
from nodeagent.util.log import get_logger

if TYPE_CHECKING:
    from nodeagent.cri.runtime import ImageService

log = get_logger(__name__)

INTERVAL = 60.0
# After a pull, the daemon lists images once pulls have been quiet this long, unless eviction (whose
# own cycle follows pulls after 2 s) reported meanwhile.
PULL_SETTLE = 3.0

DAEMON, EVICTION, PULLS = "daemon", "eviction", "pulls"  # PULLS: a listing plus the pulls since


class CacheStats:
    def __init__(
        self,
        metrics: Metrics,
        imagefs: Imagefs,
        *,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.imagefs = imagefs  # located once, shared with the eviction loop
        self.current: CacheStatus | None = None
        self.pull_settle = PULL_SETTLE
        self.interval = INTERVAL
        self._on_change = on_change
        self._clock = clock
        self._last_pull = 0.0
        self._listed_at = 0.0
        self._sizes: dict[str, int] = {}  # image id -> size, as of the last listing and pulls since
        self._pulled = asyncio.Event()

    # --- reports ------------------------------------------------------------------------------
    def report(self, images: Mapping[str, int], usage: FsUsage | None, source: str) -> None:
        """The images just listed (id -> size), with the usage measured with them (None: unknown)."""
        self._sizes = dict(images)
        self._listed_at = self._clock()
        self._publish(usage.ratio if usage is not None else None, source)

    def _publish(self, ratio: float | None, source: str) -> None:
        size = sum(self._sizes.values())
        self.metrics.cache_images.set(len(self._sizes))
        self.metrics.cache_bytes.set(size)
        if ratio is not None:
            self.metrics.imagefs_used_ratio.set(ratio)
        self.current = CacheStatus(
            at=self._clock(),
            images=len(self._sizes),
            bytes=size,
            imagefs_used_ratio=None if ratio is None else round(ratio, 4),
            imagefs_path=str(self.imagefs.path or ""),
            source=source,
        )
        self._on_change()

    def report_usage(self, usage: FsUsage) -> None:
        """The image filesystem measured on its own (eviction does after every pull): the gauge
        follows at once; the status file gets it with the next image listing."""
        self.metrics.imagefs_used_ratio.set(usage.ratio)

    # --- the daemon's own measurements ----------------------------------------------------------
    def on_pull(self, record: PullRecord) -> None:
        """Pull listener: a new image counts at once; a listing follows once pulls settle."""
        self._last_pull = self._clock()
        self._pulled.set()
        current = self.current
        if current is None or not record.ok or not record.image_ref or record.image_ref in self._sizes:
            return
        self._sizes[record.image_ref] = record.bytes
        self._publish(current.imagefs_used_ratio, PULLS)

    async def refresh(self, cri: ImageService) -> None:
        """List the images and measure the image filesystem the way eviction does. Raises the CRI
        client's error when ListImages fails (a usage that cannot be measured is reported unknown)."""
        from nodeagent.cri.client import CriError

        images = await cri.list_images()
        usage: FsUsage | None
        try:
            usage = await self.imagefs.measure(cri)
        except (UsageError, CriError):
            usage = None
        self.report({i.id: i.size for i in images}, usage, DAEMON)

    def _stale(self) -> bool:
        if self.current is None:
            return True
        return self._listed_at < self._last_pull or self._clock() - self._listed_at >= self.interval

    async def run(self, cri: ImageService) -> None:
        """Measure at start, after pulls settle and every ``interval`` when nobody else did; until
        cancelled. An upstream that does not answer is left to /healthz and the status file."""
        from nodeagent.cri.client import CriError

        while True:
            if self._stale():
                try:
                    await self.refresh(cri)
                except CriError:
                    pass
                except Exception:
                    log.exception("cache stats failed")  # a bug: visible, and the loop goes on
            self._pulled.clear()
            try:
                async with asyncio.timeout(self.interval):
                    await self._pulled.wait()
                # a pull: wait until pulls have been quiet for pull_settle seconds
                while True:
                    self._pulled.clear()
                    try:
                        async with asyncio.timeout(self.pull_settle):
                            await self._pulled.wait()
                    except TimeoutError:
                        break
            except TimeoutError:
                pass
