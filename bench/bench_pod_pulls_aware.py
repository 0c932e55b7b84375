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

Run: ``python -m bench pod_pulls_aware`` or ``python bench/bench_pod_pulls_aware.py [--rate B/s]
[--size B]``. Needs root, the sandbox packages (scripts/setup.sh) and the test binaries
(``python -m tests.sandbox.testbins build etcd kube-apiserver kubelet``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

from tests.sandbox import Registry, Sandbox
from tests.sandbox.cluster import Cluster, one_node_cluster
from tests.sandbox.controlplane import pod_manifest, pod_running
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


def side(sb: Sandbox, reg: Registry, throttle: Any, size: int, with_agent: bool) -> dict[str, Any]:
    label = "nodeagent" if with_agent else "kubelet-alone"
    c = one_node_cluster(sb, reg, nodeagent=with_agent)
    c.node.write_hosts_toml(throttle.address, f"http://{throttle.address}")
    run = uuid.uuid4().hex[:6]
    node = c.node_name
    out: dict[str, Any] = {"label": label}
    warm = push_image(reg, f"bench/warm-{run}", "v1", build_image(layers=0, busybox=True)).reference
    running_after(c, pod_manifest("warm", node, [("w", warm)]))
    out["one"] = running_after(
        c, pod_manifest("one", node, [("a", fresh(reg, throttle, f"one-{run}", size))])
    )
    three = [(f"c{i}", fresh(reg, throttle, f"three{i}-{run}", size)) for i in range(3)]
    out["three"] = running_after(c, pod_manifest("three", node, three))
    imgs = [fresh(reg, throttle, f"init2{i}-{run}", size) for i in range(3)]
    out["init2"] = running_after(
        c, pod_manifest("init2", node, [("a", imgs[1]), ("b", imgs[2])], init=[("i", imgs[0])])
    )
    shared = fresh(reg, throttle, f"shared-{run}", size)
    repo = f"/v2/bench/shared-{run}/"
    mark = reg.mark()
    t0 = time.monotonic()
    for i in range(20):
        c.cp.create(pod_manifest(f"s{i}", node, [("a", shared)]))
    for i in range(20):
        wait_until(f"pod s{i} Running", lambda i=i: pod_running(c.cp.pod(f"s{i}")), 600, interval=0.1)
    out["shared20_seconds"] = time.monotonic() - t0
    reqs = [r for r in reg.requests_since(mark) if r.path.startswith(repo) and r.method == "GET"]
    out["shared20_manifest_gets"] = sum("/manifests/" in r.path for r in reqs)
    out["shared20_blob_gets"] = sum(r.is_blob for r in reqs)
    out["shared20_requests"] = len(reqs)
    # tear this side down before the next starts (one cluster at a time on a shared machine)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=int, default=4 * MiB, help="registry bytes/s per connection")
    ap.add_argument("--size", type=int, default=8 * MiB, help="random bytes per image (plus busybox)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args(argv)
    results = []
    with Sandbox(prefix="na-bpp-") as sb:
        reg = sb.registry()
        throttle = sb.throttle_proxy(reg, args.rate)
        for with_agent in (False, True):
            with Sandbox(prefix="na-bpp-side-") as side_sb:
                results.append(side(side_sb, reg, throttle, args.size, with_agent))
    alone, agent = results
    rate, size = args.rate / MiB, args.size / MiB
    print(f"registry capped at {rate:.1f} MiB/s per connection; images {size:.0f} MiB + busybox")
    print(f"{'':28}{'kubelet alone':>15}{'with nodeagent':>16}")
    for key, what in (
        ("one", "1 container (1 image)"),
        ("three", "3 containers"),
        ("init2", "init + 2 containers"),
    ):
        print(f"{what:<28}{alone[key]:>14.2f}s{agent[key]:>15.2f}s")
    print(f"{'20 pods, one image':<28}{alone['shared20_seconds']:>14.2f}s{agent['shared20_seconds']:>15.2f}s")
    for key in ("shared20_manifest_gets", "shared20_blob_gets"):
        print(f"{'  ' + key.split('_', 1)[1]:<28}{alone[key]:>15}{agent[key]:>16}")
    checks = {
        "three <= 1.2x one (nodeagent)": agent["three"] <= RATIO_OF_ONE * agent["one"],
        "init2 <= 1.2x one (nodeagent)": agent["init2"] <= RATIO_OF_ONE * agent["one"],
        "three >= 2.5x faster than kubelet alone": alone["three"] >= SPEEDUP_THREE * agent["three"],
        "20 pods: one blob fetch (nodeagent)": agent["shared20_blob_gets"] == 2,  # busybox + random layer
    }
    one = agent["one"]
    print(
        f"ratios: three/one {agent['three'] / one:.2f}, init2/one {agent['init2'] / one:.2f}; speed-up "
        f"three {alone['three'] / agent['three']:.2f}x, init2 {alone['init2'] / agent['init2']:.2f}x"
    )
    for what, ok in checks.items():
        print(f"  {'ok  ' if ok else 'MISS'} {what}")
    if args.json:
        print(json.dumps({"alone": alone, "nodeagent": agent, "rate": args.rate, "size": args.size}))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
