"""Cost of the CRI image proxy: ``nodeagent run`` in front of a real containerd vs containerd direct,
measured in the same run, interleaved (so load from other processes hits both alike).

- median added latency of ImageStatus and of a cached PullImage (target: at most 2 ms each)
- ListImages with 2,000 images in containerd (target: proxy median within 1.3x of direct)
- 200 concurrent ImageStatus calls through the proxy (target: no errors)
- idle RSS and CPU of ``nodeagent run`` (targets: under 60 MB, under 0.5% of one core)

    python -m bench proxy            # or: python -m bench.bench_proxy [--images 2000] [--idle 20]

Needs root and the sandbox packages (containerd, docker-registry), like the integration tests.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from bench import results
from nodeagent.cri.client import CriClient
from tests.sandbox import Sandbox
from tests.sandbox.oci import push_many

ADDED_MS_TARGET = 2.0
LIST_RATIO_TARGET = 1.3
CONCURRENT = 200
RSS_MB_TARGET = 60.0
CPU_PCT_TARGET = 0.5


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return (time.perf_counter() - t0) * 1000.0


# Every pair measured in this run, per call (ms), for ``bench/results/proxy.json`` (bench/plot.py).
PAIRS: dict[str, dict[str, list[float]]] = {}


async def compare(
    label: str, direct: Callable[[], Awaitable[Any]], proxied: Callable[[], Awaitable[Any]], n: int
) -> tuple[float, float, float]:
    """(median direct ms, median proxied ms, median of paired differences ms) over ``n`` pairs of
    back-to-back calls, alternating which goes first (so machine noise hits both alike)."""
    d: list[float] = []
    p: list[float] = []
    for _ in range(3):  # warm both paths (channels connected, caches hot)
        await direct()
        await proxied()
    for i in range(n):
        if i % 2:
            d.append(await timed(direct))
            p.append(await timed(proxied))
        else:
            p.append(await timed(proxied))
            d.append(await timed(direct))
    PAIRS[label] = {"direct": [round(x, 4) for x in d], "proxied": [round(x, 4) for x in p]}
    return (
        statistics.median(d),
        statistics.median(p),
        statistics.median(b - a for a, b in zip(d, p, strict=True)),
    )


async def pull_all(endpoint: str, refs: list[str], concurrency: int = 24) -> None:
    sem = asyncio.Semaphore(concurrency)
    async with CriClient(endpoint) as cri:

        async def one(ref: str) -> None:
            async with sem:
                await cri.pull_image(ref)

        await asyncio.gather(*(one(r) for r in refs))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--images", type=int, default=2000, help="images in containerd for ListImages")
    ap.add_argument("--calls", type=int, default=400, help="ImageStatus calls per path")
    # A cached pull still resolves the tag at the registry: its time varies by +-4 ms, so many pairs
    # are needed for a stable median of differences (standard error ~0.15 ms at 400).
    ap.add_argument("--pulls", type=int, default=400, help="cached PullImage calls per path")
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measurement")
    args = ap.parse_args(argv)
    ok = True
    with Sandbox(prefix="na-bench-") as sb:
        reg = sb.registry()
        node = sb.containerd([reg])
        img = sb.image(reg, "bench/one", layers=2, layer_size=1 << 20)
        t0 = time.monotonic()
        agent = sb.nodeagent(node)
        started = time.monotonic() - t0
        ready: dict[str, Any] = {}
        for _ in range(200):  # the status file comes first; the "ready" log line right after it
            ready = next((e for e in agent.log_lines() if e.get("msg") == "ready"), {})
            if ready:
                break
            time.sleep(0.01)
        print(
            f"nodeagent run: process start to status file {started * 1000:.0f} ms "
            f"(daemon init to READY {ready.get('startup_seconds', 0) * 1000:.0f} ms)"
        )

        async def latency() -> dict[str, tuple[float, float]]:
            async with CriClient(node.endpoint) as d, CriClient(agent.proxy_endpoint) as p:
                await d.pull_image(img.reference)
                out = {
                    "ImageStatus": await compare(
                        "ImageStatus",
                        lambda: d.image_status(img.reference),
                        lambda: p.image_status(img.reference),
                        args.calls,
                    ),
                    "PullImage (cached)": await compare(
                        "PullImage (cached)",
                        lambda: d.pull_image(img.reference),
                        lambda: p.pull_image(img.reference),
                        args.pulls,
                    ),
                }
                return out

        for name, (d_ms, p_ms, added) in asyncio.run(latency()).items():
            hit = added <= ADDED_MS_TARGET
            ok &= hit
            print(
                f"{name:<20} direct {d_ms:7.3f} ms  via proxy {p_ms:7.3f} ms  "
                f"added (median of pairs) {added:+.3f} ms "
                f"(target <= {ADDED_MS_TARGET} ms: {'ok' if hit else 'MISSED'})"
            )

        async def concurrent() -> tuple[int, float]:
            async with CriClient(agent.proxy_endpoint) as p:
                t = time.perf_counter()
                res = await asyncio.gather(
                    *(p.image_status(img.reference) for _ in range(CONCURRENT)), return_exceptions=True
                )
                return sum(isinstance(r, BaseException) for r in res), time.perf_counter() - t

        errors, wall = asyncio.run(concurrent())
        ok &= errors == 0
        print(
            f"{CONCURRENT} concurrent ImageStatus via proxy: {errors} errors, {wall * 1000:.0f} ms wall "
            f"(target: no errors: {'ok' if errors == 0 else 'MISSED'})"
        )

        t0 = time.monotonic()
        many = push_many(reg, "bench/many", args.images)
        asyncio.run(pull_all(node.endpoint, [m.reference for m in many]))
        print(f"set-up: {args.images} images pushed and pulled in {time.monotonic() - t0:.0f} s")

        async def listing() -> tuple[float, float, float, int]:
            async with CriClient(node.endpoint) as d, CriClient(agent.proxy_endpoint) as p:
                n = len(await d.list_images())
                dm, pm, added = await compare("ListImages", d.list_images, p.list_images, 40)
                return dm, pm, added, n

        d_ms, p_ms, _added, n = asyncio.run(listing())
        ratio = p_ms / d_ms
        hit = ratio <= LIST_RATIO_TARGET
        ok &= hit
        print(
            f"ListImages ({n} images) direct {d_ms:.1f} ms  via proxy {p_ms:.1f} ms  ratio {ratio:.3f} "
            f"(target <= {LIST_RATIO_TARGET}: {'ok' if hit else 'MISSED'})"
        )

        proc = psutil.Process(agent.pid)
        time.sleep(2.0)
        c0 = proc.cpu_times()
        t0 = time.monotonic()
        time.sleep(args.idle)
        c1 = proc.cpu_times()
        cpu_pct = ((c1.user - c0.user) + (c1.system - c0.system)) / (time.monotonic() - t0) * 100.0
        rss_mb = proc.memory_info().rss / (1 << 20)
        hit_cpu, hit_rss = cpu_pct < CPU_PCT_TARGET, rss_mb < RSS_MB_TARGET
        ok &= hit_cpu and hit_rss
        print(
            f"idle nodeagent run over {args.idle:.0f} s ({n} images in the cache): "
            f"CPU {cpu_pct:.2f}% of a core "
            f"(target < {CPU_PCT_TARGET}%: {'ok' if hit_cpu else 'MISSED'}), RSS {rss_mb:.1f} MB "
            f"(target < {RSS_MB_TARGET} MB: {'ok' if hit_rss else 'MISSED'})"
        )
        agent.stop()
    results.write("proxy", {"pairs_ms": PAIRS, "targets_met": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
