"""Eviction against a real containerd (Debian's 1.6) with real pods: see tests/conftest.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nodeagent.cri.client import CriClient
from nodeagent.eviction.baked import BakedImage
from nodeagent.eviction.baked import write as write_baked
from nodeagent.images.lastused import LastUsed
from nodeagent.util.paths import Paths
from tests.sandbox import Containerd, PushedImage, Registry, Sandbox
from tests.sandbox.pods import remove_pod, run_container, run_pod

HEAD = "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\n"
REPO = Path(__file__).resolve().parents[2]


def nodeagent(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "nodeagent", *argv], capture_output=True, text=True, timeout=timeout, env=env
    )


def table_rows(out: str) -> dict[str, dict[str, str]]:
    """IMAGE -> {column: cell} from the dry-run table (columns sliced at the header's positions)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#  "))
    header = lines[start]
    names = ["#", "IMAGE", "SIZE", "LAST USED", "DECISION", "REASON", "DETAIL"]
    cols = [header.index(n) for n in names]
    rows = {}
    for line in lines[start + 1 :]:
        cells = {
            n: line[a:b].strip() for n, a, b in zip(names, cols, [*cols[1:], len(line) + 1], strict=True)
        }
        rows[cells["IMAGE"]] = cells
    return rows


def test_evict_dry_run_on_a_real_node(
    sandbox: Sandbox, registry: Registry, pod_node: Containerd, pause_image: PushedImage
) -> None:
    root = sandbox.dir / "root"
    paths = Paths(root)
    in_use, old, newer, protected, baked_img = (
        sandbox.image(registry, f"evict/{name}", layers=1, layer_size=256 << 10, busybox=name == "in-use")
        for name in ("in-use", "old", "newer", "protected", "baked")
    )
    now = time.time()

    async def setup() -> tuple[list[str], object]:
        async with CriClient(pod_node.endpoint) as cri:
            for img in (old, newer, protected, baked_img):
                await cri.pull_image(img.reference)
            pod = await run_pod(cri, "evict-dry-run", log_dir=sandbox.dir / "logs")
            await run_container(cri, pod, in_use.reference, "app", ["/bin/busybox", "sleep", "300"])
            return sorted(i.id for i in await cri.list_images()), pod

    before, pod = asyncio.run(setup())
    paths.config_file.parent.mkdir(parents=True)
    paths.config_file.write_text(
        HEAD + f"cri:\n  endpoint: {pod_node.endpoint}\n"
        "eviction:\n  highThresholdPercent: 1\n  lowThresholdPercent: 0\n  minUnusedAge: 1m\n"
        f"images:\n  protect: ['{registry.host}/evict/prot*']\n"
    )
    write_baked(paths.baked_manifest, [BakedImage(baked_img.reference, baked_img.manifest_digest, 1, True)])
    lu = LastUsed(paths.last_used_file)
    lu.touch(old.reference, now - 7200)
    lu.touch(newer.image_id, now - 3600)
    lu.save()

    r = nodeagent("evict", "--dry-run", "--root", str(root))
    print(r.stdout)
    assert r.returncode == 0, r.stderr
    rows = table_rows(r.stdout)
    assert [rows[old.reference][k] for k in ("#", "DECISION", "REASON")] == ["1", "remove", "lru"]
    assert [rows[newer.reference][k] for k in ("#", "DECISION", "REASON")] == ["2", "remove", "lru"]
    assert rows[newer.reference]["LAST USED"] == "1h00m ago"
    assert rows[old.reference]["LAST USED"] == "2h00m ago"
    assert (rows[in_use.reference]["REASON"], rows[in_use.reference]["DETAIL"][:10]) == (
        "in_use",
        "container ",
    )
    assert rows[in_use.reference]["DETAIL"].endswith("(running)")
    assert (rows[pause_image.reference]["REASON"], rows[pause_image.reference]["DETAIL"][:8]) == (
        "in_use",
        "sandbox ",
    )
    assert rows[protected.reference]["REASON"] == "protected"
    assert rows[protected.reference]["DETAIL"] == f"{registry.host}/evict/prot*"
    assert rows[baked_img.reference]["REASON"] == "baked"
    assert {r["DECISION"] for r in rows.values()} == {"keep", "remove"}

    async def after() -> list[str]:
        async with CriClient(pod_node.endpoint) as cri:
            ids = sorted(i.id for i in await cri.list_images())
            await remove_pod(cri, pod)  # type: ignore[arg-type]
            return ids

    assert asyncio.run(after()) == before  # a dry run removes nothing


# --- churn: a small image filesystem, 30 distinct 20 MiB images pulled one after the other --------
def test_churn_pulls_succeed_with_the_agent_and_fail_with_enospc_without(
    sandbox: Sandbox, registry: Registry
) -> None:
    from tests.integration.eviction_churn import push_churn_images, run_with_agent, run_without_agent

    images = push_churn_images(sandbox, registry, count=30)
    without = run_without_agent(sandbox, registry, images)
    print("\n" + without.report())
    with_agent, agent = run_with_agent(sandbox, registry, images)
    print(with_agent.report())

    # without the agent the disk fills up and pulls fail for space
    assert without.failures, "expected ENOSPC failures without the agent"
    assert all("no space left on device" in p.error for p in without.failures)
    # with it every pull succeeds, and it got there by evicting
    assert with_agent.failures == []
    assert with_agent.evictions > 0 and with_agent.reliefs
    metrics = agent.scrape()
    assert f'nodeagent_image_evictions_total{{reason="lru"}} {float(with_agent.evictions)}' in metrics
    assert "nodeagent_image_eviction_low_unreachable 0.0" in metrics
    lint = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    status = agent.status()["sections"]["eviction"]
    assert status["recentEvictions"] and status["degraded"] is False
    assert agent.stop() == 0


# --- protected images stay, even when that keeps the disk above the low threshold --------------
def test_in_use_baked_and_protected_images_are_never_removed(sandbox: Sandbox, registry: Registry) -> None:
    from tests.integration.eviction_churn import push_churn_images, total_bytes, used_bytes

    fs = sandbox.loopfs(200)
    pause = sandbox.pause_image(registry)
    node = sandbox.containerd(
        [registry], pods=True, sandbox_image=pause.reference, root_dir=fs.mountpoint / "root"
    )
    # ~31 MiB on disk each: together (with pause) above the low threshold (40%), below high (60%)
    mib15 = 15 << 20
    in_use = sandbox.image(registry, "keep/in-use", layers=1, layer_size=mib15, busybox=True)
    baked_img = sandbox.image(registry, "keep/baked", layers=1, layer_size=mib15)
    protected = sandbox.image(registry, "keep/protected", layers=1, layer_size=mib15)
    churn = push_churn_images(sandbox, registry, count=4)
    agent = sandbox.nodeagent(
        node,
        start=False,
        config={
            "eviction": {
                "highThresholdPercent": 60,
                "lowThresholdPercent": 40,
                "minUnusedAge": "0s",
                "interval": "5s",
            },
            "images": {"protect": [f"{registry.host}/keep/prot*"]},
        },
    )
    write_baked(
        Paths(agent.root).baked_manifest,
        [BakedImage(baked_img.reference, baked_img.manifest_digest, 0, True)],
    )
    agent.start()

    async def body() -> tuple[list[str], list[str], object]:
        async with CriClient(agent.proxy_endpoint) as via_agent, CriClient(node.endpoint) as direct:
            await via_agent.pull_image(baked_img.reference)
            await via_agent.pull_image(protected.reference)
            await via_agent.pull_image(in_use.reference)
            pod = await run_pod(direct, "keep", log_dir=sandbox.dir / "logs")
            cid = await run_container(
                direct, pod, in_use.reference, "app", ["/bin/busybox", "sleep", "600"], pull=False
            )
            used = used_bytes(fs.mountpoint) / total_bytes(fs.mountpoint)
            print(f"\nprotected set in place: {used:.1%} used (low 40%, high 60%)")
            for img in churn:
                await via_agent.pull_image(img.reference)
                for _ in range(100):  # the eviction the pull triggered (well under a second)
                    if used_bytes(fs.mountpoint) < 0.6 * total_bytes(fs.mountpoint):
                        break
                    await asyncio.sleep(0.1)
                ratio = used_bytes(fs.mountpoint) / total_bytes(fs.mountpoint)
                print(f"pulled {img.repository}; after eviction: {ratio:.1%} used")
            await asyncio.sleep(0.5)
            tags = sorted(t for i in await direct.list_images() for t in i.repo_tags)
            running = [c.id for c in await direct.list_containers() if c.state == 1]
            return tags, running, (pod, cid)

    tags, running, (pod, cid) = asyncio.run(body())
    for img in (in_use, baked_img, protected, pause):
        assert img.reference in tags, img.reference
    assert cid in running
    metrics = agent.scrape()
    print("\n".join(line for line in metrics.splitlines() if "evict" in line or "imagefs" in line))
    assert "nodeagent_image_eviction_low_unreachable 1.0" in metrics
    lines = agent.log_lines()
    warn = [e for e in lines if e.get("msg", "").startswith("cannot reach the low threshold")]
    assert warn and warn[0]["level"] == "warning"
    print("log:", json.dumps(warn[0]))
    evicted = {e["image"] for e in lines if e.get("msg") == "image evicted"}
    assert evicted and all(e.startswith(f"{registry.host}/churn/") for e in evicted)
    status = agent.status()["sections"]["eviction"]
    assert status["lowUnreachable"] is True
    assert status["degraded"] is False  # becomes true when it lasts 5 minutes (unit-tested)
    assert status["lastPlan"]["kept"]["in_use"] >= 2 and status["lastPlan"]["kept"]["baked"] == 1
    assert status["lastPlan"]["kept"]["protected"] == 1

    async def cleanup() -> None:
        async with CriClient(node.endpoint) as cri:
            await remove_pod(cri, pod)  # type: ignore[arg-type]

    asyncio.run(cleanup())
    assert agent.stop() == 0


# --- race: a container created between the plan and the removal keeps its image -----------------
def test_container_created_between_plan_and_removal_keeps_its_image(
    sandbox: Sandbox, registry: Registry, pod_node: Containerd, pause_image: PushedImage
) -> None:
    from nodeagent.config.model import Config, CriConfig, EvictionConfig
    from nodeagent.eviction.loop import EvictionLoop
    from nodeagent.run.metrics import Metrics

    root = sandbox.dir / "agent-root"
    imgs = [
        sandbox.image(registry, f"race/img{i}", layers=1, layer_size=256 << 10, busybox=True)
        for i in range(3)
    ]
    # thresholds 1%/0% on the (much fuller) /tmp filesystem: the plan wants every unused image gone
    cfg = Config(
        cri=CriConfig(endpoint=pod_node.endpoint),
        eviction=EvictionConfig(
            high_threshold_percent=1, low_threshold_percent=0, min_unused_age=0, imagefs_path="/"
        ),
    )
    (root).mkdir()
    last_used = LastUsed(Paths(root).last_used_file)
    now = time.time()
    for i, img in enumerate(imgs):
        last_used.touch(img.reference, now - 100 + i)  # img0 is first in line

    async def body() -> tuple[list[str], list[str], list[str], list[str]]:
        loop = EvictionLoop(cfg, Paths(root), Metrics(), last_used)
        async with CriClient(pod_node.endpoint) as cri:
            for img in imgs:
                await cri.pull_image(img.reference)
            pod = await run_pod(cri, "race", log_dir=sandbox.dir / "logs")
            plan = await loop.make_plan()
            planned = [d.image.repo_tags[0] for d in plan.removals]
            # between plan and removal: a pod starts a container from the first image in line
            await run_container(
                cri, pod, imgs[0].reference, "late", ["/bin/busybox", "sleep", "300"], pull=False
            )
            result = await loop.cycle(plan)
            await loop.close()
            kept = [d.image.repo_tags[0] for d in result.kept_now_in_use]
            left = sorted(t for i in await cri.list_images() for t in i.repo_tags)
            await remove_pod(cri, pod)
            return planned, kept, [d.image.repo_tags[0] for d in result.removed], left

    planned, kept, removed, left = asyncio.run(body())
    print(f"\nplanned: {planned}\nkept (in use since the plan): {kept}\nremoved: {removed}\nleft: {left}")
    assert planned == [img.reference for img in imgs]
    assert kept == [imgs[0].reference]
    assert removed == [imgs[1].reference, imgs[2].reference]
    assert left == sorted([imgs[0].reference, pause_image.reference])


# --- restart: the LRU order survives an agent restart --------------------------------------------
def test_lru_order_survives_an_agent_restart(
    sandbox: Sandbox, registry: Registry, containerd: Containerd
) -> None:
    # sizes a > b > c > d: without the state, the tie-break (larger first) would give a, b, c, d
    imgs = {
        name: sandbox.image(registry, f"lru/{name}", layers=1, layer_size=(4 - i) * (128 << 10))
        for i, name in enumerate("abcd")
    }
    # first run: eviction measures an empty 16 MB filesystem, so it never triggers
    empty = sandbox.loopfs(16)
    agent = sandbox.nodeagent(
        containerd,
        start=False,
        config={
            "eviction": {
                "highThresholdPercent": 60,
                "lowThresholdPercent": 40,
                "minUnusedAge": "0s",
                "imagefsPath": "/imagefs",
            }
        },
    )
    agent.root.mkdir(parents=True)
    (agent.root / "imagefs").symlink_to(empty.mountpoint)
    agent.start()

    async def use(order: str) -> None:
        async with CriClient(agent.proxy_endpoint) as cri:
            for name in order:
                await cri.pull_image(imgs[name].reference)
                await asyncio.sleep(0.05)
            for name in "ca":  # the kubelet asking for images marks them used (ImageStatus)
                await cri.image_status(imgs[name].reference)
                await asyncio.sleep(0.05)

    asyncio.run(use("abcd"))  # least recently used now: b, d, c, a
    assert agent.stop() == 0
    state = json.loads((Paths(agent.root).last_used_file).read_text())
    assert state["version"] == 1 and state["lastUsed"]

    # restart with thresholds that make it evict everything unused on the /tmp filesystem
    agent.config["eviction"] = {
        "highThresholdPercent": 1,
        "lowThresholdPercent": 0,
        "minUnusedAge": "0s",
        "imagefsPath": "/",
    }
    agent.start()
    assert agent.status()["sections"]["eviction"]["imagefsPath"] in ("", str(agent.root))
    deadline = time.time() + 20
    evicted: list[str] = []
    while time.time() < deadline and len(evicted) < 4:
        time.sleep(0.1)
        evicted = [e["image"] for e in agent.log_lines() if e.get("msg") == "image evicted"]
    print("\neviction order after the restart:", evicted)
    assert evicted == [imgs[n].reference for n in "bdca"]
    assert agent.stop() == 0
