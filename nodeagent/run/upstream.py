"""Does the upstream image service (``cri.endpoint``) answer?

Proxied calls report what they saw as they happen (``observe``); when none did for
``INTERVAL`` seconds the loop asks ImageFsInfo itself (every image service has it). ``/healthz``
asks through ``check(max_age)``, which reuses a result younger than ``max_age`` so a flood of
health checks is not a flood of CRI calls. The answer is in ``nodeagent_cri_upstream_up``, the
status file's ``proxy`` part (with when it was measured) and one log line per change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from nodeagent.run.metrics import Metrics
from nodeagent.util.log import event, get_logger

if TYPE_CHECKING:
    from nodeagent.cri.runtime import ImageService

log = get_logger(__name__)

INTERVAL = 15.0  # idle-time probe; proxied calls update the state as they happen


class UpstreamHealth:
    def __init__(
        self,
        endpoint: str,
        metrics: Metrics,
        *,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.metrics = metrics
        self.cri: ImageService | None = None  # the daemon's CRI client; set before run()/check()
        self.ok: bool | None = None  # None: not measured yet
        self.error = ""
        self.checked_at: float | None = None  # wall time of the last measurement
        self._on_change = on_change
        self._clock = clock
        self._monotonic = monotonic
        self._last_ok = 0.0  # monotonic time of the last answer seen
        self._checked = 0.0  # monotonic time of the last measurement

    def observe(self, ok: bool, error: str) -> None:
        """What a call to the upstream just showed (the proxy's ``on_upstream``)."""
        if ok != self.ok:
            if ok:
                event(log, "upstream CRI answering", upstream=self.endpoint)
            else:
                event(log, "upstream CRI not answering", level=30, upstream=self.endpoint, error=error)
            self._on_change()
        self.ok, self.error = ok, error
        self.checked_at = self._clock()
        self._checked = self._monotonic()
        if ok:
            self._last_ok = self._checked
        self.metrics.upstream_up.set(1 if ok else 0)

    async def check(self, max_age: float = 0.0) -> bool:
        """Ask ImageFsInfo (UNAVAILABLE and DEADLINE_EXCEEDED mean "not answering"; any other
        answer, errors included, means it answers). A result younger than ``max_age`` is reused."""
        import grpc

        from nodeagent.cri.client import CriError

        if max_age and self._checked and self._monotonic() - self._checked < max_age:
            return bool(self.ok)
        assert self.cri is not None, "check() before the daemon made its CRI client"
        try:
            await self.cri.image_fs_info()
        except CriError as e:
            answered = e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            self.observe(answered, "" if answered else str(e))
        else:
            self.observe(True, "")
        return bool(self.ok)

    async def run(self) -> None:
        """Probe while no proxied call showed an answer for ``INTERVAL`` seconds; until cancelled."""
        while True:
            if self._monotonic() - self._last_ok >= INTERVAL:
                await self.check()
            await asyncio.sleep(INTERVAL)
