"""Every pull through the proxy, handed on: to the status file (totals by result, the last
``RECENT`` records) and to each feature's pull listener (eviction, the cache figures), sync or
async. A listener that fails is logged and the others still run; async listeners are awaited in
tasks the daemon waits for (bounded) at shutdown.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import Counter, deque
from collections.abc import Awaitable, Callable

from nodeagent.proxy.records import PullRecord
from nodeagent.run.statusfile import PullsStatus, RecentPull
from nodeagent.util.log import get_logger

log = get_logger(__name__)

RECENT = 20
PullListener = Callable[[PullRecord], Awaitable[None] | None]


class PullFeed:
    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self.recent: deque[RecentPull] = deque(maxlen=RECENT)
        self.totals: Counter[str] = Counter()
        self._listeners: list[PullListener] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_change = on_change

    def add_listener(self, cb: PullListener) -> None:
        self._listeners.append(cb)

    def on_pull(self, rec: PullRecord) -> None:
        """The proxy's ``on_pull``: called after every PullImage it answered."""
        self.recent.append(recent_pull(rec))
        self.totals[rec.result] += 1
        self._on_change()
        for cb in self._listeners:
            try:
                res = cb(rec)
            except Exception:
                log.exception("pull listener failed")
                continue
            if inspect.isawaitable(res):
                task = asyncio.ensure_future(self._await(res))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _await(aw: Awaitable[None]) -> None:
        try:
            await aw
        except Exception:
            log.exception("pull listener failed")

    async def wait_listeners(self, timeout: float) -> None:  # noqa: ASYNC109
        """Let async listeners still running finish, for at most ``timeout`` seconds (shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    def status(self, at: float, in_flight: int) -> PullsStatus:
        return PullsStatus(at=at, in_flight=in_flight, totals=dict(self.totals), recent=list(self.recent))


def recent_pull(rec: PullRecord) -> RecentPull:
    """The status file's form of a pull record (what the ``pull`` log line says)."""
    return RecentPull(
        image=rec.image,
        registry=rec.registry,
        result=rec.result,
        duration=round(rec.duration, 4),
        started_at=rec.started_at,
        bytes=rec.bytes,
        image_ref=rec.image_ref,
        code=rec.code,
        error=rec.error,
        retry_reason=rec.retry_reason,
        origin=rec.origin,
        joined=rec.joined,
        throughput=round(rec.throughput, 1),
        extra=dict(rec.extra),
    )
