"""SOCI parallel pull benchmark: stock containerd 2.x vs the SOCI snapshotter's parallel pull and unpack
as ``nodeagent apply`` sizes it on this node, in the same run, from a registry capped per connection
and in total (the sandbox's throttling TCP proxy in front of a real docker-registry).

Two images: one with a single incompressible layer of 256 MiB, one with 8 x 32 MiB. Each side is a
fresh node (test_soci's SociNode: containerd 2.2 from testbins, soci-snapshotter-grpc v0.16.1 started
from the config apply wrote) pulling through CRI.

Target: SOCI's pull of each image <= 1.2x the total-link limit (size / total cap); stock is bounded by
the per-connection cap for the single layer (its time >= size / per-connection cap). Also reported:
peak RSS of soci-snapshotter-grpc during the pulls and the unpacked size on disk.

Run: ``python -m bench soci`` (root; scripts/setup.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from pathlib import Path

import psutil

from bench import results
from tests.integration.test_apply_pullpath import PullNode, built
from tests.integration.test_soci import SociNode
from tests.sandbox import Sandbox
from tests.sandbox.containerd import EKS_LINE

TARGET = 1.2  # SOCI time / (size / total cap)
MiB = 1 << 20


class RssPeak:
    """Peak RSS of a process, sampled every 20 ms (psutil)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._t.join(timeout=5)
        return self.peak


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (st_blocks, as du counts)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # gone meanwhile
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def ranged_fetch_seconds(host: str, repository: str, digest: str, size: int, connections: int) -> float:
    """Time to GET one blob through ``host`` as ``connections`` parallel 16 MiB range requests into
    nothing: what the throttled link really delivers here (the proxy is Python on a shared machine),
    with no unpack and no disk."""
    import http.client
    import queue

    ranges: queue.Queue[tuple[int, int]] = queue.Queue()
    for start in range(0, size, 16 * MiB):
        ranges.put((start, min(size, start + 16 * MiB) - 1))

    def worker() -> None:
        conn = http.client.HTTPConnection(host, timeout=120)
        while True:
            try:
                a, b = ranges.get_nowait()
            except queue.Empty:
                break
            conn.request("GET", f"/v2/{repository}/blobs/{digest}", headers={"Range": f"bytes={a}-{b}"})
            resp = conn.getresponse()
            while resp.read(1 << 20):
                pass
        conn.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-connection", type=int, default=16, help="MB/s per connection")
    ap.add_argument("--total", type=int, default=96, help="MB/s over all connections")
    args = ap.parse_args(argv)
    per_conn, total = args.per_connection * 1_000_000, args.total * 1_000_000
    shapes = {"1x256MiB": (1, 256 * MiB), "8x32MiB": (8, 32 * MiB)}

    times: dict[str, dict[str, float]] = {"stock": {}, "soci": {}}
    extra: dict[str, object] = {}
    with Sandbox(prefix="na-bench-", containerd_line=EKS_LINE) as sb:
        reg = sb.registry()
        proxy = sb.throttle_proxy(reg, per_conn, total_rate=total)
        t0 = time.monotonic()
        pushed = {name: sb.image(reg, layers=n, layer_size=size) for name, (n, size) in shapes.items()}
        print(f"images built and pushed in {time.monotonic() - t0:.0f}s", flush=True)
        refs = {name: p.reference.replace(reg.host, proxy.address, 1) for name, p in pushed.items()}
        containerd = built("containerd")
        big = pushed["1x256MiB"]
        layer = big.image.layers[0]
        raw = ranged_fetch_seconds(proxy.address, big.repository, layer.digest, len(layer.data), 10)
        extra["link_calibration_s"] = raw
        print(f"calibration: the 256 MiB blob over 10 ranged connections, no unpack: {raw:.2f}s", flush=True)

        stock = PullNode(sb, containerd)
        stock.plain_http(proxy.address)
        stock.start()
        for name, ref in refs.items():
            t = time.monotonic()
            stock.pull(ref)
            times["stock"][name] = time.monotonic() - t
            print(f"stock containerd {EKS_LINE.name}: {name}: {times['stock'][name]:.2f}s", flush=True)
        stock.stop()

        soci = SociNode(sb, containerd)
        soci.plain_http(proxy.address)
        soci.write_soci_config()
        soci.start()
        r = soci.apply("--flavor", "generic")
        if r.returncode != 0:
            raise SystemExit(f"bench_soci: apply failed:\n{r.stdout}\n{r.stderr}")
        sizing = [ln for ln in r.stdout.splitlines() if ln.startswith("tuning: containerd.soci.")]
        print("\n".join(sizing), flush=True)
        pid = int(soci.soci_pidfile.read_text())
        rss = RssPeak(pid)
        for name, ref in refs.items():
            t = time.monotonic()
            soci.pull(ref)
            times["soci"][name] = time.monotonic() - t
            print(f"SOCI parallel: {name}: {times['soci'][name]:.2f}s", flush=True)
        extra["soci_peak_rss_bytes"] = rss.stop()
        extra["soci_unpacked_bytes_on_disk"] = disk_usage(soci.soci_root / "snapshotter/snapshots")
        extra["soci_root_bytes_on_disk"] = disk_usage(soci.soci_root)
        extra["sizing"] = sizing
        soci.stop()
        soci.stop_soci()

    ok = True
    rows = []
    for name, (n, size) in shapes.items():
        link = n * size / total
        conn = size / per_conn  # one connection per layer: the per-layer floor
        ratio = times["soci"][name] / link
        good = ratio <= TARGET
        ok = ok and good
        rows.append(
            {
                "image": name,
                "bytes": n * size,
                "link_limit_s": link,
                "per_connection_floor_s": conn,
                "stock_s": times["stock"][name],
                "soci_s": times["soci"][name],
                "soci_vs_link": ratio,
            }
        )
        print(
            f"{name}: link limit {link:.2f}s, per-connection floor per layer {conn:.2f}s; stock "
            f"{times['stock'][name]:.2f}s, SOCI {times['soci'][name]:.2f}s = {ratio:.2f}x the link limit "
            f"(target <= {TARGET}x): {'ok' if good else 'MISSED'}"
        )
    single = shapes["1x256MiB"][1] / per_conn
    stock_bounded = times["stock"]["1x256MiB"] >= 0.95 * single
    print(f"stock single layer bounded by the per-connection cap (>= {single:.1f}s): {stock_bounded}")
    link = shapes["1x256MiB"][1] / total
    cal = float(str(extra["link_calibration_s"]))
    print(
        f"the throttled link itself: 256 MiB in {cal:.2f}s over 10 connections = {cal / link:.2f}x the "
        f"nominal link limit; SOCI single layer = {times['soci']['1x256MiB'] / cal:.2f}x that"
    )
    rss, unpacked, root = (
        int(str(extra[k])) / MiB
        for k in ("soci_peak_rss_bytes", "soci_unpacked_bytes_on_disk", "soci_root_bytes_on_disk")
    )
    print(
        f"soci-snapshotter-grpc peak RSS {rss:.0f} MiB; unpacked on disk {unpacked:.0f} MiB "
        f"(SOCI root {root:.0f} MiB)"
    )
    results.write(
        "soci",
        {"per_connection_bps": per_conn, "total_bps": total, "rows": rows, **extra},
    )
    return 0 if ok and stock_bounded else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
