"""SOCI parallel pull benchmark: stock containerd 2.x vs the SOCI snapshotter's parallel pull and unpack
as ``nodeagent apply`` sizes it on this node, in the same run, from a registry capped per connection
and in total (the sandbox's throttling TCP proxy in front of a real docker-registry).

Two images: one with a single incompressible layer of 256 MiB, one with 8 x 32 MiB. Each side is a
fresh node (test_soci's SociNode: containerd 2.2 from testbins, soci-snapshotter-grpc v0.16.1 started
from the config apply wrote) pulling through CRI.

Target: SOCI's pull of each image <= 1.2x the total-link limit (size / total cap); stock is bounded by
the per-connection cap for the single layer (its time >= size / per-connection cap). Also reported:
peak RSS of soci-snapshotter-grpc during the pulls and the unpacked size on disk, and where SOCI's
time goes, from its own debug log: soci-snapshotter-grpc downloads every layer of an image into a
file first ("Artifact successfully fetched from remote", with its latency) and unpacks it after
("Layer successfully unpacked"): the download phase (first request to last layer fetched) and the
unpack tail (last layer fetched to last layer unpacked) are reported separately.

``--variant NAME:key=value,...`` (repeatable) runs SOCI again on a fresh node with those
``containerd.soci`` keys set explicitly (e.g. ``unpack1:maxConcurrentUnpacksPerImage=1``), so other
settings are compared with what ``auto`` chose in the same run. The load average is recorded with
the figures (the machine is shared).

Run: ``python -m bench soci`` (root; scripts/setup.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import threading
import time
from datetime import datetime
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


_FETCHED = "Artifact successfully fetched from remote"
_UNPACKED = "Layer successfully unpacked"


def _log_event(line: str) -> tuple[str, float, float] | None:
    """(kind, end time as epoch seconds, latency seconds) of one soci-snapshotter-grpc debug line for
    a layer fetched or unpacked in parallel mode (JSON or logfmt lines)."""
    kind = "fetched" if _FETCHED in line else "unpacked" if _UNPACKED in line else None
    if kind is None:
        return None
    try:
        rec = json.loads(line)
        when, latency = str(rec["time"]), float(rec["latency_ms"])
    except (ValueError, KeyError, TypeError):
        t = re.search(r'time="?([^" ]+)"?', line)
        lat = re.search(r"latency_ms=(\d+)", line)
        if not (t and lat):
            return None
        when, latency = t.group(1), float(lat.group(1))
    end = datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    return kind, end, latency / 1000


def soci_phases(log_text: str) -> dict[str, float]:
    """Where one pull's time went, from the soci-snapshotter-grpc debug log written during it:
    ``download_s`` (first layer request to last layer fully fetched), ``unpack_tail_s`` (last layer
    fetched to last layer unpacked), ``unpack_sum_s`` (the unpacks' own latencies added up)."""
    fetched: list[tuple[float, float]] = []
    unpacked: list[tuple[float, float]] = []
    for line in log_text.splitlines():
        ev = _log_event(line)
        if ev is not None:
            (fetched if ev[0] == "fetched" else unpacked).append((ev[1], ev[2]))
    if not fetched or not unpacked:
        return {}
    first = min(end - lat for end, lat in fetched)
    last_fetch = max(end for end, _ in fetched)
    return {
        "download_s": last_fetch - first,
        "unpack_tail_s": max(end for end, _ in unpacked) - last_fetch,
        "unpack_sum_s": sum(lat for _, lat in unpacked),
        "layers": float(len(unpacked)),
    }


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """``NAME:key=value,...`` -> (name, containerd.soci keys); values are ints, true/false or text."""
    name, _, body = text.partition(":")
    keys: dict[str, object] = {}
    for item in filter(None, body.split(",")):
        k, _, v = item.partition("=")
        keys[k] = int(v) if v.isdigit() else {"true": True, "false": False}.get(v, v)
    if not name or not keys:
        raise argparse.ArgumentTypeError(f"{text!r}: NAME:key=value[,key=value...]")
    return name, keys


def run_soci(
    sb: Sandbox, containerd: Path, proxy_host: str, refs: dict[str, str], soci_keys: dict[str, object]
) -> dict[str, object]:
    """A fresh SOCI node configured by ``nodeagent apply`` (``soci_keys`` over the defaults), each
    image pulled once: times, phases from SOCI's log, the sizing apply printed, peak RSS, disk."""
    soci = SociNode(sb, containerd)
    soci.plain_http(proxy_host)
    soci.write_soci_config(**soci_keys)
    soci.start()
    r = soci.apply("--flavor", "generic")
    if r.returncode != 0:
        raise SystemExit(f"bench_soci: apply failed:\n{r.stdout}\n{r.stderr}")
    sizing = [ln for ln in r.stdout.splitlines() if ln.startswith("tuning: containerd.soci.")]
    print("\n".join(sizing), flush=True)
    pid = int(soci.soci_pidfile.read_text())
    rss = RssPeak(pid)
    out: dict[str, object] = {"sizing": sizing, "config": soci.soci_config.read_text()}
    for name, ref in refs.items():
        mark = soci.soci_log.stat().st_size
        t = time.monotonic()
        soci.pull(ref)
        out[name] = time.monotonic() - t
        with open(soci.soci_log, "rb") as f:
            f.seek(mark)
            out[f"{name}_phases"] = soci_phases(f.read().decode(errors="replace"))
        print(f"SOCI parallel: {name}: {out[name]:.2f}s; phases {out[f'{name}_phases']}", flush=True)
    out["peak_rss_bytes"] = rss.stop()
    out["unpacked_bytes_on_disk"] = disk_usage(soci.soci_root / "snapshotter/snapshots")
    out["root_bytes_on_disk"] = disk_usage(soci.soci_root)
    soci.stop()
    soci.stop_soci()
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-connection", type=int, default=16, help="MB/s per connection")
    ap.add_argument("--total", type=int, default=96, help="MB/s over all connections")
    ap.add_argument("--variant", type=parse_variant, action="append", default=[], help="NAME:key=value,...")
    args = ap.parse_args(argv)
    per_conn, total = args.per_connection * 1_000_000, args.total * 1_000_000
    shapes = {"1x256MiB": (1, 256 * MiB), "8x32MiB": (8, 32 * MiB)}

    times: dict[str, dict[str, float]] = {"stock": {}, "soci": {}}
    extra: dict[str, object] = {}
    extra["loadavg_before"] = os.getloadavg()
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

        auto = run_soci(sb, containerd, proxy.address, refs, {})
        for name in shapes:
            times["soci"][name] = float(str(auto[name]))
        extra["soci_peak_rss_bytes"] = auto["peak_rss_bytes"]
        extra["soci_unpacked_bytes_on_disk"] = auto["unpacked_bytes_on_disk"]
        extra["soci_root_bytes_on_disk"] = auto["root_bytes_on_disk"]
        extra["sizing"] = auto["sizing"]
        extra["soci_phases"] = {name: auto[f"{name}_phases"] for name in shapes}
        variants: dict[str, dict[str, object]] = {}
        for vname, keys in args.variant:
            print(f"variant {vname}: {keys}", flush=True)
            v = run_soci(sb, containerd, proxy.address, refs, keys)
            variants[vname] = {
                "keys": keys,
                **{name: v[name] for name in shapes},
                **{f"{name}_phases": v[f"{name}_phases"] for name in shapes},
                "peak_rss_bytes": v["peak_rss_bytes"],
            }
        extra["variants"] = variants
        extra["loadavg_after"] = os.getloadavg()

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
    for name in shapes:
        ph = extra["soci_phases"][name]  # type: ignore[index]
        if ph:
            print(
                f"SOCI {name}: download phase {ph['download_s']:.2f}s "
                f"({ph['download_s'] / (shapes[name][0] * shapes[name][1] / total):.2f}x the link limit), "
                f"unpack tail after it {ph['unpack_tail_s']:.2f}s (unpacks took {ph['unpack_sum_s']:.2f}s "
                f"in all over {ph['layers']:.0f} layers)"
            )
    for vname, v in variants.items():
        for name, (n, size) in shapes.items():
            t = float(str(v[name]))
            print(
                f"variant {vname} {v['keys']}: {name} {t:.2f}s = {t / (n * size / total):.2f}x the link limit"
            )
    print(f"load average before {extra['loadavg_before']}, after {extra['loadavg_after']}")
    results.write(
        "soci",
        {"per_connection_bps": per_conn, "total_bps": total, "rows": rows, **extra},
    )
    return 0 if ok and stock_bounded else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
