"""Give memory back to the system after bursts of large messages.

A ListImages answer on a node with thousands of images is several MB, and the proxy holds a few
copies of it while forwarding. glibc keeps freed heap memory for reuse (and raises its mmap
threshold after large frees, so later large blocks also come from the heap), so without help the
daemon's RSS would stay at the high-water mark of its busiest moment. ``malloc_trim(0)`` returns
free heap pages to the system; the daemon calls it every few seconds, which costs well under a
millisecond when there is nothing to give back. Code that has just used large buffers calls
``note_large()``; the daemon then trims within ``nodeagent.daemon.MEMORY_TRIM_CHECK`` seconds (and
every ``MEMORY_TRIM_INTERVAL`` seconds regardless).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_loaded = False
_pending = False
LARGE = 1 << 20  # a buffer at least this big is worth a trim afterwards


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
