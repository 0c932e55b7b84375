"""The eviction loop's section of the daemon status file, the lines ``nodeagent status`` shows, and
the record (and log line) of each image evicted."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from nodeagent.eviction.policy import Decision, FsUsage
from nodeagent.util.log import event, get_logger

if TYPE_CHECKING:
    from nodeagent.eviction.loop import EvictionLoop

log = get_logger("nodeagent.eviction.loop")  # the loop's lines, under the loop's name

DEGRADED_AFTER = 300.0  # a problem (error, low unreachable) lasting this long makes the status degraded


def section(loop: EvictionLoop) -> dict[str, Any]:
    """``at`` is when the image filesystem was last measured (absent before the first time)."""
    fs = loop.last_usage
    problems = loop.problems.snapshot()
    # Degraded (``nodeagent status`` exits 1) only when it lasts: a pull burst of new images
    # makes low unreachable for up to minUnusedAge, and one failed cycle is not an outage.
    lasting = max(DEGRADED_AFTER, 3 * loop.interval)
    degraded = any(v["persistingSeconds"] >= lasting for v in problems.values())
    out: dict[str, Any] = {
        "imagefsPath": str(loop.imagefs.path or ""),
        "usedBytes": None if fs is None else fs.used_bytes,
        "totalBytes": None if fs is None else fs.total_bytes,
        "usedRatio": None if fs is None else round(fs.ratio, 4),
        "highThresholdPercent": loop.thresholds.high_percent,
        "lowThresholdPercent": loop.thresholds.low_percent,
        "minUnusedAgeSeconds": loop.thresholds.min_unused_age,
        "lastCycleAt": loop.last_cycle_at,
        "lastPlan": loop.last_plan,
        "lowUnreachable": loop.low_unreachable,
        "lastReliefSeconds": loop.last_relief_seconds,
        "recentEvictions": list(loop.recent),
        "problems": problems,
        "degraded": degraded,
        "summary": summary_lines(loop, problems),
    }
    if loop.last_usage_at is not None:
        out["at"] = loop.last_usage_at
    return out


def summary_lines(loop: EvictionLoop, problems: dict[str, dict[str, Any]]) -> list[str]:
    """What ``nodeagent status`` prints for eviction (the JSON keeps every field)."""
    t = loop.thresholds
    fs = loop.last_usage
    usage = (
        "imagefs not measured yet"
        if fs is None
        else f"imagefs {fs.ratio:.1%} used ({_mib(fs.used_bytes)} of {_mib(fs.total_bytes)})"
    )
    lines = [
        f"{usage}; removes unused images above {t.high_percent}%, down to {t.low_percent}%, "
        f"keeps images used in the last {t.min_unused_age:g}s"
    ]
    if loop.low_unreachable:
        lines.append(
            f"cannot reach {t.low_percent}%: every image left is in use, pinned, baked, protected "
            "or too recent"
        )
    lines.append("recent evictions:" if loop.recent else "no evictions since the daemon started")
    for rec in list(loop.recent)[-5:]:
        when = time.strftime("%H:%M:%SZ", time.gmtime(rec["at"]))
        lines.append(f"  {when}  {_mib(rec['size']):>10}  {rec['image']}  ({rec['reason']})")
    for key, p in sorted(problems.items()):
        lines.append(f"problem {key}: {p['message']} (for {p['persistingSeconds']:g}s)")
    return lines


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def evicted(d: Decision, before: FsUsage, after: FsUsage, now: float) -> dict[str, Any]:
    """The ``recentEvictions`` entry of a removal (and its ``image evicted`` log line)."""
    rec = {
        "at": now,
        "image": d.image.name,
        "id": d.image.id,
        "size": d.image.size,
        "freedBytes": max(0, before.used_bytes - after.used_bytes),
        "lastUsed": d.last_used,
        "reason": d.reason,
    }
    event(
        log,
        "image evicted",
        image=d.image.name,
        image_id=d.image.id,
        reason=d.reason,
        size_bytes=d.image.size,
        freed_bytes=rec["freedBytes"],
        unused_seconds=None if d.last_used is None else round(now - d.last_used, 1),
        used_ratio=round(after.ratio, 4),
    )
    return rec
