"""Sizes, ages and tables as people read them, the same in every command's output."""

from __future__ import annotations

from collections.abc import Sequence


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


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, as many lines as rows plus the header."""
    all_rows = [header, *rows]
    widths = [max(len(r[c]) for r in all_rows) for c in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in all_rows]
