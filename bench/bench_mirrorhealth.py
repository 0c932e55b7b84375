"""Mirror health benchmark: pull time with a hung mirror, stock containerd vs nodeagent (issue 8).

On a sandbox node (real containerd 1.6, real docker-registry, a server that accepts TCP and never
answers, listed first in the registry's hosts.toml), with default ``containerd.mirrorHealth``:

- ``stock``: containerd alone, bounded by ``--stock-deadline`` (reported as ">N s" when it hits it);
- ``first``: the first pull through ``nodeagent run``'s proxy, started as soon as the daemon is up
  (target: under 10 s);
- ``after``: pulls after the fail-over, against the baseline ``none``: pulls through a proxy in front
  of a containerd with no mirror configured; ``--rounds`` pairs, interleaved, medians compared
  (target: after <= 1.5 x none).

Run as root: ``python -m bench mirrorhealth`` or ``python bench/bench_mirrorhealth.py [--rounds N]
[--stock-deadline S] [--layer-mib M]``. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.sandbox (the sandbox node) lives beside the package

from bench import results  # noqa: E402
from nodeagent.apply.targets.mirrors import render_hosts_toml  # noqa: E402
from nodeagent.config.model import Mirror  # noqa: E402
from nodeagent.cri.client import CriClient  # noqa: E402
from tests.sandbox import Containerd, Registry, Sandbox  # noqa: E402
from tests.sandbox.agent import NodeAgent  # noqa: E402

FIRST_TARGET_S = 10.0
AFTER_RATIO_TARGET = 1.5


def node_with(sb: Sandbox, registry: Registry, mirrors: list[Mirror]) -> Containerd:
    node = sb.containerd([])
    path = node.hosts_dir / registry.host / "hosts.toml"
    path.parent.mkdir(parents=True)
    path.write_text(render_hosts_toml(registry.host, mirrors))
    return node


def agent_for(sb: Sandbox, node: Containerd, registry: Registry, mirrors: list[Mirror]) -> NodeAgent:
    config: dict[str, Any] = {
        "containerd": {
            "hostsDir": "/etc/containerd/certs.d",
            "mirrors": {registry.host: [{"endpoint": m.endpoint} for m in mirrors]} if mirrors else {},
        }
    }
    agent = sb.nodeagent(node, start=False, config=config)
    link = agent.root / "etc/containerd/certs.d"
    link.parent.mkdir(parents=True)
    link.symlink_to(node.hosts_dir)
    agent.start()
    return agent


async def timed_pull(endpoint: str, ref: str, deadline: float) -> float | None:
    async with CriClient(endpoint) as cri:
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(cri.pull_image(ref), deadline)
        except TimeoutError:
            return None
        return time.monotonic() - t0


def pull(endpoint: str, ref: str, deadline: float = 120.0) -> float:
    took = asyncio.run(timed_pull(endpoint, ref, deadline))
    if took is None:
        raise RuntimeError(f"pull of {ref} through {endpoint} did not finish in {deadline:g} s")
    return took


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved pairs after the fail-over")
    ap.add_argument("--stock-deadline", type=float, default=60.0, help="give up on stock after S seconds")
    ap.add_argument("--layer-mib", type=int, default=4, help="two layers of this size per image")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_mirrorhealth: needs root (containerd)", file=sys.stderr)
        return 1
    with Sandbox(prefix="na-bench-mh-") as sb:
        registry = sb.registry()
        hung = sb.hung_server()
        mirror = Mirror(hung.url)
        n = 3 + 2 * args.rounds
        imgs = [sb.image(registry, layers=2, layer_size=args.layer_mib << 20) for _ in range(n)]
        stock_img, first_img, warm_img = imgs[:3]

        stock = node_with(sb, registry, [mirror])
        stock_s = asyncio.run(timed_pull(stock.endpoint, stock_img.reference, args.stock_deadline))
        stock.stop()

        node = node_with(sb, registry, [mirror])
        agent = agent_for(sb, node, registry, [mirror])
        first_s = pull(agent.proxy_endpoint, first_img.reference)

        plain = node_with(sb, registry, [])
        plain_agent = agent_for(sb, plain, registry, [])
        pull(plain_agent.proxy_endpoint, warm_img.reference)
        none_s, after_s = [], []
        for a, b in zip(imgs[3::2], imgs[4::2], strict=True):
            none_s.append(pull(plain_agent.proxy_endpoint, a.reference))
            after_s.append(pull(agent.proxy_endpoint, b.reference))

    none_med, after_med = statistics.median(none_s), statistics.median(after_s)
    ratio = after_med / none_med
    size = f"2 x {args.layer_mib} MiB"
    stock_text = f">{args.stock_deadline:g} s (cancelled)" if stock_s is None else f"{stock_s:.2f} s"
    print(f"image {size}, hung mirror first in hosts.toml, default mirrorHealth settings")
    print(f"stock containerd            {stock_text}")
    print(f"nodeagent, first pull       {first_s:.2f} s   (target < {FIRST_TARGET_S:g} s)")
    print(f"nodeagent, after fail-over  {after_med:.3f} s median of {len(after_s)}")
    print(f"no mirror (baseline)        {none_med:.3f} s median of {len(none_s)}")
    print(f"after / no mirror           {ratio:.2f}x   (target <= {AFTER_RATIO_TARGET:g}x)")
    ok = first_s < FIRST_TARGET_S and ratio <= AFTER_RATIO_TARGET
    results.write(
        "mirrorhealth",
        {
            "image": size,
            "stock_seconds": stock_s,  # null: still hanging at the deadline, cancelled
            "stock_deadline_seconds": args.stock_deadline,
            "first_seconds": first_s,
            "after_failover_seconds": after_s,
            "no_mirror_seconds": none_s,
            "targets": {"first_seconds": FIRST_TARGET_S, "after_ratio": AFTER_RATIO_TARGET},
            "met": ok,
        },
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
