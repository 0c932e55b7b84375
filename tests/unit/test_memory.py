"""nodeagent.util.memory: after a burst of large buffers (the proxy forwarding big ListImages answers),
glibc keeps the freed memory; trim() hands it back to the system."""

from __future__ import annotations

import psutil

from nodeagent.util.memory import trim

MiB = 1 << 20


def test_trim_returns_memory_glibc_kept_after_a_burst_of_large_buffers() -> None:
    proc = psutil.Process()
    big = bytearray(8 * MiB)  # freeing a large mmapped block raises glibc's mmap threshold...
    del big
    burst, pins = [], []
    for _ in range(120):  # ...so these 60 MiB come from the heap, each followed by a small block
        burst.append(bytearray(512 * 1024))
        pins.append(bytearray(8 * 1024))
    # freed, the big blocks are holes below the pins: free() cannot hand them back by trimming the
    # heap's top (as it would on its own for a burst at the top, whatever ran in this process before)
    del burst
    before = proc.memory_info().rss
    assert trim() is True
    freed = before - proc.memory_info().rss
    assert freed >= 4 * MiB, f"trim gave back only {freed / MiB:.1f} MiB"
    assert trim() is True  # nothing left to give back: still fine
    del pins


def test_large_buffers_ask_for_one_trim() -> None:
    from nodeagent.util import memory

    memory.take_pending()
    assert memory.take_pending() is False
    memory.note_large()
    memory.note_large()
    assert memory.take_pending() is True  # one trim for any number of notes
    assert memory.take_pending() is False
