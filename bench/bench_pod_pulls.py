"""Pull timeline of a 3-container pod with the real kubelet (the baseline for pod-aware pulls, issue 14).

A standalone kubelet (static pods, built by tests/sandbox/testbins.py) runs one pod with three
containers, each image ~9.5 MB of incompressible data (busybox + one random layer), from a
docker-registry behind a throttle of ``--rate`` bytes/s per connection (tests/sandbox/net.py
ThrottleProxy, default 4 MiB/s). Two runs, each on a fresh containerd with the pause image already
present and a kubelet that has already started one pod (so only the pod's own pulls are measured):

- ``nodeagent``: the kubelet's ``imageServiceEndpoint`` is ``nodeagent run`` (the drop-in written by
  ``nodeagent apply --flavor generic``); the timeline comes from nodeagent's pull records
  (start time and duration of each PullImage it proxied);
- ``kubelet-alone``: the same drop-in (``serializeImagePulls: false``, ``maxParallelImagePulls``)
  and a later one putting ``imageServiceEndpoint`` back on containerd; the timeline comes from the
  kubelet's own ``Pulling`` / ``Pulled`` events (its log, at level 3).

Printed and written to ``<bench results dir>/pod_pulls.json`` (``bench.results.write``; the dir is
``$NODEAGENT_BENCH_RESULTS`` or ``bench/results/``). Format (schema 1), all times in seconds
relative to the pod's creation (the moment the static pod manifest is written):

    {"benchmark": "pod_pulls", "schema": 1, "created": "2026-11-29T23:00:00Z",
     "setup": {"kubelet": "v1.34.4", "rate_bytes_per_second": 4194304, "containers": 3,
               "image_bytes": [9512345, ...]},
     "runs": [{"label": "nodeagent", "timeline_source": "nodeagent pull records",
               "pod_running_seconds": 7.05,
               "pulls": [{"container": "c0", "image": "127.0.0.1:PORT/bench/pod-c0:r1",
                          "bytes": 9512345, "start_seconds": 0.41, "end_seconds": 2.60}, ...],
               "pull_span_seconds": 6.6, "pull_sum_seconds": 6.5, "max_parallel_pulls": 1},
              {"label": "kubelet-alone", "timeline_source": "kubelet events", ...}]}

No target yet: the kubelet pulls a pod's images one after the other (``max_parallel_pulls`` 1),
whatever ``serializeImagePulls`` says; issue 14's target is ``pod_running_seconds`` <= 1.2x one
image's pull. Exit 0 when both pods ran and every pull was timed, 1 otherwise.

Run: ``python -m bench pod_pulls`` or ``python bench/bench_pod_pulls.py [--rate B/s] [--size B]``.
Needs root, the sandbox packages (scripts/setup.sh) and the kubelet
(``python -m tests.sandbox.testbins build kubelet``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bench import results
from nodeagent.cri.client import CriClient
from tests.sandbox import NodeAgent, Sandbox, testbins
from tests.sandbox.kubelet import (
    API_VERSION,
    Kubelet,
    nodeagent_dropin,
    pod_running,
    start_kubelet,
    static_pod,
)
from tests.sandbox.process import SandboxError, wait_until

MiB = 1 << 20
CONTAINERS = 3
# I1129 22:10:06.123456   12345 event.go:389] "Event occurred" object="default/pp-na-..."
# fieldPath="spec.containers{c0}" ... reason="Pulling" ...
_EVENT = re.compile(
    r"^I(?P<mon>\d\d)(?P<day>\d\d) (?P<time>\d\d:\d\d:\d\d\.\d+)\s.*\"Event occurred\".*"
    r'fieldPath="spec\.containers\{(?P<container>[^}]+)\}".*reason="(?P<reason>Pulling|Pulled)"',
    re.M,
)


@dataclass
class Pull:
    container: str
    image: str
    bytes: int
    start: float
    end: float


@dataclass
class Run:
    label: str
    source: str
    running: float = 0.0
    pulls: list[Pull] = field(default_factory=list)

    @property
    def span(self) -> float:
        return max(p.end for p in self.pulls) - min(p.start for p in self.pulls)

    @property
    def total(self) -> float:
        return sum(p.end - p.start for p in self.pulls)

    @property
    def max_parallel(self) -> int:
        edges = sorted([(p.start, 1) for p in self.pulls] + [(p.end, -1) for p in self.pulls])
        now = peak = 0
        for _, step in edges:  # an end sorts before a start at the same instant
            now += step
            peak = max(peak, now)
        return peak

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "timeline_source": self.source,
            "pod_running_seconds": round(self.running, 3),
            "pulls": [
                {
                    "container": p.container,
                    "image": p.image,
                    "bytes": p.bytes,
                    "start_seconds": round(p.start, 3),
                    "end_seconds": round(p.end, 3),
                }
                for p in self.pulls
            ],
            "pull_span_seconds": round(self.span, 3),
            "pull_sum_seconds": round(self.total, 3),
            "max_parallel_pulls": self.max_parallel,
        }

    def report(self) -> str:
        lines = [f"{self.label} (timeline from {self.source}): pod Running after {self.running:.2f} s"]
        for p in self.pulls:
            lines.append(
                f"  {p.container}  {p.start:6.2f} s -> {p.end:6.2f} s  ({p.end - p.start:5.2f} s, "
                f"{p.bytes / 1e6:.1f} MB)  {p.image}"
            )
        lines.append(
            f"  pulls: span {self.span:.2f} s, sum {self.total:.2f} s, at most {self.max_parallel} at once"
        )
        return "\n".join(lines)


def event_times(log: str, year: int) -> dict[tuple[str, str], float]:
    """(container, Pulling|Pulled) -> unix time of the kubelet's event (its klog line, local time)."""
    out: dict[tuple[str, str], float] = {}
    for m in _EVENT.finditer(log):
        hms, _, frac = m.group("time").partition(".")
        h, mi, s = (int(x) for x in hms.split(":"))
        t = datetime.datetime(
            year, int(m.group("mon")), int(m.group("day")), h, mi, s, int(frac[:6].ljust(6, "0"))
        )
        out[(m.group("container"), m.group("reason"))] = t.timestamp()  # naive = local time, as klog
    return out


def wait_running(kl: Kubelet, name: str, timeout: float = 300.0) -> float:
    """Poll the kubelet's /pods until the pod runs; the unix time it was first seen Running."""
    seen: list[float] = []

    def running() -> bool:
        pod = kl.pod(name)
        if pod is not None and pod_running(pod):
            seen.append(time.time())
            return True
        return False

    wait_until(f"pod {name} Running", running, timeout, interval=0.05)
    return seen[0]


def one_run(sb: Sandbox, label: str, args: argparse.Namespace, seq: int) -> tuple[Run, list[int]]:
    reg = sb.registry()
    slow = sb.throttle_proxy(reg, args.rate)
    pause = sb.pause_image(reg)
    images = [
        sb.image(reg, f"bench/pod-c{i}", f"r{seq}", layers=1, layer_size=args.size, busybox=True)
        for i in range(CONTAINERS)
    ]
    refs = [img.reference.replace(reg.host, slow.address, 1) for img in images]
    node = sb.containerd([reg], pods=True, sandbox_image=pause.reference)
    node.write_hosts_toml(slow.address, slow.url)

    async def prepull() -> None:  # the node's sandbox image is local (AL2023 ships it), as here
        async with CriClient(node.endpoint) as cri:
            await cri.pull_image(pause.reference)

    asyncio.run(prepull())
    agent = None
    if label == "nodeagent":
        agent = sb.nodeagent(node)
        kl = start_kubelet(sb, node, dropins=[nodeagent_dropin(sb.dir / f"apply{seq}", agent)])
    else:
        # the same pull settings (nodeagent's drop-in), with the image service put back on containerd
        work = sb.dir / f"apply{seq}"
        dropin = nodeagent_dropin(work, NodeAgent(work / "not-started", node.endpoint))
        direct = work / "99-direct.conf"
        direct.write_text(
            f"apiVersion: {API_VERSION}\nkind: KubeletConfiguration\nimageServiceEndpoint: {node.endpoint}\n"
        )
        kl = start_kubelet(sb, node, dropins=[dropin, direct])
    kl.add_pod(static_pod("warmup", [("app", pause.reference)]))  # the kubelet is up and starting pods
    kl.wait_running("warmup", timeout=300)

    t0 = time.time()
    kl.add_pod(static_pod("pp", [(f"c{i}", ref) for i, ref in enumerate(refs)]))
    run = Run(label, "nodeagent pull records" if agent else "kubelet events")
    run.running = wait_running(kl, "pp") - t0
    sizes = [img.size for img in images]
    by_ref = dict(zip(refs, range(CONTAINERS), strict=True))
    if agent is not None:
        records: list[dict[str, Any]] = []

        def recorded() -> bool:
            records[:] = [r for r in agent.status()["pulls"]["recent"] if r["image"] in by_ref]
            return len(records) == CONTAINERS

        wait_until("nodeagent's records of the pod's pulls", recorded, 30)
        for r in records:
            i = by_ref[r["image"]]
            start = r["started_at"] - t0
            run.pulls.append(Pull(f"c{i}", r["image"], r["bytes"] or sizes[i], start, start + r["duration"]))
    else:
        times: dict[tuple[str, str], float] = {}

        def logged() -> bool:
            times.update(event_times(kl.log_text(), time.localtime(t0).tm_year))
            return all((f"c{i}", "Pulled") in times for i in range(CONTAINERS))

        wait_until("the kubelet's Pulled events", logged, 30)
        for i, ref in enumerate(refs):
            c = f"c{i}"
            run.pulls.append(Pull(c, ref, sizes[i], times[(c, "Pulling")] - t0, times[(c, "Pulled")] - t0))
    run.pulls.sort(key=lambda p: p.start)
    kl.stop()
    if agent is not None:
        agent.stop()
    node.stop()
    return run, sizes


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rate", type=int, default=4 * MiB, help="bytes/s per registry connection")
    ap.add_argument(
        "--size", type=int, default=int(8.4e6), help="random bytes per image (plus ~1.1 MB of busybox)"
    )
    args = ap.parse_args(argv)
    runs: list[Run] = []
    sizes: list[int] = []
    try:
        with Sandbox(prefix="na-bench-") as sb:
            for seq, label in enumerate(("nodeagent", "kubelet-alone"), 1):
                run, sizes = one_run(sb, label, args, seq)
                runs.append(run)
                print(run.report(), flush=True)
    except SandboxError as e:
        print(f"bench_pod_pulls: {e}", file=sys.stderr)
        return 1
    kubelet_version = testbins.SPECS["kubelet"].version
    results.write(
        "pod_pulls",
        {
            "setup": {
                "kubelet": kubelet_version,
                "rate_bytes_per_second": args.rate,
                "containers": CONTAINERS,
                "image_bytes": sizes,
            },
            "runs": [r.to_json() for r in runs],
        },
    )
    one = min(p.end - p.start for r in runs for p in r.pulls)
    print(
        f"kubelet {kubelet_version}, {args.rate / MiB:g} MiB/s per connection: pod Running after "
        + ", ".join(f"{r.running:.2f} s ({r.label})" for r in runs)
        + f"; one image alone takes ~{one:.2f} s; pulls at once: "
        + ", ".join(f"{r.max_parallel} ({r.label})" for r in runs)
        + " (baseline for issue 14: no target yet)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
