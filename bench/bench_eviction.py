"""Eviction benchmarks.

``plan``: time to plan eviction over 10,000 images (target: under 50 ms), against a baseline in the
same run: a plain ``sorted()`` of the same images by last-used time, the least any LRU planner does.
The input is realistic: 2 refs per image, 5% in use, 1% pinned, 50 baked, 3 protect patterns, 90%
with a last-used record, the image filesystem at 90% with thresholds 80/50.

Run: ``python bench/bench_eviction.py [--images N] [--repeat R]``. Prints one line per measure and
exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from nodeagent.eviction.baked import BakedImage
from nodeagent.eviction.policy import Container, FsUsage, Image, ProtectMatcher, Thresholds, plan

TARGET_MS = 50.0
REGISTRIES = ("docker.io/library", "ghcr.io/acme", "111122223333.dkr.ecr.us-west-2.amazonaws.com/x")


def workload(n: int, seed: int = 1) -> dict[str, object]:
    rng = random.Random(seed)
    now = 2_000_000_000.0
    images = []
    for i in range(n):
        repo = f"{rng.choice(REGISTRIES)}/app{i}"
        images.append(
            Image(
                id=f"sha256:{rng.getrandbits(256):064x}",
                repo_tags=(f"{repo}:v{i % 7}",),
                repo_digests=(f"{repo}@sha256:{rng.getrandbits(256):064x}",),
                size=rng.randrange(5_000_000, 500_000_000),
                pinned=rng.random() < 0.01,
            )
        )
    last_used = {im.id: now - rng.randrange(0, 3_000_000) for im in images if rng.random() < 0.9}
    containers = [
        Container(f"{rng.getrandbits(64):016x}", image=im.repo_tags[0], image_ref=im.id, running=True)
        for im in rng.sample(images, n // 20)
    ]
    baked = [
        BakedImage(im.repo_tags[0], im.repo_digests[0].split("@")[1], im.size, True) for im in images[:50]
    ]
    total = sum(im.size for im in images)
    return {
        "images": images,
        "containers": containers,
        "baked": baked,
        "last_used": last_used,
        "usage": FsUsage(int(total * 0.9), total),
        "now": now,
        "protect": ProtectMatcher(["ghcr.io/acme/app1*", "*/kube-proxy:*", "docker.io/library/app42:*"]),
    }


def time_ms(fn: object, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args(argv)
    w = workload(args.images)
    images: list[Image] = w["images"]  # type: ignore[assignment]
    last_used: dict[str, float] = w["last_used"]  # type: ignore[assignment]
    th = Thresholds(80, 50, 600)

    def run_plan() -> None:
        plan(
            images,
            w["containers"],  # type: ignore[arg-type]
            usage=w["usage"],  # type: ignore[arg-type]
            thresholds=th,
            now=w["now"],  # type: ignore[arg-type]
            last_used=last_used,
            protect=w["protect"],  # type: ignore[arg-type]
            baked=w["baked"],  # type: ignore[arg-type]
        )

    def run_baseline() -> None:
        sorted(images, key=lambda im: (last_used.get(im.id, float("-inf")), im.id))

    run_plan()  # warm up
    p = time_ms(run_plan, args.repeat)
    b = time_ms(run_baseline, args.repeat)
    pm, bm = statistics.median(p), statistics.median(b)
    print(f"eviction plan, {args.images} images: median {pm:.1f} ms, max {max(p):.1f} ms", end="")
    print(f" (target < {TARGET_MS:g} ms)")
    print(f"baseline sorted() by last-used, same images: median {bm:.1f} ms")
    print(f"plan / baseline: {pm / bm:.1f}x")
    ok = pm < TARGET_MS
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
