"""``nodeagent evict --dry-run``: print what the eviction policy would remove now, and why.

Reads the same inputs as the daemon's eviction loop, with the same code (``eviction/gather.py``:
statvfs of the image filesystem; CRI images, containers and sandboxes; the baked-images manifest;
and the last-used state the daemon persists) and
prints the plan as a table, one row per image: removals first, in order. Removes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from nodeagent import config
from nodeagent.cli import EXIT_FAILED, EXIT_INVALID_CONFIG, EXIT_INVALID_USAGE, EXIT_OK
from nodeagent.commands.loadconfig import load
from nodeagent.eviction.gather import BakedManifest, StageError, gather
from nodeagent.eviction.policy import REMOVE, Plan
from nodeagent.eviction.usage import Imagefs, configured_path
from nodeagent.util.humanize import ago, size, table
from nodeagent.util.paths import Paths


@dataclass(frozen=True)
class DryRun:
    plan: Plan
    imagefs: Path
    now: float


def render(result: DryRun, *, max_name: int = 60) -> str:
    """The plan as a text table with a summary (pure; tested on its own)."""
    p, now = result.plan, result.now
    th = p.thresholds
    lines = [
        f"imagefs {result.imagefs}: {size(p.usage.used_bytes)} of {size(p.usage.total_bytes)} "
        f"used ({p.usage.ratio:.1%}); high {th.high_percent}%, low {th.low_percent}%, "
        f"minUnusedAge {th.min_unused_age:g}s",
    ]
    if not p.triggered:
        lines.append(f"below the high threshold ({size(p.high_bytes)}): nothing to remove")
    else:
        ratio = p.projected_used_bytes / max(1, p.usage.total_bytes)
        lines.append(
            f"would remove {len(p.removals)} image(s), {size(p.removal_bytes)}; "
            f"projected usage {size(p.projected_used_bytes)} ({ratio:.1%})"
        )
    if p.low_unreachable:
        lines.append(
            "cannot reach the low threshold: every other image is in use, pinned, baked, "
            "protected or too recent"
        )
    header = ("#", "IMAGE", "SIZE", "LAST USED", "DECISION", "REASON", "DETAIL")
    rows: list[tuple[str, ...]] = []
    for i, d in enumerate(p.decisions, 1):
        name = d.image.name
        if len(name) > max_name:
            name = name[: max_name - 3] + "..."
        rows.append(
            (
                str(i) if d.verdict == REMOVE else "",
                name,
                size(d.image.size),
                ago(None if d.last_used is None else now - d.last_used),
                d.verdict,
                d.reason,
                d.detail,
            )
        )
    lines.append("")
    lines += table(header, rows)
    return "\n".join(lines) + "\n"


async def dry_run(cfg: config.Config, paths: Paths, *, now: float | None = None) -> DryRun:
    """The plan from the inputs the daemon's loop reads, read the same way (``eviction/gather.py``).
    Raises ``StageError``."""
    # grpc is imported here, not at module level: the CLI stays fast for the other commands.
    from nodeagent.cri.client import CriClient
    from nodeagent.eviction.policy import Thresholds, plan
    from nodeagent.images.lastused import LastUsed

    ev = cfg.eviction
    thresholds = Thresholds(ev.high_threshold_percent, ev.low_threshold_percent, ev.min_unused_age)
    manifest = BakedManifest(paths.baked_manifest).load()
    last_used = LastUsed(paths.last_used_file)
    last_used.load()
    async with CriClient(cfg.cri.endpoint, cfg.cri.timeout) as cri:
        inputs = await gather(cri, Imagefs(paths, configured_path(cfg)))
    t = time.time() if now is None else now
    p = plan(
        inputs.images,
        inputs.users,
        usage=inputs.usage,
        thresholds=thresholds,
        now=t,
        last_used=last_used.items(),
        protect=cfg.images.protect,
        baked=manifest,
    )
    return DryRun(p, inputs.imagefs, t)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if not args.dry_run:
        print(
            "nodeagent evict: only --dry-run is supported: the daemon (nodeagent run) removes images "
            "when the image filesystem passes eviction.highThresholdPercent; "
            "'nodeagent evict --dry-run' shows what it would remove now, and why",
            file=sys.stderr,
        )
        return EXIT_INVALID_USAGE
    paths = Paths.at(args.root)
    loaded = load(args, paths, notes=True)  # baked file + user-data part (IMDS), docs/eks.md
    if loaded is None:
        return EXIT_INVALID_CONFIG
    cfg = loaded.config
    try:
        result = asyncio.run(dry_run(cfg, paths))
    except StageError as e:
        print(f"nodeagent evict: {e}", file=sys.stderr)
        return EXIT_FAILED
    out.write(render(result))
    return EXIT_OK
