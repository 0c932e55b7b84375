"""Eviction under churn: how fast ``nodeagent run`` brings the image filesystem from the high
threshold back under the low one, against a baseline measured in the same run: the median time of
one of the pulls that fill it.

The churn scenario of issue 5 (tests/integration/eviction_churn.py): a real containerd whose image
store is a loop-mounted 200 MB ext4, and N distinct incompressible 20 MiB images pulled one after
the other through the agent's CRI proxy with eviction thresholds 60/40. Every high -> low episode
is timed by the agent itself (log line "imagefs under the low threshold", ``seconds_from_high``:
from the cycle that saw usage at or above high to the measurement at or below low).

Target: every pull succeeds, and the median episode is shorter than the median pull (the disk is
freed faster than a pull fills it). Needs root and the sandbox components (scripts/setup.sh).

Run: ``python -m bench eviction_churn`` or ``python bench/bench_eviction_churn.py [--images N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from bench import results
from tests.integration.eviction_churn import MiB, push_churn_images, run_with_agent
from tests.sandbox import Sandbox

TARGET_RATIO = 1.0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=30)
    args = ap.parse_args(argv)
    with Sandbox(prefix="na-bench-") as sb:
        reg = sb.registry()
        images = push_churn_images(sb, reg, count=args.images)
        run, agent = run_with_agent(sb, reg, images)
        agent.stop()
    print(run.report())
    pulls = [p.seconds for p in run.pulls if p.ok]
    if run.failures or not run.reliefs:
        print(f"FAIL: {len(run.failures)} pull(s) failed, {len(run.reliefs)} eviction episode(s)")
        return 1
    relief, pull = statistics.median(run.reliefs), statistics.median(pulls)
    print(
        f"high -> low: median {relief * 1000:.0f} ms, max {max(run.reliefs) * 1000:.0f} ms over "
        f"{len(run.reliefs)} episodes ({run.evictions} evictions)"
    )
    print(f"baseline, one 20 MiB pull through the proxy: median {pull * 1000:.0f} ms")
    ratio = relief / pull
    print(f"high->low / pull: {ratio:.2f} (target < {TARGET_RATIO:g})")
    ok = ratio < TARGET_RATIO
    results.write(
        "eviction_churn",
        {
            "filesystem_bytes": run.total_bytes,
            "image_bytes": 20 * MiB,
            "thresholds_percent": {"high": 60, "low": 40},
            # one entry per pull, in order: its duration and the usage measured right after it
            "pulls": [
                {"n": p.n, "ok": p.ok, "seconds": p.seconds, "used_bytes_after": p.used_after}
                for p in run.pulls
            ],
            "reliefs_seconds": run.reliefs,
            "evictions": run.evictions,
            "met": ok,
        },
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
