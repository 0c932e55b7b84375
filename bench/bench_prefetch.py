"""Prefetch benchmark: N images pulled with concurrency 1 vs the configured concurrency, in the same
run, through a registry with limited per-connection throughput (the sandbox's throttling TCP proxy
in front of a real docker-registry; a real containerd, fresh for each side, pulls through CRI).

Target: the configured concurrency (``images.prefetchConcurrency`` default, 4) is at least 2x faster
than one pull at a time. Needs root and the sandbox components (scripts/setup.sh).

Run: ``python bench/bench_prefetch.py [--images N] [--size BYTES] [--rate BYTES_PER_S]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from nodeagent.config.model import ImagesConfig, PrefetchImage
from nodeagent.cri.client import CriClient
from nodeagent.images.prefetch import Prefetcher
from tests.sandbox import Sandbox

TARGET_RATIO = 2.0


async def _prefetch(endpoint: str, images: list[PrefetchImage], concurrency: int) -> float:
    async with CriClient(endpoint) as cri:
        t0 = time.monotonic()
        report = await Prefetcher(cri, images, concurrency=concurrency, budget=600).run()
        took = time.monotonic() - t0
    bad = [o for o in report.outcomes if o.result != "pulled"]
    if bad:
        raise SystemExit(f"bench_prefetch: not pulled: {[(o.image, o.result, o.error) for o in bad]}")
    return took


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=1 << 20, help="bytes per image (one random layer)")
    ap.add_argument("--rate", type=int, default=1 << 20, help="bytes/s per connection")
    ap.add_argument("--concurrency", type=int, default=ImagesConfig().prefetch_concurrency)
    args = ap.parse_args(argv)

    with Sandbox(prefix="na-bench-") as sb:
        reg = sb.registry()
        proxy = sb.throttle_proxy(reg, args.rate)
        pushed = [sb.image(reg, layers=1, layer_size=args.size) for _ in range(args.images)]
        # Pull through the proxy: same repositories, the proxy's address as the registry host.
        refs = [p.reference.replace(reg.host, proxy.address, 1) for p in pushed]
        images = [PrefetchImage(r, required=True) for r in refs]
        times = {}
        for concurrency in (1, args.concurrency):
            node = sb.containerd(start=False)  # fresh image store for each side
            node.write_hosts_toml(proxy.address, proxy.url)
            node.start()
            times[concurrency] = asyncio.run(_prefetch(node.endpoint, images, concurrency))
            node.stop()
    mb = args.images * args.size / 1e6
    for c, t in times.items():
        print(
            f"prefetch {args.images} images ({mb:.1f} MB) at {args.rate / 1e6:.2f} MB/s per connection, "
            f"concurrency {c}: {t:.2f}s"
        )
    ratio = times[1] / times[args.concurrency]
    ok = ratio >= TARGET_RATIO
    print(
        f"speedup concurrency {args.concurrency} vs 1: {ratio:.2f}x (target >= {TARGET_RATIO}x): "
        f"{'ok' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
