"""Go durations (``time.ParseDuration`` / ``time.Duration.String``), the one parser and the one
formatter. nodeagent holds durations as float seconds.

``format_duration(s)`` is the shortest text Go parses back to ``s`` (``2m``, ``1h30m``): what
messages, ``nodeagent validate`` and the docs show. ``format_duration(s, go=True)`` is exactly what
Go's ``Duration.String()`` prints (``2m0s``, ``1h0m0s``): what ``nodeagent apply`` writes into the
kubelet's and containerd's files, so they read as if Go had written them and never change between
releases. One algorithm, two spellings of the zero units.
"""

from __future__ import annotations

import math
import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
# the same grammar as a JSON Schema pattern (no sign: config durations are never negative)
DURATION_PATTERN = r"^(?:0|(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h))+)$"
_NS_PER_S = 1_000_000_000


def parse_duration(text: str) -> float | None:
    """Seconds for a Go duration string (``500ms``, ``10m``, ``1h30m``, ``0``), None if malformed."""
    s = text
    sign = 1.0
    if s[:1] in ("-", "+"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        return None
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def format_duration(seconds: float, *, go: bool = False) -> str:
    """Go duration text for ``seconds`` (nanosecond precision).

    ``go=False``: the shortest form (``120`` -> ``2m``, ``0.5`` -> ``500ms``), negative values with a
    ``-``. ``go=True``: Go's ``Duration.String()`` (``120`` -> ``2m0s``); refuses negative, NaN and
    infinite values (``ValueError``) because it renders files another program parses.
    """
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{seconds!r}: not a valid duration")
    if seconds < 0:
        if go:
            raise ValueError(f"{seconds!r}: not a valid duration")
        return "-" + format_duration(-seconds)
    ns = round(seconds * _NS_PER_S)
    if ns == 0:
        return "0s"
    if ns < _NS_PER_S:  # sub-second: whole milliseconds are the useful case
        if ns % 1_000_000 == 0:
            return f"{ns // 1_000_000}ms"
        if ns % 1000 == 0:
            return f"{ns // 1000}us"
        return f"{ns}ns"
    hours, rem = divmod(ns, 3600 * _NS_PER_S)
    minutes, rem = divmod(rem, 60 * _NS_PER_S)
    secs = f"{rem / _NS_PER_S:.9f}".rstrip("0").rstrip(".")
    if go:
        return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{secs}s"
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if rem else "")
