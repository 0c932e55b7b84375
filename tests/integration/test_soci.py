"""``containerd.snapshotter: soci`` judged by the real programs: containerd (2.x from testbins,
Debian's 1.6) and soci-snapshotter-grpc v0.16.1 built from its Go module (tests/sandbox/testbins.py).

What users rely on, on containerd 2.x: after ``apply --flavor generic`` on a stock containerd
config, soci-snapshotter-grpc (restarted by ``containerd.soci.restartCommand``) starts with the
config apply wrote and its own ``config dump`` shows the sized parallel-pull values; containerd
(restarted by ``containerd.restartCommand``) starts, its ``config dump`` has the SOCI proxy plugin
and CRI snapshotter, the plugin is loaded, a CRI pull through nodeagent's proxy is prepared by SOCI's
parallel pull/unpack (and recorded in the per-pull metrics), and ImageFsInfo names SOCI's directory
(what eviction measures). On
containerd 1.6, lazy loading is refused with nothing written.

The rest of nodeagent on a SOCI node (tests/sandbox/soci.py: soci-snapshotter-grpc as the
containerd's CRI snapshotter, started before it): eviction on a small SOCI filesystem keeps it under
the high threshold and keeps in-use, baked and protected images; ``prefetch --bake`` pins survive a
restart of both daemons; and lazy loading: a container of an image with a SOCI index (manifest v2,
built with the ``soci`` CLI) starts before its layer's bytes are fetched.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from nodeagent.cri.client import CriClient
from nodeagent.eviction import baked, policy, usage
from nodeagent.eviction.baked import BakedImage
from nodeagent.eviction.baked import write as write_baked
from nodeagent.util.paths import Paths
from tests.integration.test_apply_pullpath import PullNode, built
from tests.integration.test_proxy import value, wait_for_pull_lines
from tests.sandbox import Containerd, PushedImage, Registry, Sandbox
from tests.sandbox.oci import write_oci_layout
from tests.sandbox.pods import Pod, container_status, remove_pod, run_container, run_pod
from tests.sandbox.soci import SociSnapshotter

RESTART_SOCI = Path(__file__).with_name("restart_soci.py")


class SociNode(PullNode):
    """test_apply's node tree T with ``T/usr/local/bin/soci-snapshotter-grpc`` (apply checks it is
    installed) and the soci-snapshotter-grpc it starts from T's config file."""

    def __init__(self, sandbox: Sandbox, containerd: Path) -> None:
        super().__init__(sandbox, containerd)
        self.soci_bin = built("soci-snapshotter")
        (self.root / "usr/local/bin").mkdir(parents=True)
        (self.root / "usr/local/bin/soci-snapshotter-grpc").symlink_to(self.soci_bin)
        self.soci_sock = self.work / "soci.sock"
        self.soci_root = self.work / "soci-root"
        self.soci_pidfile = self.work / "soci.pid"
        self.soci_log = self.work / "soci.log"
        self.soci_config = self.root / "etc/soci-snapshotter-grpc/config.toml"
        sandbox.callback(self.stop_soci)

    def soci_argv(self) -> list[str]:
        return [
            str(self.soci_bin),
            *("--address", str(self.soci_sock), "--root", str(self.soci_root)),
            *("--config", str(self.soci_config), "--log-level", "debug"),
        ]

    def soci_restart_command(self) -> list[str]:
        return [
            *(
                sys.executable,
                str(RESTART_SOCI),
                str(self.soci_pidfile),
                str(self.soci_log),
                str(self.soci_sock),
            ),
            "--",
            *self.soci_argv(),
        ]

    def write_soci_config(self, **soci: object) -> None:
        self.write_config(
            {
                "restartCommand": self.restart_command(),
                "snapshotter": "soci",
                "soci": {
                    "address": str(self.soci_sock),
                    "root": str(self.soci_root),
                    "restartCommand": self.soci_restart_command(),
                    **soci,
                },
            }
        )

    def stop_soci(self) -> None:
        from tests.integration.restart_containerd import stop

        stop(self.soci_pidfile)


def _containerd_dump(node: SociNode) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(
        [str(node.binary), "--config", str(node.config_toml), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return tomllib.loads(out)


def test_apply_soci_parallel_on_containerd_2(
    sandbox: Sandbox, registry: Registry, image_factory: Callable[..., PushedImage]
) -> None:
    line = sandbox.containerd_line
    assert line is not None
    if line.major < 2:  # containerd 1.6: SOCI lazy loading needs 1.7.16+, refused before anything is written
        node = SociNode(sandbox, Path(line.binary()))
        node.write_soci_config(pullMode="lazy")
        before = {p: p.read_bytes() for p in node.root.rglob("*") if p.is_file()}
        r = node.apply("--flavor", "generic")
        assert r.returncode == 1, r.stdout
        assert "pullMode lazy needs containerd 1.7.16 or newer, this node has 1.6." in r.stdout + r.stderr
        after = {p: p.read_bytes() for p in node.root.rglob("*") if p.is_file()}
        after.pop(node.root / "var/lib/nodeagent/apply-report.json", None)
        assert after == before
        return

    node = SociNode(sandbox, Path(line.binary()))
    node.plain_http(registry.host)
    node.write_soci_config()
    node.start()
    r = node.apply("--flavor", "generic")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"soci-snapshotter restarted and serving on {node.soci_sock}" in out, out
    assert "containerd: restarted, CRI answers" in out, out
    # each sized value printed with its reason
    for key in (
        "maxConcurrentDownloadsPerImage",
        "maxConcurrentDownloads",
        "chunkSizeMiB",
        "maxConcurrentUnpacks",
    ):
        assert f"containerd.soci.{key} = " in out and "(auto: " in out, out

    # soci-snapshotter-grpc's own view of the file apply wrote
    dump = subprocess.run(
        [*node.soci_argv(), "config", "dump"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    par = tomllib.loads(dump)["pull_modes"]["parallel_pull_unpack"]
    written = tomllib.loads(node.soci_config.read_text())["pull_modes"]["parallel_pull_unpack"]
    assert par["enable"] is True
    for k, v in written.items():
        assert par[k] == v, (k, par[k], v)

    # containerd's own view: the proxy plugin, and CRI pulling with it
    c = _containerd_dump(node)
    assert c["proxy_plugins"]["soci"]["type"] == "snapshot"
    assert c["proxy_plugins"]["soci"]["address"] == str(node.soci_sock)
    images = c["plugins"]["io.containerd.cri.v1.images"]
    assert images["snapshotter"] == "soci" and images["disable_snapshot_annotations"] is False
    ctr = built("containerd").with_name("ctr") if line.name == "2.2" else Path(line.binary()).with_name("ctr")
    plugins = subprocess.run(
        [str(ctr), "--address", str(node.sock), "plugins", "ls"], capture_output=True, text=True, timeout=30
    ).stdout
    soci_rows = [ln.split() for ln in plugins.splitlines() if " soci " in f" {ln} "]
    assert soci_rows and soci_rows[0][-1] == "ok", plugins

    # a CRI pull through nodeagent's proxy (chained to containerd exactly as before) is unpacked by
    # SOCI into its root, and recorded per pull
    agent = sandbox.nodeagent(node.endpoint)
    img = image_factory(layers=3, layer_size=1 << 20, repository=f"soci/{line.name}")
    ref = f"{registry.host}/{img.repository}:{img.tag}"

    async def pull_via_proxy() -> str:
        async with CriClient(agent.proxy_endpoint) as cri:
            return await cri.pull_image(ref, timeout=60)

    assert asyncio.run(pull_via_proxy()) == img.image_id
    (record,) = wait_for_pull_lines(agent, 1)
    assert record.get("result") == "success", record
    pulls = value(
        agent.scrape(),
        "nodeagent_image_pulls_total",
        registry=registry.host,
        result="success",
        origin="kubelet",
    )
    assert pulls == 1
    snaps = node.soci_root / "snapshotter/snapshots"
    assert snaps.is_dir() and len(list(snaps.iterdir())) >= 3, node.soci_log.read_text()[-3000:]

    # eviction measures the filesystem CRI ImageFsInfo names: with SOCI, containerd reports the proxy
    # plugin's exports.root (SOCI's snapshot directory), not its own overlayfs root
    async def fs_info() -> str:
        async with CriClient(node.endpoint) as cri:
            return usage.mountpoint_from_imagefs_info(await cri.image_fs_info())

    mountpoint = asyncio.run(fs_info())
    assert mountpoint.rstrip("/") == str(node.soci_root), mountpoint
    assert usage.imagefs_path(Paths(node.root), "", mountpoint) == node.soci_root
    log = node.soci_log.read_text()
    assert log.count("preparing snapshot with parallel pull/unpack") == 3, log[-3000:]  # one per layer


# --- the rest of nodeagent on a SOCI node (containerd 2.x + soci-snapshotter-grpc, parallel mode) ---
def _soci_pod_node(
    sandbox: Sandbox, registry: Registry, pause: PushedImage, **soci: Any
) -> tuple[Containerd, SociSnapshotter]:
    """A pod-capable containerd whose CRI snapshotter is SOCI (parallel pull and unpack)."""
    built("soci-snapshotter")  # built first when missing
    snap = sandbox.soci_snapshotter(
        parallel={"max_concurrent_downloads_per_image": 4, "concurrent_download_chunk_size": "1mb"},
        **soci,
    )
    node = sandbox.containerd([registry], pods=True, sandbox_image=pause.reference, snapshotter=snap)
    return node, snap


def _soci_prepared(snap: SociSnapshotter) -> int:
    return snap.log_text().count("preparing snapshot with parallel pull/unpack")


def test_eviction_on_a_small_soci_imagefs_keeps_in_use_baked_and_protected_images(
    sandbox: Sandbox, registry: Registry, pause_image: PushedImage
) -> None:
    """SOCI's directory on a 200 MB filesystem, containerd's own root elsewhere: with the node's
    ``containerd.snapshotter: soci`` (no eviction.imagefsPath) eviction must measure SOCI's
    filesystem, keep it under the high threshold by removing unused images, and never remove the
    in-use, baked or protected ones. On containerd 2.x CRI ImageFsInfo names the same directory;
    containerd 1.6 names ``<its root>/io.containerd.snapshotter.v1.soci`` instead (a directory SOCI
    never writes to), so measuring what the runtime reports would miss the disk filling up."""
    from tests.integration.eviction_churn import push_churn_images, total_bytes, used_bytes

    fs = sandbox.loopfs(200)
    node, snap = _soci_pod_node(sandbox, registry, pause_image, root_dir=fs.mountpoint / "soci")
    assert fs.mountpoint not in node.root.parents  # containerd's content store is not on the small disk
    mib15 = 15 << 20
    in_use = sandbox.image(registry, "soci-keep/in-use", layers=1, layer_size=mib15, busybox=True)
    baked_img = sandbox.image(registry, "soci-keep/baked", layers=1, layer_size=mib15)
    protected = sandbox.image(registry, "soci-keep/protected", layers=1, layer_size=mib15)
    churn = push_churn_images(sandbox, registry, count=6)  # 20 MiB each: 120 MiB, above the high threshold
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
            "images": {"protect": [f"{registry.host}/soci-keep/prot*"]},
            "containerd": {"snapshotter": "soci", "soci": {"root": "/soci"}},
        },
    )
    agent.root.mkdir(parents=True)
    (agent.root / "soci").symlink_to(snap.root)  # the agent's --root is a private tree: / there
    write_baked(
        Paths(agent.root).baked_manifest,
        [BakedImage(baked_img.reference, baked_img.manifest_digest, 0, True)],
    )
    agent.start()
    peak = 0.0

    async def body() -> tuple[list[str], list[str], Pod, str]:
        nonlocal peak
        async with CriClient(agent.proxy_endpoint) as via_agent, CriClient(node.endpoint) as direct:
            for img in (baked_img, protected, in_use):
                await via_agent.pull_image(img.reference)
            pod = await run_pod(direct, "soci-keep", log_dir=sandbox.dir / "logs")
            cid = await run_container(
                direct, pod, in_use.reference, "app", ["/bin/busybox", "sleep", "600"], pull=False
            )
            full = used_bytes(fs.mountpoint) / total_bytes(fs.mountpoint)
            print(f"\nprotected set in place: {full:.1%} used")
            for img in churn:
                await via_agent.pull_image(img.reference)
                for _ in range(100):  # the eviction the pull triggered
                    if used_bytes(fs.mountpoint) < 0.6 * total_bytes(fs.mountpoint):
                        break
                    await asyncio.sleep(0.1)
                ratio = used_bytes(fs.mountpoint) / total_bytes(fs.mountpoint)
                peak = max(peak, ratio)
                print(f"pulled {img.repository}; after eviction: {ratio:.1%} used")
            tags = sorted(t for i in await direct.list_images() for t in i.repo_tags)
            running = [c.id for c in await direct.list_containers() if c.state == 1]
            return tags, running, pod, cid

    tags, running, pod, cid = asyncio.run(body())
    # every image was unpacked by SOCI onto the small filesystem (pause, 3 kept, 6 churn: one layer each)
    assert _soci_prepared(snap) >= 10, snap.log_text()[-3000:]
    status = agent.status()["sections"]["eviction"]
    # eviction measured SOCI's directory, i.e. the 200 MB filesystem
    assert status["imagefsPath"] == str(agent.root / "soci"), status
    assert status["totalBytes"] == total_bytes(fs.mountpoint), status

    async def fs_info() -> str:
        async with CriClient(node.endpoint) as cri:
            return usage.mountpoint_from_imagefs_info(await cri.image_fs_info())

    reported = asyncio.run(fs_info())
    if node.line.major >= 2:  # the runtime agrees
        assert reported == str(snap.root), reported
    else:  # containerd 1.6 (before 1.7.16): its own root's soci directory, not SOCI's
        assert reported == str(node.root / "io.containerd.snapshotter.v1.soci"), reported
    for img in (in_use, baked_img, protected, pause_image):
        assert img.reference in tags, img.reference
    assert cid in running
    lines = agent.log_lines()
    evicted = {e["image"] for e in lines if e.get("msg") == "image evicted"}
    assert evicted and all(e.startswith(f"{registry.host}/churn/") for e in evicted), evicted
    assert peak < 0.6, peak  # every pull's eviction brought SOCI's filesystem back under the high threshold
    kept = status["lastPlan"]["kept"]
    assert kept["in_use"] >= 2 and kept["baked"] == 1 and kept["protected"] == 1, kept
    # removed images' snapshots are gone from SOCI's directory (containerd's GC reaches the proxy snapshotter)
    assert len(list(snap.snapshots_dir.iterdir())) < _soci_prepared(snap)

    async def cleanup() -> None:
        async with CriClient(node.endpoint) as cri:
            await remove_pod(cri, pod)

    asyncio.run(cleanup())
    assert agent.stop() == 0


def test_bake_pins_survive_on_soci(
    sandbox: Sandbox, registry: Registry, pause_image: PushedImage, tmp_path: Path
) -> None:
    """``prefetch --bake`` on a SOCI node: the images are unpacked by SOCI (what the nodes will use,
    so no snapshotter warning), pinned in containerd, and still pinned, listed and runnable after
    containerd and soci-snapshotter-grpc restart; eviction keeps them and removes an unbaked one."""
    from tests.integration.test_bake import _cri_images, _plan, ctr_images, run_prefetch_one
    from tests.integration.test_prefetch import run_prefetch, write_node_root

    node, snap = _soci_pod_node(sandbox, registry, pause_image)
    pinned = sandbox.image(registry, "soci-bake/pinned", layers=2, layer_size=1 << 20, busybox=True)
    unpinned = sandbox.image(registry, "soci-bake/unpinned", layers=1, layer_size=1 << 20)
    extra = sandbox.image(registry, "soci-bake/extra", layers=1, layer_size=1 << 20)
    root = tmp_path / "root"
    write_node_root(
        root,
        node,
        [{"image": pinned.reference, "pin": True, "required": True}, {"image": unpinned.reference}],
    )
    cfg = yaml.safe_load((root / "etc/nodeagent/config.yaml").read_text())
    cfg["containerd"] = {"snapshotter": "soci"}
    (root / "etc/nodeagent/config.yaml").write_text(yaml.safe_dump(cfg))
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(node.config_path.read_text())  # CRI uses soci
    before = _soci_prepared(snap)
    r = run_prefetch(root, "--bake")
    assert r.returncode == 0, r.stdout + r.stderr
    # pinned: the image asked for and the sandbox image containerd's config names (added by bake)
    assert "(2 pinned)" in r.stdout, r.stdout
    assert "snapshotter" not in r.stderr, r.stderr  # baked with the snapshotter the nodes use
    # unpacked by SOCI: busybox (shared by pause and the pinned image), 2 + 1 random layers
    assert _soci_prepared(snap) - before >= 4, snap.log_text()[-3000:]
    label = "io.cri-containerd.pinned=pinned"
    manifest = baked.load(root / "etc/nodeagent/baked-images.json")

    def check_pins() -> None:
        rows = ctr_images(str(node.socket))
        assert label in rows[pinned.reference] and label in rows[pinned.image_id], rows
        assert label not in rows[unpinned.reference]
        _, by_tag = asyncio.run(_cri_images(node.endpoint))
        # CRI's Image.pinned (what the kubelet's GC reads) comes from that label from containerd 1.7 on
        # (test_bake.py); 1.6 never sets it, and eviction keeps the image by the manifest anyway
        assert (by_tag[pinned.reference], by_tag[unpinned.reference]) == (node.line.major >= 2, False), by_tag

    check_pins()
    # a node boot: containerd and the snapshotter start again on the same directories
    node.stop()
    node.start()
    check_pins()

    # the baked image still runs from SOCI's snapshots (no pull), and eviction keeps both baked images
    async def run_it() -> None:
        async with CriClient(node.endpoint) as cri:
            pod = await run_pod(cri, "soci-bake", log_dir=sandbox.dir / "logs")
            await run_container(cri, pod, pinned.reference, "app", ["/bin/busybox", "true"], pull=False)
            await remove_pod(cri, pod)

    asyncio.run(run_it())
    pull = run_prefetch_one(tmp_path, node, extra.reference)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    p = asyncio.run(_plan(node.endpoint, manifest))
    verdicts = {d.image.repo_tags[0]: (d.verdict, d.reason) for d in p.decisions}
    assert verdicts[extra.reference] == (policy.REMOVE, policy.LRU)
    assert verdicts[unpinned.reference] == (policy.KEEP, policy.BAKED)
    assert verdicts[pinned.reference][0] == policy.KEEP


# --- lazy loading: a SOCI index (manifest v2, built with the soci CLI), FUSE, a container started early ---
LAZY_LAYER = 64 << 20


def soci_convert_and_push(sandbox: Sandbox, registry: Registry, repository: str) -> tuple[PushedImage, str]:
    """An image (busybox + one 64 MiB random layer, OCI media types) pushed as ``repository:v1``, and
    its SOCI-enabled version (``soci convert --standalone``: the image plus a SOCI index manifest v2 in
    one image index, no referrers API needed) pushed as ``repository:soci`` with skopeo. Returns the
    plain image and the SOCI-enabled reference."""
    img = sandbox.image(registry, repository, layers=1, layer_size=LAZY_LAYER, busybox=True, media="oci")
    src = write_oci_layout(img.image, sandbox.dir / "lazy-src")
    dst = sandbox.dir / "lazy-soci"
    soci_cli = built("soci-snapshotter").with_name("soci")
    conv = subprocess.run(
        [
            *(str(soci_cli), "convert", "--standalone", "--format", "oci-dir"),
            *("--min-layer-size", str(4 << 20), str(src), str(dst)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert conv.returncode == 0, conv.stdout + conv.stderr
    ref = f"{registry.host}/{repository}:soci"
    push = subprocess.run(
        ["skopeo", "copy", "--all", "--dest-tls-verify=false", f"oci:{dst}", f"docker://{ref}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert push.returncode == 0, push.stdout + push.stderr
    return img, ref


def _bytes_served(registry: Registry, digest: str, since: int) -> int:
    return sum(r.size for r in registry.requests_since(since) if r.is_blob and r.digest == digest)


def test_lazy_soci_starts_a_container_before_its_bytes_are_fetched(
    sandbox: Sandbox, registry: Registry, pause_image: PushedImage
) -> None:
    line = sandbox.containerd_line
    assert line is not None
    img, ref = soci_convert_and_push(sandbox, registry, f"soci-lazy/{line.name}")
    big = img.image.layers[-1]
    snap = sandbox.soci_snapshotter(mode="lazy")
    node = sandbox.containerd([registry], pods=True, sandbox_image=pause_image.reference, snapshotter=snap)
    mark = registry.mark()

    async def body() -> tuple[int, int, int, str]:
        async with CriClient(node.endpoint) as cri:
            pod = await run_pod(cri, "soci-lazy", log_dir=sandbox.dir / "logs")
            await cri.pull_image(ref, sandbox_config=pod.config)
            await run_container(cri, pod, ref, "sleeper", ["/bin/busybox", "sleep", "600"], pull=False)
            running = [c for c in await cri.list_containers() if c.state == 1]
            at_start = _bytes_served(registry, big.digest, mark)
            # a second container reads the whole file: SOCI fetches its bytes on demand through FUSE
            cid = await run_container(
                cri, pod, ref, "reader", ["/bin/busybox", "md5sum", "/data/blob-0.bin"], pull=False
            )
            for _ in range(600):
                st = await container_status(cri, cid)
                if st.status.state == 2:  # EXITED
                    break
                await asyncio.sleep(0.1)
            after = _bytes_served(registry, big.digest, mark)
            log = (sandbox.dir / "logs" / "reader.log").read_text()
            code = st.status.exit_code
            await remove_pod(cri, pod)
            return len(running), at_start, after, log + f"\nexit {code}"

    running, at_start, after, log = asyncio.run(body())
    print(
        f"\n{big.size / 2**20:.1f} MiB layer: {at_start} bytes fetched when the container ran, "
        f"{after} after reading it"
    )
    assert running == 1, running  # the sleeper (ListContainers does not list the pod sandbox)
    assert at_start < big.size // 4, (at_start, big.size)  # started with most of the layer not fetched
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(big.data))) as t:
        member = t.extractfile("data/blob-0.bin")
        assert member is not None
        want = hashlib.md5(member.read()).hexdigest()
    assert want in log and log.endswith("exit 0"), log
    assert after >= big.size * 0.9, (after, big.size)
    # the big layer was mounted as a remote (FUSE) snapshot
    log_text = snap.log_text()
    assert log_text.count("remote snapshot successfully prepared") == 1, log_text[-3000:]
