#!/usr/bin/env python3
"""How long config loading takes with IMDS healthy, refused and black-holed (a FAKE IMDSv2 on loopback).

    python bench/bench_imds_fallback.py [--runs N]      # or: python -m bench imds_fallback

Baseline in the same run: IMDS off (baked file only). Each case is `load_for_command` end to end, with the
DEFAULT client settings (1 s per request, 3 attempts, 5 s overall). The point: with IMDS down a node falls
back to its baked config within the overall deadline, and a refused port costs almost nothing. The same
for a whole ``nodeagent apply`` process (interpreter start included) with IMDS black-holed, against the
same process with IMDS off (tests/integration/test_eks_userdata.py asserts what it does, this how long).
Results: bench/results/imds_fallback.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import results
from nodeagent.config.sources import load_for_command
from nodeagent.eks.imds import ImdsSettings
from nodeagent.eks.userdata import render_al2023
from nodeagent.util.paths import Paths
from tests.fakes.imds import FakeImds
from tests.sandbox.net import RefusedPort
from tests.unit.commands.test_apply_imds import node

BAKED = "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\nkubelet:\n  registryPullQPS: 10\n"
PART = "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\nkubelet:\n  registryPullQPS: 50\n"


def timed(root: Path, env: dict[str, str]) -> tuple[float, str]:
    args = argparse.Namespace(config=None, root=str(root), flavor="auto", imds=None, imds_endpoint=None)
    t0 = time.perf_counter()
    loaded = load_for_command(args, Paths.at(root), env=env)
    took = time.perf_counter() - t0
    note = (
        loaded.warnings[0][:60]
        if loaded.warnings
        else f"registryPullQPS={loaded.config.kubelet.registry_pull_qps}"
    )
    return took, note


def apply_process(root: Path, env: dict[str, str]) -> float:
    """One ``nodeagent apply --flavor eks-al2023`` process, start to exit (seconds)."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "nodeagent", "apply", "--root", str(root), "--flavor", "eks-al2023"],
        env={**os.environ, **env},
        capture_output=True,
        timeout=60,
        check=True,
    )
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    runs = ap.parse_args(argv).runs
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "etc/nodeagent").mkdir(parents=True)
        (root / "etc/nodeagent/config.yaml").write_text(BAKED)
        rows: list[tuple[str, list[float], str]] = []

        def case(name: str, env: dict[str, str], n: int) -> None:
            samples, note = [], ""
            for _ in range(n):
                t, note = timed(root, env)
                samples.append(t)
            rows.append((name, samples, note))

        case("imds off (baseline)", {"NODEAGENT_IMDS": "off"}, runs)
        with FakeImds(render_al2023(PART).encode()) as fake:
            case(
                "fake imds, part merged",
                {"NODEAGENT_IMDS": "on", "NODEAGENT_IMDS_ENDPOINT": fake.endpoint},
                runs,
            )
        with RefusedPort() as refused:
            case("imds refused", {"NODEAGENT_IMDS": "on", "NODEAGENT_IMDS_ENDPOINT": refused.url}, runs)
        with FakeImds(b"") as fake:
            fake.hang = True
            case("imds black-holed", {"NODEAGENT_IMDS": "on", "NODEAGENT_IMDS_ENDPOINT": fake.endpoint}, 1)
            black_holed = {"NODEAGENT_IMDS": "on", "NODEAGENT_IMDS_ENDPOINT": fake.endpoint}
            proot = node(root, "apply-node", BAKED)
            process = [apply_process(proot, {"NODEAGENT_IMDS": "off"}), apply_process(proot, black_holed)]

    base = statistics.median(rows[0][1])
    deadline = ImdsSettings().deadline
    print(f"{'case':26} {'median':>9} {'max':>9} {'x baseline':>11}  note")
    for name, samples, note in rows:
        med = statistics.median(samples)
        print(f"{name:26} {med * 1000:8.1f}ms {max(samples) * 1000:8.1f}ms {med / base:11.1f}  {note}")
    worst = max(rows[-1][1])
    ok = worst <= deadline + 0.5
    verdict = "OK" if ok else "EXCEEDED"
    print(f"black-holed IMDS fell back in {worst:.2f}s; overall deadline {deadline:.1f}s: {verdict}")
    extra = process[1] - process[0]
    process_ok = extra <= deadline + 0.5
    print(
        f"apply process: {process[0]:.2f}s with IMDS off, {process[1]:.2f}s black-holed "
        f"(+{extra:.2f}s; overall deadline {deadline:.1f}s): {'OK' if process_ok else 'EXCEEDED'}"
    )
    results.write(
        "imds_fallback",
        {
            "deadline_seconds": deadline,
            "cases": {
                name: {"median_seconds": statistics.median(s), "max_seconds": max(s)} for name, s, _ in rows
            },
            "apply_process_seconds": {"imds_off": process[0], "black_holed": process[1]},
            "ok": ok and process_ok,
        },
    )
    return 0 if ok and process_ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
