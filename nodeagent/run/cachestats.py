"""The image cache figures: image count, their size and how full the image filesystem is.

``CacheStats`` is the one place that sets ``nodeagent_image_cache_images``,
``nodeagent_image_cache_bytes`` and ``nodeagent_imagefs_used_ratio`` and the status file's
``cache`` part (with the time it was measured). Two measure: the eviction loop each cycle
(``report``, and ``report_usage`` after every pull) and the daemon itself (``run``): once at
start, ``PULL_SETTLE`` seconds after pulls stop unless a report came in since the last pull
(eviction's own cycle after pulls usually did), and every ``INTERVAL`` seconds when nothing
reported for that long.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from nodeagent.eviction.policy import FsUsage
from nodeagent.eviction.usage import Imagefs, UsageError
from nodeagent.log import get_logger
from nodeagent.metrics import Metrics
from nodeagent.statusfile import CacheStatus

log = get_logger(__name__)

INTERVAL = 60.0
# After a pull, the daemon lists images once pulls have been quiet this long, unless eviction (whose
# own cycle follows pulls after 2 s) reported meanwhile.
PULL_SETTLE = 3.0

DAEMON, EVICTION = "daemon", "eviction"


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
        self._pulled = asyncio.Event()

    # --- reports ------------------------------------------------------------------------------
    def report(self, images: int, size_bytes: int, usage: FsUsage | None, source: str) -> None:
        """Image count and bytes just listed, with the usage measured with them (None: unknown)."""
        self.metrics.cache_images.set(images)
        self.metrics.cache_bytes.set(size_bytes)
        if usage is not None:
            self.metrics.imagefs_used_ratio.set(usage.ratio)
        self.current = CacheStatus(
            at=self._clock(),
            images=images,
            bytes=size_bytes,
            imagefs_used_ratio=None if usage is None else round(usage.ratio, 4),
            imagefs_path=str(self.imagefs.path or ""),
            source=source,
        )
        self._on_change()

    def report_usage(self, usage: FsUsage) -> None:
        """The image filesystem measured on its own (eviction does after every pull): the gauge
        follows at once; the status file gets it with the next image listing."""
        self.metrics.imagefs_used_ratio.set(usage.ratio)

    # --- the daemon's own measurements ----------------------------------------------------------
    def on_pull(self, _record: object) -> None:
        """Pull listener: the figures are stale now."""
        self._last_pull = self._clock()
        self._pulled.set()

    async def refresh(self, cri: Any) -> None:
        """List the images and measure the image filesystem the way eviction does. Raises the CRI
        client's error when ListImages fails (a usage that cannot be measured is reported unknown)."""
        from nodeagent.cri.client import CriError

        images = await cri.list_images()
        usage: FsUsage | None
        try:
            usage = await self.imagefs.measure(cri)
        except (UsageError, CriError):
            usage = None
        self.report(len(images), sum(int(i.size) for i in images), usage, DAEMON)

    def _stale(self) -> bool:
        if self.current is None:
            return True
        age = self._clock() - self.current.at
        return self.current.at < self._last_pull or age >= self.interval

    async def run(self, cri: Any) -> None:
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
