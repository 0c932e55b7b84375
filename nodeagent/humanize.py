"""Sizes and ages as people read them, the same in every command's output."""

from __future__ import annotations


def size(n: float, *, binary: bool = False) -> str:
    """``2.5 MB`` (SI, as crictl and docker print image sizes) or, with ``binary``, ``2.4 MiB``."""
    step = 1024 if binary else 1000
    units = ("B", "KiB", "MiB", "GiB", "TiB") if binary else ("B", "kB", "MB", "GB", "TB")
    v = float(n)
    for unit in units[:-1]:
        if abs(v) < step:
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= step
    return f"{v:.1f} {units[-1]}"


def ago(seconds: float | None) -> str:
    """How long ago, coarser as it grows: ``5s ago``, ``2m ago``, ``3h01m ago``, ``1d01h ago``."""
    if seconds is None:
        return "never"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m ago"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h ago"
