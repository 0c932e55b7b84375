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
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from nodeagent.cri.client import CriClient
from nodeagent.eviction import usage
from nodeagent.paths import Paths
from tests.integration.test_apply_pullpath import PullNode, built
from tests.integration.test_proxy import value, wait_for_pull_lines
from tests.sandbox import PushedImage, Registry, Sandbox

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
