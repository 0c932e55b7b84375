"""Pod-aware pulls benchmark (issue 14): time from pod creation to Running with the real API server and
the real kubelet registered against it, kubelet alone vs with nodeagent, in the same run.

Each side gets a fresh one-node cluster (tests/sandbox/cluster.py: etcd + kube-apiserver, containerd
running pods, the kubelet with the node's client certificate; with nodeagent, the kubelet's
``imageServiceEndpoint`` is nodeagent's proxy and nodeagent watches the node's pods). Images come from
a docker-registry behind a throttle of ``--rate`` bytes/s per connection (default 4 MiB/s); every
image is pushed fresh for each side, so nothing is cached. A warm-up pod runs first on each side (the
pause image and the kubelet's first-pod work are not measured).

Measured per side (seconds from the API server accepting the pod to the pod seen Ready, polled
every 50 ms):

- ``one``: a pod with one container (one image): the time of pulling the pod's largest image alone;
- ``three``: a pod with three containers, three equal images;
- ``init2``: a pod with an init container and two containers, three equal images;
- ``shared20``: 20 pods with one shared (fresh) image, created together: registry requests for it
  (manifest and blob GETs in the registry's access log) and the time until all are Running.

Targets (with nodeagent): ``three`` and ``init2`` <= 1.2x ``one`` on the same side, and ``three``
>= 2.5x faster than kubelet alone; ``shared20`` makes one blob fetch. Exit 0 when all are met.

Run: ``python -m bench pod_pulls_aware`` or ``python -m bench.bench_pod_pulls_aware [--rate B/s]
[--size B]``. Needs root, the sandbox packages (scripts/setup.sh) and the test binaries
(``python -m tests.sandbox.testbins build etcd kube-apiserver kubelet``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from typing import Any

from tests.sandbox import Registry, Sandbox
from tests.sandbox.cluster import Cluster, one_node_cluster
from tests.sandbox.controlplane import pod_manifest
from tests.sandbox.kubelet import pod_running
from tests.sandbox.oci import PushedImage, build_image, push_image
from tests.sandbox.process import wait_until

MiB = 1 << 20
RATIO_OF_ONE = 1.2
SPEEDUP_THREE = 2.5


def running_after(c: Cluster, manifest: dict[str, Any], timeout: float = 300.0) -> float:
    """Create the pod; seconds until it is seen Running with every container ready."""
    name = manifest["metadata"]["name"]
    t0 = time.monotonic()
    c.cp.create(manifest)
    wait_until(f"pod {name} Running", lambda: pod_running(c.cp.pod(name)), timeout, interval=0.05)
    return time.monotonic() - t0


def fresh(reg: Registry, throttle: Any, tag: str, size: int) -> str:
    img: PushedImage = push_image(
        reg, f"bench/{tag}", "v1", build_image(layers=1, layer_size=size, busybox=True)
    )
    return img.reference.replace(reg.host, throttle.address, 1)


def pull_span(agent: Any, refs: set[str], created: float) -> tuple[float, float]:
    """(first upstream pull start to last end, pod creation to last end) for ``refs``, from
    nodeagent's pull records (``created``: wall time of the pod's creation)."""
    recs: list[dict[str, Any]] = []

    def recorded() -> bool:
        recs[:] = [x for x in agent.status()["pulls"]["recent"] if x["image"] in refs and not x["joined"]]
        return len(recs) == len(refs)  # the status file is written within a second of a change

    wait_until("pull records", recorded, 30)
    start = min(x["started_at"] for x in recs)
    end = max(x["started_at"] + x["duration"] for x in recs)
    return float(end - start), float(end - created)


def side(
    sb: Sandbox, reg: Registry, throttle: Any, size: int, with_agent: bool, rounds: int
) -> dict[str, Any]:
    label = "nodeagent" if with_agent else "kubelet-alone"
    # the kubelet as nodeagent apply configures it (parallel pulls across pods) on both sides
    kubelet = {"serializeImagePulls": False, "maxParallelImagePulls": 10}
    c = one_node_cluster(sb, reg, nodeagent=with_agent, kubelet_config=kubelet)
    c.node.write_hosts_toml(throttle.address, f"http://{throttle.address}")
    run = uuid.uuid4().hex[:6]
    node = c.node_name
    out: dict[str, Any] = {"label": label, "one": [], "three": [], "init2": []}
    out.update(three_pull_span=[], three_images_ready=[])
    warm = push_image(reg, f"bench/warm-{run}", "v1", build_image(layers=0, busybox=True)).reference
    running_after(c, pod_manifest("warm", node, [("w", warm)]))
    for r in range(rounds):  # interleaved, so that load from elsewhere hits all three alike
        one = fresh(reg, throttle, f"one-{run}-{r}", size)
        out["one"].append(running_after(c, pod_manifest(f"one{r}", node, [("a", one)])))
        three = [(f"c{i}", fresh(reg, throttle, f"three{i}-{run}-{r}", size)) for i in range(3)]
        created = time.time()
        out["three"].append(running_after(c, pod_manifest(f"three{r}", node, three)))
        if c.agent is not None:  # how long the pulls themselves took, from nodeagent's pull records
            span, ready = pull_span(c.agent, {ref for _, ref in three}, created)
            out["three_pull_span"].append(span)
            out["three_images_ready"].append(ready)
        imgs = [fresh(reg, throttle, f"init2{i}-{run}-{r}", size) for i in range(3)]
        out["init2"].append(
            running_after(
                c, pod_manifest(f"init2{r}", node, [("a", imgs[1]), ("b", imgs[2])], init=[("i", imgs[0])])
            )
        )
    for key in ("one", "three", "init2", "three_pull_span", "three_images_ready"):
        out[key + "_median"] = statistics.median(out[key]) if out[key] else None
    shared = fresh(reg, throttle, f"shared-{run}", size)
    repo = f"/v2/bench/shared-{run}/"
    mark = reg.mark()
    t0 = time.monotonic()
    for i in range(20):
        c.cp.create(pod_manifest(f"s{i}", node, [("a", shared)]))
    for i in range(20):
        wait_until(f"pod s{i} Running", lambda i=i: pod_running(c.cp.pod(f"s{i}")), 600, interval=0.1)
    out["shared20_seconds"] = time.monotonic() - t0
    reqs = [r for r in reg.requests_since(mark) if r.path.startswith(repo) and r.method in ("GET", "HEAD")]
    out["shared20_manifest_requests"] = sum("/manifests/" in r.path for r in reqs)
    out["shared20_blob_gets"] = sum(r.is_blob and r.method == "GET" for r in reqs)
    out["shared20_requests"] = len(reqs)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=int, default=4 * MiB, help="registry bytes/s per connection")
    ap.add_argument("--size", type=int, default=8 * MiB, help="random bytes per image (plus busybox)")
    ap.add_argument("--rounds", type=int, default=3, help="pods of each kind per side (median reported)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args(argv)
    results = []
    with Sandbox(prefix="na-bpp-") as sb:
        reg = sb.registry()
        throttle = sb.throttle_proxy(reg, args.rate)
        for with_agent in (False, True):
            with Sandbox(prefix="na-bpp-side-") as side_sb:
                results.append(side(side_sb, reg, throttle, args.size, with_agent, args.rounds))
    alone, agent = results
    rate, size = args.rate / MiB, args.size / MiB
    print(f"registry capped at {rate:.1f} MiB/s per connection; images {size:.0f} MiB + busybox")
    print(f"{'median of ' + str(args.rounds):28}{'kubelet alone':>15}{'with nodeagent':>16}")
    for key, what in (
        ("one", "1 container (1 image)"),
        ("three", "3 containers"),
        ("init2", "init + 2 containers"),
    ):
        print(f"{what:<28}{alone[key + '_median']:>14.2f}s{agent[key + '_median']:>15.2f}s")
    print(f"{'3 containers: pull span':<28}{'':>15}{agent['three_pull_span_median']:>15.2f}s")
    print(f"{'3 containers: images ready':<28}{'':>15}{agent['three_images_ready_median']:>15.2f}s")
    print(f"{'20 pods, one image':<28}{alone['shared20_seconds']:>14.2f}s{agent['shared20_seconds']:>15.2f}s")
    for key in ("shared20_manifest_requests", "shared20_blob_gets"):
        print(f"{'  registry ' + key.split('_', 1)[1]:<28}{alone[key]:>15}{agent[key]:>16}")
    one, three, init2 = (agent[k + "_median"] for k in ("one", "three", "init2"))
    checks = {
        "three <= 1.2x one (nodeagent)": three <= RATIO_OF_ONE * one,
        "init2 <= 1.2x one (nodeagent)": init2 <= RATIO_OF_ONE * one,
        "three >= 2.5x faster than kubelet alone": alone["three_median"] >= SPEEDUP_THREE * three,
        "20 pods: each blob fetched once (nodeagent)": agent["shared20_blob_gets"] == 2,  # busybox + layer
    }
    print(
        f"ratios: three/one {three / one:.2f}, init2/one {init2 / one:.2f}; speed-up "
        f"three {alone['three_median'] / three:.2f}x, init2 {alone['init2_median'] / init2:.2f}x"
    )
    for what, ok in checks.items():
        print(f"  {'ok  ' if ok else 'MISS'} {what}")
    if args.json:
        print(json.dumps({"alone": alone, "nodeagent": agent, "rate": args.rate, "size": args.size}))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
