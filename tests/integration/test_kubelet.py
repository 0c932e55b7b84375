"""The real kubelet (standalone, static pods) pulling through ``nodeagent run``.

What users rely on: with the drop-in ``nodeagent apply --flavor generic`` writes in the kubelet's
``--config-dir`` (``imageServiceEndpoint`` = nodeagent's socket), pods start as before and every
image the kubelet pulls is in nodeagent's metrics and log; nodeagent can crash and come back while
the kubelet runs, and the kubelet's next pulls go through the new daemon without restarting the
kubelet; on a small image filesystem nodeagent's eviction acts before the kubelet's image GC and
eviction manager, so the kubelet never fails an image GC or reclaims disk space itself.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import pytest

from tests.integration.test_proxy import value, wait_for_pull_lines
from tests.sandbox import Containerd, NodeAgent, PushedImage, Registry, Sandbox
from tests.sandbox.crictl import Crictl
from tests.sandbox.kubelet import Kubelet, nodeagent_dropin, start_kubelet, static_pod
from tests.sandbox.process import wait_until

MiB = 1 << 20
# What the kubelet logs when it has to free image-filesystem space itself, or fails to.
KUBELET_GC_TROUBLE = re.compile(
    r"Image garbage collection failed|ImageGCFailed|FreeDiskSpaceFailed|failed to garbage collect"
    r"|over the high threshold, trying to free|attempting to reclaim|must evict pod"
    r"|no space left on device",
    re.I,
)


@dataclass
class KubeletNode:
    node: Containerd
    agent: NodeAgent
    kubelet: Kubelet


def kubelet_node(
    sandbox: Sandbox, node: Containerd, agent_config: dict[str, object] | None = None
) -> KubeletNode:
    """``nodeagent run`` in front of ``node``, and a kubelet whose only link to it is the drop-in
    ``nodeagent apply --flavor generic`` wrote."""
    agent = sandbox.nodeagent(node, config=agent_config)
    dropin = nodeagent_dropin(sandbox.dir / "apply", agent)
    assert f"imageServiceEndpoint: {agent.proxy_endpoint}" in dropin.read_text()
    kl = start_kubelet(sandbox, node, dropins=[dropin])
    return KubeletNode(node, agent, kl)


@pytest.fixture
def knode(sandbox: Sandbox, pod_node: Containerd) -> KubeletNode:
    return kubelet_node(sandbox, pod_node)


def app_image(sandbox: Sandbox, registry: Registry, name: str, size: int = 1 * MiB) -> PushedImage:
    """A runnable image (busybox, entrypoint sleeps) with one random layer of ``size`` bytes."""
    return sandbox.image(registry, f"kubelet/{name}", layers=1, layer_size=size, busybox=True)


def pulls_of(agent: NodeAgent) -> dict[str, str]:
    return {line["image"]: line["result"] for line in agent.log_lines() if line.get("msg") == "pull"}


def test_three_container_static_pod_pulls_through_nodeagent(
    sandbox: Sandbox, registry: Registry, knode: KubeletNode
) -> None:
    images = [app_image(sandbox, registry, f"three-{n}") for n in ("a", "b", "c")]
    kl, agent = knode.kubelet, knode.agent
    kl.add_pod(static_pod("three", [(f"c{i}", img.reference) for i, img in enumerate(images)]))
    pod = kl.wait_running("three")

    statuses = {c["name"]: c for c in pod["status"]["containerStatuses"]}
    for i, img in enumerate(images):
        assert statuses[f"c{i}"]["imageID"].endswith(img.manifest_digest) or img.image_id in str(
            statuses[f"c{i}"]
        )
    lines = wait_for_pull_lines(agent, 3)
    assert {line["image"]: line["result"] for line in lines} == {img.reference: "success" for img in images}
    for line in lines:
        assert line["bytes"] > 1 * MiB and line["duration_seconds"] > 0
    text = agent.scrape()
    assert (
        value(text, "nodeagent_image_pulls_total", registry=registry.host, result="success", origin="kubelet")
        == 3
    )
    # the kubelet asks ImageStatus before each pull: three misses, through nodeagent too
    assert value(text, "nodeagent_image_cache_requests_total", result="miss") >= 3
    wait_until("status file shows the pulls", lambda: agent.status()["pulls"]["totals"] == {"success": 3}, 10)
    assert agent.status()["proxy"]["upstreamOk"] is True
    log = kl.log_text()  # the kubelet's own events say the same
    for img in images:
        assert f'reason="Pulled" message="Successfully pulled image \\"{img.reference}\\" in ' in log
    # and none of its image-service calls through nodeagent (ImageStatus, PullImage, ListImages,
    # ImageFsInfo for its stats) failed: the kubelet logs each failure as "... from image service failed"
    assert "from image service failed" not in log


def test_nodeagent_crash_and_restart_while_the_kubelet_runs(
    sandbox: Sandbox, registry: Registry, knode: KubeletNode
) -> None:
    first, second = app_image(sandbox, registry, "before"), app_image(sandbox, registry, "after")
    kl, agent = knode.kubelet, knode.agent
    kl.add_pod(static_pod("before", [("app", first.reference)]))
    kl.wait_running("before")
    kubelet_pid, old_agent_pid = kl.pid, agent.pid

    agent.kill()  # a crash: the kubelet's connection drops, the socket file stays behind
    kl.add_pod(static_pod("after", [("app", second.reference)]))

    def kubelet_saw_the_outage() -> bool:
        pod = kl.pod("after")
        waiting = [
            (c.get("state") or {}).get("waiting", {}).get("reason")
            for c in ((pod or {}).get("status") or {}).get("containerStatuses") or []
        ]
        # ImageStatus (asked first) fails: ImageInspectError; a failed PullImage: ErrImagePull
        return bool({"ImageInspectError", "ErrImagePull", "ImagePullBackOff"} & set(waiting))

    wait_until("the kubelet's pull fails while nodeagent is down", kubelet_saw_the_outage, 60)
    agent.start()  # same root, same socket path (the stale socket is replaced)
    assert agent.pid != old_agent_pid
    pod = kl.wait_running("after", timeout=180)  # the kubelet retries on its own back-off
    assert kl.pid == kubelet_pid and kl.running  # no kubelet restart
    assert pulls_of(agent).get(second.reference) == "success"
    text = agent.scrape()  # the new process counted it
    assert (
        value(text, "nodeagent_image_pulls_total", registry=registry.host, result="success", origin="kubelet")
        >= 1
    )
    before = kl.pod("before")
    assert before is not None and before["status"]["containerStatuses"][0]["restartCount"] == 0
    assert pod["status"]["containerStatuses"][0]["ready"] is True


def test_nodeagent_evicts_before_the_kubelet_image_gc_on_a_small_imagefs(
    sandbox: Sandbox, registry: Registry, pause_image: PushedImage
) -> None:
    fs = sandbox.loopfs(240)
    node = sandbox.containerd(
        [registry], pods=True, sandbox_image=pause_image.reference, root_dir=fs.mountpoint / "root"
    )
    eviction = {"highThresholdPercent": 60, "lowThresholdPercent": 40, "minUnusedAge": "0s", "interval": "1s"}
    kn = kubelet_node(sandbox, node, {"eviction": eviction})
    kl, agent = kn.kubelet, kn.agent
    keep = app_image(sandbox, registry, "keep", 8 * MiB)
    churn = [
        sandbox.image(registry, f"kubelet/churn{i:02d}", layers=1, layer_size=20 * MiB) for i in range(12)
    ]
    late = app_image(sandbox, registry, "late", 8 * MiB)

    kl.add_pod(static_pod("keep", [("app", keep.reference)]))
    kl.wait_running("keep")
    # from here on: the kubelet's first image GC, at start-up, may fail once ("Stats initialization
    # may not have completed yet") before cAdvisor's first housekeeping, with or without nodeagent
    mark = len(kl.log_text())
    # the kubelet's own view of its image filesystem, sampled throughout: usage as its image GC and
    # eviction manager compute it (1 - available / capacity)
    seen: list[float] = []
    capacity: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            try:
                image_fs = kl.summary()["node"]["runtime"]["imageFs"]
            except Exception:
                continue
            capacity.append(int(image_fs["capacityBytes"]))
            seen.append(1 - int(image_fs["availableBytes"]) / int(image_fs["capacityBytes"]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        crictl = Crictl(
            sandbox.dir / "crictl", image_endpoint=agent.proxy_endpoint, runtime_endpoint=node.endpoint
        )
        for img in churn:  # 12 x 20 MiB (~480 MB on disk) through nodeagent onto a 240 MB filesystem
            r = crictl.run("pull", img.reference)
            assert r.returncode == 0, r.stderr
        kl.add_pod(static_pod("late", [("app", late.reference)]))
        kl.wait_running("late")
        wait_until("the kubelet sampled its imagefs", lambda: len(seen) >= 5, 30)
    finally:
        stop.set()
        sampler.join(timeout=10)

    text = agent.scrape()
    evicted = value(text, "nodeagent_image_evictions_total", reason="lru")
    print(f"nodeagent evicted {evicted:.0f} images; the kubelet saw its imagefs at most {max(seen):.0%} full")
    assert evicted > 0
    assert pulls_of(agent).get(late.reference) == "success"
    kept = kl.pod("keep")  # the running pod and its image were left alone
    assert kept is not None and kept["status"]["containerStatuses"][0]["restartCount"] == 0
    assert crictl.run("inspecti", "-q", keep.reference).returncode == 0
    # the kubelet measured this small filesystem, and never saw it past its GC threshold (85 %)
    total = fs.usage()[1]
    assert capacity and all(abs(c - total) < 0.05 * total for c in capacity), (capacity[:3], total)
    assert max(seen) < 0.85, max(seen)
    trouble = [line for line in kl.log_text()[mark:].splitlines() if KUBELET_GC_TROUBLE.search(line)]
    assert trouble == []
