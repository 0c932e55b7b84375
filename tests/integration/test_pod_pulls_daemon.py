"""Pod pulls inside the real daemon when there is no usable Kubernetes API (no control plane needed):
a missing kubeconfig is waited for quietly, a bad one is a clear error at start, and in both cases the
proxy, /healthz and /metrics go on serving."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

from nodeagent.cri.client import CriClient
from tests.sandbox import Containerd, PushedImage, Sandbox
from tests.sandbox.process import wait_until

KUBECONFIG = "/var/lib/kubelet/kubeconfig"


def proxy_pulls(endpoint: str, image: str) -> str:
    async def body() -> str:
        async with CriClient(endpoint) as cri:
            return await cri.pull_image(image)

    return asyncio.run(body())


def test_bad_kubeconfig_is_a_clear_error_and_the_proxy_keeps_serving(
    sandbox: Sandbox, containerd: Containerd, image_factory: object
) -> None:
    img: PushedImage = image_factory()  # type: ignore[operator]
    agent = sandbox.nodeagent(containerd, start=False, config={"podPulls": {"kubeconfig": KUBECONFIG}})
    path = agent.root / KUBECONFIG.lstrip("/")
    path.parent.mkdir(parents=True)
    path.write_text("apiVersion: v1\nkind: Config\nclusters: [\n")  # broken YAML
    agent.start()
    wait_until(
        "the error in the status file", lambda: agent.status()["sections"]["podPulls"]["state"] == "error", 30
    )
    section = agent.status()["sections"]["podPulls"]
    assert section["error"] == f"{path}: not valid YAML (line 4)"
    lines = [x for x in agent.log_lines() if x.get("msg") == "pod pulls: kubeconfig not usable"]
    assert len(lines) == 1 and lines[0]["level"] == "error" and str(path) in lines[0]["error"]
    assert proxy_pulls(agent.proxy_endpoint, img.reference) == img.image_id
    assert agent.get("/healthz")[0] == 200
    # `nodeagent status` reports it as a problem (exit 1), with the message
    st = subprocess.run(
        [sys.executable, "-m", "nodeagent", "status", "--root", str(agent.root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert st.returncode == 1 and f"podPulls: {path}: not valid YAML (line 4)" in st.stdout
    # a fixed file is picked up without a restart: the next problem is the cluster not answering
    path.write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: not-a-real-token}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
    )
    wait_until(
        "the API server reported down",
        lambda: agent.status()["sections"]["podPulls"]["apiServerOk"] is False,
        60,
    )
    assert "not-a-real-token" not in agent.log_path.read_text()
    assert proxy_pulls(agent.proxy_endpoint, img.reference) == img.image_id


def test_missing_kubeconfig_is_waited_for_without_degrading(sandbox: Sandbox, containerd: Containerd) -> None:
    agent = sandbox.nodeagent(containerd, config={"podPulls": {"kubeconfig": KUBECONFIG}})
    wait_until("pod pulls waiting", lambda: agent.status()["sections"]["podPulls"]["state"] == "waiting", 30)
    section = agent.status()["sections"]["podPulls"]
    assert section["error"] == "" and section["waiting"].endswith("not found")
    st = subprocess.run(
        [sys.executable, "-m", "nodeagent", "status", "--root", str(agent.root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert st.returncode == 0, st.stdout
    assert "podPulls" in st.stdout and "waiting; node ?" in st.stdout


def test_prefetch_through_the_proxy_shares_the_daemons_pull_limit_the_kubelet_does_not_wait(
    sandbox: Sandbox, containerd: Containerd
) -> None:
    """``podPulls.concurrency`` is the daemon's one limit on the pulls nodeagent starts itself: here 1,
    so the real prefetcher's two pulls through the proxy (origin prefetch, its own concurrency 2) run
    one after the other, while a kubelet pull made meanwhile goes upstream at once."""
    from nodeagent.config.model import PrefetchImage
    from nodeagent.images.prefetch import Prefetcher

    reg = sandbox.registry()
    slow = sandbox.throttle_proxy(reg, 4 << 20)  # ~1 s per image
    containerd.write_hosts_toml(slow.address, slow.url)
    refs = [
        sandbox.image(reg, f"limit/{n}", "v1", layers=1, layer_size=4 << 20).reference.replace(
            reg.host, slow.address, 1
        )
        for n in ("pre-a", "pre-b", "kubelet")
    ]
    agent = sandbox.nodeagent(containerd, config={"podPulls": {"kubeconfig": KUBECONFIG, "concurrency": 1}})

    async def body() -> None:
        async with CriClient(agent.proxy_endpoint, pull_timeout=120.0) as cri:
            prefetch = Prefetcher(cri, [PrefetchImage(r) for r in refs[:2]], concurrency=2)
            task = asyncio.ensure_future(prefetch.run())
            await asyncio.sleep(0.3)  # the first prefetch pull holds the slot, the second waits
            await cri.pull_image(refs[2])  # the kubelet (no origin metadata)
            report = await task
            assert [o.result for o in report.outcomes] == ["pulled", "pulled"]

    asyncio.run(body())

    def records() -> list[dict[str, Any]]:
        return [r for r in agent.status()["pulls"]["recent"] if r["image"] in refs]

    def end(r: dict[str, Any]) -> float:
        return float(r["started_at"] + r["duration"])

    wait_until("the three pull records", lambda: len(records()) == 3, 30)
    recs = {r["image"]: r for r in records()}
    pre = sorted((recs[r] for r in refs[:2]), key=lambda r: float(r["started_at"]))
    assert [r["origin"] for r in pre] == ["prefetch", "prefetch"]
    # the second prefetch pull is recorded from when it got the slot: after the first one ended
    assert pre[1]["started_at"] >= end(pre[0]) - 0.05, pre
    kubelet = recs[refs[2]]
    assert kubelet["origin"] == "kubelet"
    # the kubelet's pull went upstream while the first prefetch pull held the only slot
    assert kubelet["started_at"] < end(pre[0]), (kubelet, pre)
