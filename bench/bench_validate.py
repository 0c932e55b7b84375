"""Wall time of ``nodeagent validate -c docs/config.example.yaml`` as a fresh process (it runs on the
boot path), against ``python -c pass`` measured in the same run. Target: median under 300 ms.

Also checks that the validate path imports none of grpc, prometheus_client or tomlkit
(``python -X importtime``), and prints its heaviest imports.

    python -m bench validate            # or: python -m bench.bench_validate [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import REPO, import_times

EXAMPLE = REPO / "docs/config.example.yaml"
TARGET_MS = 300.0
HEAVY = ("grpc", "prometheus_client", "tomlkit")
VALIDATE = [sys.executable, "-m", "nodeagent", "validate", "-c", str(EXAMPLE)]
BASELINE = [sys.executable, "-c", "pass"]


def _time(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - started) * 1000.0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args(argv)

    for _ in range(2):  # warm the page cache for both
        _time(BASELINE)
        _time(VALIDATE)
    base, validate = [], []
    for _ in range(args.runs):  # interleaved, so load from other processes hits both alike
        base.append(_time(BASELINE))
        validate.append(_time(VALIDATE))
    b, v = statistics.median(base), statistics.median(validate)
    print(f"python -c pass:              median {b:6.1f} ms  (min {min(base):.1f}, n={args.runs})")
    print(f"python -m nodeagent validate: median {v:6.1f} ms  (min {min(validate):.1f}, n={args.runs})")
    print(f"ratio validate/baseline:     {v / b:.2f}x; validate's own cost {v - b:.1f} ms")
    script = Path(sys.executable).parent / "nodeagent"  # the console script systemd runs
    if script.exists():
        entry = [str(script), *VALIDATE[3:]]
        runs = [_time(entry) for _ in range(args.runs)]
        e = statistics.median(runs)
        print(f"{script} validate: median {e:.1f} ms ({e / b:.2f}x baseline)")
        v = max(v, e)

    rows = import_times(VALIDATE)
    top = [r for r in rows if r[1].split(".")[0] in ("nodeagent", "yaml")]
    top.sort(reverse=True)
    print("heaviest nodeagent/yaml imports (cumulative):")
    for us, name in top[:6]:
        print(f"  {us / 1000:6.1f} ms  {name}")
    heavy = sorted({n for _, n in rows if n.split(".")[0] in HEAVY})
    ok = v < TARGET_MS and not heavy
    if heavy:
        print(f"FAIL: validate imports {', '.join(heavy)}")
    print(f"target median < {TARGET_MS:.0f} ms: {'met' if v < TARGET_MS else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
