"""The daemon's one limit on the pulls it starts on its own: pod pulls (nodeagent/podpulls) and prefetch
pulls that come through the proxy (``x-nodeagent-origin: prefetch``) take slots of one ``PullSlots``;
the kubelet's own pulls never wait for a slot (they are on the pod's start-up path).

Places are served in order of their key, not of their arrival at ``wait``: a pod takes one key per pod
(``ticket()``) and queues each of its images as ``(ticket, index)`` the moment the pod is seen, so all
of a pod's images are started before the next pod's even when some of them need a moment to get ready
(reading pull secrets, ImageStatus). A prefetch call queues with a ticket of its own when it arrives.

    slots = PullSlots(4)
    place = slots.queue((slots.ticket(), 0))   # synchronous: the place in line is taken now
    await place.wait()                          # the slot is this caller's
    ...
    place.release()                             # also leaves the line if the slot was never granted
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Any

Order = tuple[int, int]


class Place:
    """One caller's place in line for a slot (``wait`` until granted; ``release`` exactly once)."""

    __slots__ = ("_granted", "_released", "_slots", "order")

    def __init__(self, slots: PullSlots, order: Order) -> None:
        self._slots = slots
        self.order = order
        self._granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    @property
    def granted(self) -> bool:
        return self._granted.done() and not self._granted.cancelled()

    async def wait(self) -> None:
        await asyncio.shield(self._granted)

    def release(self) -> None:
        """Give the slot back (or leave the line); more than once is harmless."""
        if self._released:
            return
        self._released = True
        self._slots._done(self)

    def _grant(self) -> None:
        self._granted.set_result(None)


class PullSlots:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"pull slots: limit must be >= 1, got {limit}")
        self.limit = limit
        self.busy = 0
        self._line: list[tuple[Order, int, Place]] = []
        self._seq = itertools.count()
        self._tickets = itertools.count(1)

    def ticket(self) -> int:
        """A new key for one pod (or one prefetch call): later tickets come after it in line."""
        return next(self._tickets)

    @property
    def waiting(self) -> int:
        return len(self._line)

    def queue(self, order: Order) -> Place:
        place = Place(self, order)
        heapq.heappush(self._line, (order, next(self._seq), place))
        self._grant_free()
        return place

    async def acquire(self, order: Order) -> Place:
        """``queue`` + ``wait``; a cancelled wait leaves the line."""
        place = self.queue(order)
        try:
            await place.wait()
        except BaseException:
            place.release()
            raise
        return place

    def _grant_free(self) -> None:
        while self.busy < self.limit and self._line:
            _, _, place = heapq.heappop(self._line)
            self.busy += 1
            place._grant()

    def _done(self, place: Place) -> None:
        if place.granted:
            self.busy -= 1
        else:  # still in line: leave it
            self._line = [e for e in self._line if e[2] is not place]
            heapq.heapify(self._line)
        self._grant_free()

    def status(self) -> dict[str, Any]:
        return {"limit": self.limit, "busy": self.busy, "waiting": self.waiting}
