"""PullSlots: the daemon's one limit on the pulls nodeagent starts itself (pod pulls, prefetch through the
proxy); places are served in the order of their keys, not of their arrival."""

from __future__ import annotations

import asyncio

import pytest

from nodeagent.proxy.slots import PullSlots


def test_at_most_limit_granted_and_the_line_is_served_by_key_not_arrival() -> None:
    async def main() -> None:
        slots = PullSlots(2)
        first, second = slots.ticket(), slots.ticket()
        a0, a1 = slots.queue((first, 0)), slots.queue((first, 1))
        assert a0.granted and a1.granted and slots.busy == 2
        b0 = slots.queue((second, 0))
        a2 = slots.queue((first, 2))  # arrives after the second pod's image, is served before it
        assert not b0.granted and not a2.granted and slots.waiting == 2
        a0.release()
        assert a2.granted and not b0.granted
        a1.release()
        assert b0.granted
        a1.release()  # twice is harmless
        assert slots.busy == 2 and slots.waiting == 0
        a2.release()
        b0.release()
        assert slots.status() == {"limit": 2, "busy": 0, "waiting": 0}

    asyncio.run(main())


def test_a_place_given_up_before_its_turn_leaves_the_line_and_a_cancelled_wait_too() -> None:
    async def main() -> None:
        slots = PullSlots(1)
        held = await slots.acquire((slots.ticket(), 0))
        gone = slots.queue((slots.ticket(), 0))
        waiter = asyncio.ensure_future(slots.acquire((slots.ticket(), 0)))
        late = slots.queue((slots.ticket(), 0))
        await asyncio.sleep(0)
        gone.release()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert slots.waiting == 1
        held.release()
        assert late.granted and slots.busy == 1

    asyncio.run(main())


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit must be >= 1"):
        PullSlots(0)
