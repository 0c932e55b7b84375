"""Wall time and peak RSS of ``nodeagent apply --flavor generic`` on a typical config, as a fresh
process (it runs on the boot path), against ``python -c pass`` measured in the same run.
Targets: median wall time under 300 ms and peak RSS under 60 MB.

The typical config: the stock containerd 1.6 config (tests/data), two registries with a mirror
each (answered by a local HTTP server, since apply probes every mirror once), ``auto`` tuning,
``restartCommand: []`` (restarting containerd is not apply's own cost). Two cases: a first apply
that writes every file, and a second apply that finds nothing to change (every later boot).
Also reports whether grpc or prometheus_client were imported (they must not be).

    python -m bench apply            # or: python -m bench.bench_apply [--runs N]
"""

from __future__ import annotations

import argparse
import http.server
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from bench import REPO, import_times

STOCK = REPO / "tests/data/containerd-1.6-config-default.toml"
TARGET_MS = 300.0
TARGET_RSS_MB = 60.0
HEAVY = ("grpc", "prometheus_client")
BASELINE = [sys.executable, "-c", "pass"]


class _Registry(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # a registry's API root answers 200 to the mirror probe
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def _tree(base: Path, mirror: str) -> Path:
    root = base / "T"
    (root / "etc/containerd").mkdir(parents=True)
    shutil.copy(STOCK, root / "etc/containerd/config.toml")
    (root / "etc/nodeagent").mkdir(parents=True)
    cfg = {
        "apiVersion": "nodeagent.io/v1alpha1",
        "kind": "NodeAgentConfig",
        "kubelet": {"maxParallelImagePulls": "auto", "imageMaximumGCAge": "168h"},
        "containerd": {
            "restartCommand": [],
            "mirrors": {
                "docker.io": [{"endpoint": mirror + "/v2/docker-hub", "overridePath": True}],
                "quay.io": [
                    {"endpoint": mirror, "capabilities": ["pull", "resolve"], "dialTimeout": "500ms"}
                ],
            },
        },
    }
    (root / "etc/nodeagent/config.yaml").write_text(yaml.safe_dump(cfg))
    return root


# As installed on a node, bytecode is cached (pip compiles it); this environment may set
# PYTHONDONTWRITEBYTECODE, so the children get a private bytecode cache that the warm-up runs fill.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _run(cmd: list[str]) -> tuple[float, float]:
    """(wall ms, peak RSS MB) of one child process."""
    # wait4 gives this one child's rusage. Note: Linux keeps the high-water RSS of the memory the
    # child had before exec (a vfork child shares this process's), so every figure here has this
    # bench process's RSS as a floor; the baseline shows that floor, and apply's figure is real
    # where it is above it.
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        started = time.perf_counter()
        pid = os.posix_spawn(
            cmd[0],
            cmd,
            ENV,
            file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)],
        )
        _, status, usage = os.wait4(pid, 0)
        wall = (time.perf_counter() - started) * 1000.0
    finally:
        os.close(devnull)
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {rc}")
    return wall, usage.ru_maxrss / 1024.0  # ru_maxrss is KiB on Linux


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args(argv)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mirror = f"http://127.0.0.1:{server.server_address[1]}"
    work = Path(tempfile.mkdtemp(prefix="bench-apply-"))
    ENV["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    try:
        template = _tree(work / "template", mirror)

        def apply_cmd(root: Path) -> list[str]:
            return [sys.executable, "-m", "nodeagent", "apply", "--root", str(root), "--flavor", "generic"]

        steady = _tree(work / "steady", mirror)
        _run(apply_cmd(steady))  # writes everything; later runs on it change nothing
        for _ in range(2):  # warm the page cache
            _run(BASELINE)
            _run(apply_cmd(steady))
        base, first, again = [], [], []
        for i in range(args.runs):  # interleaved, so load from other processes hits all alike
            base.append(_run(BASELINE))
            fresh = work / f"fresh{i}" / "T"
            shutil.copytree(template, fresh)
            first.append(_run(apply_cmd(fresh)))
            again.append(_run(apply_cmd(steady)))
        bw, brss = statistics.median(w for w, _ in base), max(r for _, r in base)
        print(f"python -c pass:            median {bw:6.1f} ms, peak RSS {brss:5.1f} MB (n={args.runs})")
        worst_ms, worst_rss = 0.0, 0.0
        for name, runs in (("apply (writes all files)", first), ("apply (nothing to change)", again)):
            w = statistics.median(x for x, _ in runs)
            rss = max(r for _, r in runs)
            worst_ms, worst_rss = max(worst_ms, w), max(worst_rss, rss)
            print(
                f"{name:26s} median {w:6.1f} ms ({w / bw:.2f}x baseline, own cost {w - bw:.1f} ms), "
                f"peak RSS {rss:5.1f} MB ({rss / brss:.2f}x baseline)"
            )
        heavy = sorted({n.split(".")[0] for _, n in import_times(apply_cmd(steady), ENV)} & set(HEAVY))
        if heavy:
            print(f"FAIL: apply imports {', '.join(heavy)}")
        ok_ms, ok_rss = worst_ms < TARGET_MS, worst_rss < TARGET_RSS_MB
        print(f"target median < {TARGET_MS:.0f} ms: {'met' if ok_ms else 'MISSED'}")
        print(f"target peak RSS < {TARGET_RSS_MB:.0f} MB: {'met' if ok_rss else 'MISSED'}")
        return 0 if ok_ms and ok_rss and not heavy else 1
    finally:
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
