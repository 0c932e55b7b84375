"""Give memory back to the system after bursts of large messages.

A ListImages answer on a node with thousands of images is several MB, and the proxy holds a few
copies of it while forwarding. glibc keeps freed heap memory for reuse (and raises its mmap
threshold after large frees, so later large blocks also come from the heap), so without help the
daemon's RSS would stay at the high-water mark of its busiest moment. ``malloc_trim(0)`` returns
free heap pages to the system; the daemon calls it every few seconds, which costs well under a
millisecond when there is nothing to give back. Code that has just used large buffers calls
``note_large()``; the daemon's ``trim_loop()`` then trims within ``TRIM_CHECK`` seconds (and every
``TRIM_INTERVAL`` seconds regardless).
"""

from __future__ import annotations

import asyncio
import ctypes
import sys
import time
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_loaded = False
_pending = False
LARGE = 1 << 20  # a buffer at least this big is worth a trim afterwards
TRIM_CHECK = 2.0  # trim this soon after large buffers were used
TRIM_INTERVAL = 30.0  # and this often regardless


def note_large() -> None:
    """Large buffers were just used and freed: trim soon."""
    global _pending
    _pending = True


def take_pending() -> bool:
    global _pending
    pending, _pending = _pending, False
    return pending


def _load() -> Callable[[int], int] | None:
    global _trim, _loaded
    if not _loaded:
        _loaded = True
        if sys.platform.startswith("linux"):
            try:  # the process's own symbols include libc's; no library search (no subprocess)
                fn = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                return None
            fn.argtypes = (ctypes.c_size_t,)
            fn.restype = ctypes.c_int
            _trim = fn
    return _trim


def trim() -> bool:
    """Return free heap memory to the system; False where glibc's ``malloc_trim`` is missing."""
    fn = _load()
    if fn is None:
        return False
    fn(0)
    return True


async def trim_loop() -> None:
    """The daemon's worker: trim soon after ``note_large()`` and every ``TRIM_INTERVAL`` seconds;
    returns when there is no ``malloc_trim`` (not glibc)."""
    last = time.monotonic()
    while True:
        await asyncio.sleep(TRIM_CHECK)
        if take_pending() or time.monotonic() - last >= TRIM_INTERVAL:
            last = time.monotonic()
            if not trim():
                return
