"""Keeps the daemon's status file current (``nodeagent/run/statusfile.py`` is its model).

Written within ``DEBOUNCE`` seconds of a change (``mark_dirty``; a burst of pulls makes one write),
and every ``HEARTBEAT`` seconds regardless, so ``nodeagent status`` can tell a hung daemon by the
file's age. The body is built on the event loop and written (atomically, with its fsyncs) in a
thread, so the proxy keeps answering meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from nodeagent.run.statusfile import DaemonStatus
from nodeagent.util.atomicio import write_atomic
from nodeagent.util.log import event, get_logger

log = get_logger(__name__)

HEARTBEAT = 15.0  # `nodeagent status` calls the file stale after 6 of these
DEBOUNCE = 1.0


class StatusWriter:
    def __init__(self, path: Path, build: Callable[[str], DaemonStatus]) -> None:
        self.path = path
        self.build = build  # state ("running" | "stopped") -> the status as of now
        self._dirty = asyncio.Event()

    def mark_dirty(self) -> None:
        self._dirty.set()

    def write(self, state: str = "running") -> None:
        """Write now, on the calling thread (start-up and the final "stopped")."""
        self._write(self.build(state).dumps())

    async def run(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that arrives as the
            # event is set, and the daemon's shutdown would then wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT):
                    await self._dirty.wait()
                await asyncio.sleep(DEBOUNCE)
            self._dirty.clear()
            await asyncio.to_thread(self._write, self.build("running").dumps())

    def _write(self, body: str) -> None:
        try:
            write_atomic(self.path, body, mode=0o644)
        except OSError as e:
            event(log, "writing the status file failed", level=40, error=str(e))
